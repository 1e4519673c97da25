"""Processes on a Gaussian probability path x_t = α_t x₁ + β_t ε (t = 0 noise, t = 1 data).

Both DDPM (VP path, ᾱ from a diffusers scheduler) and memoryless flow matching (α = t,
β = 1 − t) are this one family with different schedules and grids:

* continuous view — the SDE with diffusion σ(t) = s·√(2η_t), η_t = β_t(α̇_t β_t/α_t − β̇_t),
  drift b = v + (σ²/2)·score, v = α̇ x̂₁ + β̇ ε̂, score = −ε̂/β. s = 1 is the memoryless SDE
  (DDPM's reverse SDE; Adjoint Matching's σ(t) = √(2η_t)), s = 0 the probability-flow ODE.
* discrete view — the DDIM(η=s) kernel from t to the next grid time u > t:
      c² = β_t² − (α_t β_u/α_u)²          (noising variance from u back to t)
      v  = β_u² c² / β_t²                  (posterior variance q(x_u | x_t, x̂₁))
      x_u = α_u x̂₁ + √(β_u² − s² v) ε̂ + s √v ξ.
  With s = 1 it is the exact posterior (= diffusers' DDPMScheduler.step); when α_{t_0} = 0 the
  first step ignores x_0, so the chain is memoryless at any step size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..registry import SoctuneError
from .base import Process, StepOutput


class Schedule:
    """α(t), β(t) and their time derivatives on t ∈ [0, 1]; tensors in, tensors out."""

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def beta(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_beta(self, t: Tensor) -> Tensor:
        raise NotImplementedError


class FlowSchedule(Schedule):
    """Rectified flow / flow matching: α = t, β = 1 − t."""

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def beta(self, t: Tensor) -> Tensor:
        return 1 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_beta(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


class DiscreteVPSchedule(Schedule):
    """Variance preserving α = √ᾱ, β = √(1 − ᾱ) from a discrete ᾱ[τ], τ = 0 … N−1.

    Generation time t = 1 − (τ + 1)/N, so τ = N−1 is t = 0 and the clean data (ᾱ = 1, diffusers'
    "τ = −1") is t = 1. Between integers log ᾱ is interpolated linearly (DPM-Solver's
    discrete-time convention), which gives the continuous view its derivatives.

    Args:
        alphas_cumprod: [N] float tensor ᾱ_τ.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = alphas_cumprod.to(torch.float64)
        self.N = ac.shape[0]
        self.log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), ac.log()])  # index τ+1

    def timestep(self, t: Tensor) -> Tensor:
        """Diffusers timestep τ = N(1 − t) − 1 (float)."""
        return self.N * (1 - t.to(torch.float64)) - 1

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        u = (self.N * (1 - t.to(torch.float64))).clamp(0, self.N)  # = τ + 1
        i0 = u.floor().long().clamp(max=self.N - 1)
        w = u - i0
        lo, hi = self.log_ab[i0], self.log_ab[i0 + 1]
        log_ab = lo + w * (hi - lo)
        slope = -(hi - lo) * self.N  # d log ᾱ / dt
        return log_ab, slope

    def alpha_bar(self, t: Tensor) -> Tensor:
        return self._interp(t)[0].exp().to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return (0.5 * self._interp(t)[0]).exp().to(t.dtype)

    def beta(self, t: Tensor) -> Tensor:
        return (1 - self._interp(t)[0].exp()).clamp(min=0).sqrt().to(t.dtype)

    def d_alpha(self, t: Tensor) -> Tensor:
        log_ab, slope = self._interp(t)
        return (0.5 * slope * (0.5 * log_ab).exp()).to(t.dtype)

    def d_beta(self, t: Tensor) -> Tensor:
        log_ab, slope = self._interp(t)
        ab = log_ab.exp()
        return (-0.5 * slope * ab / (1 - ab).clamp(min=1e-20).sqrt()).to(t.dtype)


def scheduler_alphas_cumprod(config: dict[str, Any] | None) -> Tensor:
    """ᾱ [N] exactly as diffusers builds it from a scheduler config (linear, scaled_linear,
    squaredcos_cap_v2, trained betas, zero-SNR rescaling), by asking diffusers itself."""
    from diffusers import DDPMScheduler

    cfg = dict(config or {})
    cfg.pop("_class_name", None)
    sched = DDPMScheduler.from_config(cfg)
    return sched.alphas_cumprod.clone()


class GaussianPathProcess(Process):
    """Generic SDE/DDIM-η process on a Gaussian path (see the module docstring).

    Args:
        num_steps: K.
        noise_scale: s ∈ [0, 1] for the DDIM kernel (any s ≥ 0 with ``kernel="euler"``);
            1 = memoryless SDE, 0 = deterministic (DDIM / probability-flow ODE).
        kernel: ``"ddim"`` (exact Gaussian posterior step) or ``"euler"`` (Euler–Maruyama on
            the continuous SDE).
        time_offset: h > 0 that regularises σ(t)² ~ 2/t and the drift's x/t at t → 0 in the
            continuous view, σ(t) = s√(2η_{max(t,h)}).
    """

    schedule: Schedule

    def __init__(self, num_steps: int = 50, noise_scale: float = 1.0, kernel: str = "ddim",
                 time_offset: float = 1e-3) -> None:
        if kernel not in ("ddim", "euler"):
            raise SoctuneError(f"kernel must be 'ddim' or 'euler', got '{kernel}'")
        if noise_scale < 0 or (kernel == "ddim" and noise_scale > 1):
            raise SoctuneError(
                f"noise_scale must be in [0, 1] for the ddim kernel (got {noise_scale}); "
                "use kernel='euler' for larger noise"
            )
        self.noise_scale = float(noise_scale)
        self.kernel = kernel
        self.time_offset = float(time_offset)
        super().__init__(num_steps)

    @property
    def memoryless(self) -> bool:  # type: ignore[override]
        a0 = float(self.schedule.alpha(self.ts[:1].double())[0])
        # ᾱ(t_0) < 1%: the prior N(0, I) forgets the data (DDPM with "leading" spacing starts at
        # τ = N − N/K, not exactly at pure noise)
        return self.noise_scale == 1.0 and a0**2 < 1e-2

    # ---- parameterisations ----------------------------------------------------------------
    def split(self, x: Tensor, t: float | Tensor, pred: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
        """(x̂₁, ε̂) [B,*S] each, from a prediction of the given type at time t (scalar)."""
        tt = torch.as_tensor(t, dtype=torch.float64)
        a, b = float(self.schedule.alpha(tt)), float(self.schedule.beta(tt))
        if prediction_type == "epsilon":
            return (x - b * pred) / a, pred
        if prediction_type == "sample":
            return pred, (x - a * pred) / b
        if prediction_type == "v_prediction":  # v = αε − βx₁ on a VP path (α² + β² = 1)
            return a * x - b * pred, a * pred + b * x
        if prediction_type == "velocity":  # v = α̇x₁ + β̇ε, solve the 2×2 system
            da, db = float(self.schedule.d_alpha(tt)), float(self.schedule.d_beta(tt))
            det = a * db - b * da
            return (db * x - b * pred) / det, (a * pred - da * x) / det
        raise SoctuneError(f"unknown prediction type '{prediction_type}'")

    def convert(self, x: Tensor, t: float, pred: Tensor, src: str, dst: str) -> Tensor:
        """Convert a prediction between parameterisations at time t."""
        if src == dst:
            return pred
        x1, eps = self.split(x, t, pred, src)
        tt = torch.as_tensor(t, dtype=torch.float64)
        a, b = float(self.schedule.alpha(tt)), float(self.schedule.beta(tt))
        if dst == "sample":
            return x1
        if dst == "epsilon":
            return eps
        if dst == "v_prediction":
            return a * eps - b * x1
        if dst == "velocity":
            return float(self.schedule.d_alpha(tt)) * x1 + float(self.schedule.d_beta(tt)) * eps
        raise SoctuneError(f"unknown prediction type '{dst}'")

    # ---- discrete view --------------------------------------------------------------------
    def step_kernel(self, x: Tensor, k: int, pred: Tensor, state: dict[str, Tensor],
                    prediction_type: str) -> StepOutput:
        if self.kernel == "euler":
            out = super().step_kernel(x, k, pred, state, prediction_type)
            out.x1_hat = self.split(x, self.model_time(k), pred, prediction_type)[0]
            return out
        t, u = self.ts[k], self.ts[k + 1]
        x1, eps = self.split(x, self.model_time(k), pred, prediction_type)
        a_t, b_t = float(self.schedule.alpha(t)), float(self.schedule.beta(t))
        a_u, b_u = float(self.schedule.alpha(u)), float(self.schedule.beta(u))
        if a_u <= 0:
            raise SoctuneError("grid step ends at α = 0; the grid must move toward data")
        c2 = max(b_t**2 - (a_t * b_u / a_u) ** 2, 0.0)
        var = (self.noise_scale**2) * (b_u**2 * c2 / b_t**2 if b_t > 0 else 0.0)
        mean = a_u * x1 + math.sqrt(max(b_u**2 - var, 0.0)) * eps
        std = torch.as_tensor(math.sqrt(var), dtype=x.dtype, device=x.device)
        return StepOutput(mean=mean, std=std, x1_hat=x1)

    # ---- continuous view ------------------------------------------------------------------
    def eta(self, t: float) -> float:
        """η_t = β(α̇β/α − β̇) at max(t, h); σ_memoryless² = 2η_t."""
        tt = torch.as_tensor(max(t, self.time_offset), dtype=torch.float64)
        a, b = float(self.schedule.alpha(tt)), float(self.schedule.beta(tt))
        da, db = float(self.schedule.d_alpha(tt)), float(self.schedule.d_beta(tt))
        return b * (da * b / a - db)

    def diffusion(self, t: float) -> float:
        return self.noise_scale * math.sqrt(2 * max(self.eta(t), 0.0))

    def drift(self, x: Tensor, t: float, pred: Tensor, prediction_type: str) -> Tensor:
        """b = α̇x̂₁ + β̇ε̂ − (σ²/2)·ε̂/β, i.e. velocity plus the score correction."""
        x1, eps = self.split(x, t, pred, prediction_type)
        tt = torch.as_tensor(t, dtype=torch.float64)
        da, db = float(self.schedule.d_alpha(tt)), float(self.schedule.d_beta(tt))
        b = float(self.schedule.beta(torch.as_tensor(max(t, self.time_offset), dtype=torch.float64)))
        sigma2 = self.diffusion(t) ** 2
        return da * x1 + db * eps - 0.5 * sigma2 * eps / max(b, 1e-12)


def sample_ode(process: GaussianPathProcess, model: Any, x_init: Tensor, cond: Any = None,
               method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
               t_end: float | None = None) -> Tensor:
    """Solve the probability-flow ODE dx/dt = v(x, t) (σ = 0) from x_init [B,*S] at t_0 to t_end
    (default the last model time, t_{K−1}; the remaining step to t = 1 is the exact x̂₁ jump)
    with ``torchdiffeq.odeint``. Returns x₁ [B,*S]."""
    from torchdiffeq import odeint

    t0 = float(process.ts[0])
    t1 = float(process.ts[-2]) if t_end is None else t_end
    pt = model.prediction_type

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        tb = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        pred = model(x, tb, cond)
        return process.convert(x, float(t), pred, pt, "velocity")

    with torch.no_grad():
        xs = odeint(velocity, x_init, torch.tensor([t0, t1], dtype=x_init.dtype), method=method,
                    rtol=rtol, atol=atol)
        x = xs[-1]
        if t_end is None:
            tb = torch.full((x.shape[0],), t1, dtype=x.dtype, device=x.device)
            x = process.split(x, t1, model(x, tb, cond), pt)[0]
    return x
