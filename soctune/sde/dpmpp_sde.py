"""SDE-DPM-Solver++ (order 1 and 2): diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``.

Order 1 is the default, as in the ∇-GFlowNet paper's fine-tuning code: the second-order step reads the
previous step's data estimate, so the chain is not Markov in x (:attr:`~soctune.sde.base.Process.multistep`)
and the tilt solvers' conditions, written on x_k, no longer hold exactly (the solvers warn;
benchmarks/ground_truth.py measures nabla-db on both orders against the closed-form tilt, in
RESULTS.md). Order 2 (diffusers' default ``solver_order``) remains for sampling and for the
reward maximisers (DRaFT, DDPO).

With λ = log(α/β) (log-SNR/2 on the VP path x_t = α_t x₁ + β_t ε) and h = λ_t − λ_s for the
step from s = t_k to t = t_{k+1}, the first-order step is

    x_t = (β_t/β_s) e^{−h} x_s + α_t (1 − e^{−2h}) x̂₁ + β_t √(1 − e^{−2h}) ξ,

which is exactly the DDPM posterior q(x_t | x_s, x̂₁) (= DDIM η = 1), and the second-order
multistep step adds the finite difference D₁ = (x̂₁(s) − x̂₁(s′))/r₀, r₀ = (λ_s − λ_{s′})/h, of the
previous step's data estimate (s′ = t_{k−1}):

    midpoint: mean += ½ α_t (1 − e^{−2h}) D₁
    heun:     mean += α_t ((1 − e^{−2h})/(−2h) + 1) D₁.

The noise term is the same for both orders, so every step is N(mean, β_t²(1 − e^{−2h}) I) and
its std is the kernel's true std.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..registry import SoctuneError
from .base import StepOutput, register_process
from .ddpm import load_scheduler_config
from .gaussian import DiscreteVPSchedule, GaussianPathProcess

_UNSUPPORTED_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                       "use_flow_sigmas")


@register_process("dpmpp-sde", "SDE-DPM-Solver++ (diffusers' sde-dpmsolver++; order 1, or order=2) on the model's VP schedule; for ε, v or x̂₁ (sample) models")
class DPMSolverSDE(GaussianPathProcess):
    """SDE-DPM-Solver++ on the discrete ᾱ schedule of a diffusers scheduler config, step for
    step equal to ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
    solver_order=order).step`` given the same noise (see the module docstring for the kernel).

    Grid: diffusers' ``set_timesteps(K)`` timesteps τ_0 > … > τ_{K−1} (``timestep_spacing``,
    ``steps_offset``, ``lambda_min_clipped`` of the config) at generation times
    t_k = 1 − (τ_k + 1)/N, then the final noise level:

    * ``final_sigmas_type="sigma_min"`` (soctune's default): t_K = 1 − 1/N, the noise level of
      τ = 0 (β ≈ 0.01 for SD-style schedules). Every step then has std > 0, so every step has
      a finite log-density and control cost; x̂₁ of the last step is ``Trajectory.x1_hats[-1]``.
    * ``final_sigmas_type="zero"`` (diffusers' default): t_K = 1 (β = 0); the last step is the
      deterministic jump x_K = x̂₁ (std 0, left out of log-density terms like DDPM's).

    Step orders follow diffusers: step 0 is first order (no previous x̂₁); the last step is
    first order when ``euler_at_final``, when ``final_sigmas_type == "zero"``, or when
    ``lower_order_final`` and K < 15.

    The previous x̂₁ is carried in the step ``state`` (``{"x1_hat_prev": [B,*S]}``); the base chain's
    own state along a fine-tuned trajectory (its previous x̂₁, which the path KL to the base chain
    needs) is :func:`soctune.trajectory.base_states`. The mean map of
    step k is a function of (x_k, θ) with that state a CONSTANT: solvers that replay a step from
    ``Trajectory.states[k]`` (detached) and differentiate its mean with respect to x_k or θ do
    not differentiate through the earlier prediction. A rollout that keeps the graph over
    consecutive steps (``GradSpec.all``/``last``) passes the state on un-detached, so its
    reward gradient is the exact gradient of the sampled chain.

    The continuous view (``drift``, ``diffusion``, ``as_torchsde``) is the SDE this scheme
    discretises: the memoryless reverse SDE σ(t) = √(2η_t) of :class:`GaussianPathProcess`.

    Args:
        num_steps: K inference steps.
        order: 1 (default: a chain Markov in x, see the module docstring) or 2 (diffusers'
            ``solver_order``; overrides the config's).
        scheduler_config: a diffusers scheduler config (dict, file or folder; DDPM/DDIM/PNDM/
            DPM configs all work, keys DPM does not know are ignored as in diffusers);
            ``None`` = diffusers' defaults.
        final_sigmas_type: ``"sigma_min"`` (default, every std > 0) or ``"zero"`` (diffusers'
            default, exact match of its last step); overrides the config's.
        time_offset: h of the continuous view (see :class:`GaussianPathProcess`).
    """

    accepts = ("epsilon", "v_prediction", "sample")

    def __init__(self, num_steps: int = 25, order: int = 1,
                 scheduler_config: dict[str, Any] | str | Path | None = None,
                 final_sigmas_type: str = "sigma_min", time_offset: float = 1e-3) -> None:
        from diffusers import DPMSolverMultistepScheduler

        if order not in (1, 2):
            raise SoctuneError(f"dpmpp-sde supports order 1 or 2, got {order}")
        if final_sigmas_type not in ("sigma_min", "zero"):
            raise SoctuneError(f"final_sigmas_type must be 'sigma_min' or 'zero', got '{final_sigmas_type}'")
        cfg = load_scheduler_config(scheduler_config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        for key in _UNSUPPORTED_SIGMAS:
            if cfg.get(key):
                raise SoctuneError(f"dpmpp-sde does not support {key}; set {key}=false in the scheduler config")
        if cfg.get("thresholding"):
            raise SoctuneError("dynamic thresholding is not supported; set thresholding=false in the scheduler config")
        # DDPMScheduler configs carry variance_type="fixed_small"/"fixed_large" (not learned)
        if cfg.get("variance_type") in ("learned", "learned_range"):
            raise SoctuneError("models with learned variance are not supported; set variance_type=null")
        cfg.update(algorithm_type="sde-dpmsolver++", solver_order=int(order), final_sigmas_type=final_sigmas_type)
        self._sched = DPMSolverMultistepScheduler.from_config(cfg)
        self.scheduler_config = dict(self._sched.config)
        self.order = int(order)
        self.final_sigmas_type = final_sigmas_type
        self.solver_type = self._sched.config.solver_type
        self.schedule = DiscreteVPSchedule(self._sched.alphas_cumprod)
        # the DPM kernel replaces the DDIM/Euler kernels; noise_scale 1 makes the continuous
        # view the memoryless reverse SDE that this scheme discretises
        super().__init__(num_steps, noise_scale=1.0, kernel="ddim", time_offset=time_offset)
        self._orders = self._step_orders(self.num_steps)

    def make_grid(self, num_steps: int) -> Tensor:
        self._sched.set_timesteps(num_steps)
        taus = self._sched.timesteps.to(torch.float64)
        if len(taus) != num_steps:
            raise SoctuneError(f"the scheduler produced {len(taus)} timesteps for num_steps={num_steps}")
        N = self._sched.config.num_train_timesteps
        t_final = 1.0 if self.final_sigmas_type == "zero" else 1.0 - 1.0 / N  # σ_min = noise level of τ = 0
        ts = torch.cat([1 - (taus + 1) / N, torch.tensor([t_final], dtype=torch.float64)])
        if not bool((ts[1:] > ts[:-1]).all()):
            raise SoctuneError(f"num_steps={num_steps} gives repeated timesteps on this schedule; use fewer steps")
        return ts

    @property
    def multistep(self) -> bool:
        return 2 in self._orders

    def _step_orders(self, K: int) -> list[int]:
        """Order of each step, as ``DPMSolverMultistepScheduler.step`` decides it."""
        cfg = self._sched.config
        final_first = cfg.euler_at_final or (cfg.lower_order_final and K < 15) or cfg.final_sigmas_type == "zero"
        return [1 if (self.order == 1 or k == 0 or (k == K - 1 and final_first)) else 2 for k in range(K)]

    def _ab(self, t: Tensor) -> tuple[float, float]:
        tt = t.to(torch.float64)
        return float(self.schedule.alpha(tt)), float(self.schedule.beta(tt))

    def step_kernel(self, x: Tensor, k: int, pred: Tensor, state: dict[str, Tensor],
                    prediction_type: str) -> StepOutput:
        """Step k: x [B,*S], pred [B,*S] at t_k -> N(mean, std²I) at t_{k+1}; state carries x̂₁(t_{k−1})."""
        x1 = self.split(x, self.model_time(k), pred, prediction_type)[0]
        a_s, b_s = self._ab(self.ts[k])
        a_t, b_t = self._ab(self.ts[k + 1])
        # e^{−h} = (α_s β_t)/(α_t β_s), written without λ so that β_t = 0 ("zero") gives 0, not inf
        e = (a_s * b_t) / (a_t * b_s)
        one_m = 1.0 - e * e
        mean = (b_t / b_s * e) * x + (a_t * one_m) * x1
        if self._orders[k] == 2 and b_t > 0:
            if "x1_hat_prev" not in state:
                raise SoctuneError(
                    f"step {k} of order-2 dpmpp-sde needs the previous x̂₁ in state; pass trajectory.states[{k}]")
            a_p, b_p = self._ab(self.ts[k - 1])
            h = math.log(a_t / b_t) - math.log(a_s / b_s)
            h0 = math.log(a_s / b_s) - math.log(a_p / b_p)
            d1 = (x1 - state["x1_hat_prev"]) * (h / h0)  # D₁ = (x̂₁ − x̂₁_prev)/r₀, r₀ = h₀/h
            if self.solver_type == "heun":
                mean = mean + (a_t * (one_m / (-2.0 * h) + 1.0)) * d1
            else:  # midpoint
                mean = mean + (0.5 * a_t * one_m) * d1
        std = torch.as_tensor(b_t * math.sqrt(max(one_m, 0.0)), dtype=x.dtype, device=x.device)
        next_state = {"x1_hat_prev": x1} if self.order == 2 else {}
        return StepOutput(mean=mean, std=std, x1_hat=x1, state=next_state)
