"""Gradient-free GFlowNet baselines: detailed balance with a scalar flow (DAG-DB, residual DB).

Both regress, on sub-sampled stochastic transitions x_k → x_{k+1} of on-policy rollouts, the
detailed-balance residual in log space (no reward gradients anywhere; the reward is only
evaluated, under ``torch.no_grad``):

* ``variant="dag-db"`` (DAG-GFlowNet, Zhang et al. 2024): the backward policy is the fixed
  noising kernel of the process's Gaussian path, P_B(x_k | x_{k+1}) = N((α_k/α_{k+1}) x_{k+1},
  (β_k² − (α_k β_{k+1}/α_{k+1})²) I), and

      δ_k = log F(x_k) + log P_F^θ(x_{k+1}|x_k) − log F(x_{k+1}) − log P_B(x_k|x_{k+1}).

  With terminal F = exp(λ r) this targets p ∝ exp(λ r) itself: the base model enters only as the
  initialisation (the flow must learn the log-marginal density of the whole chain), which is
  why it is a baseline. Needs a Gaussian-path process (``ddpm``, ``fm-memoryless``, …).
* ``variant="residual-db"`` (the ∇-GFlowNet paper's residual DB): subtracting the base chain's
  own balance condition removes P_B,

      δ_k = log F̃(x_k) + log P_F^θ(x_{k+1}|x_k) − η log P_F^base(x_{k+1}|x_k) − log F̃(x_{k+1}),

  which targets p_base^η·exp(λ r) (exact for η = 1 on a memoryless chain, as in
  :mod:`soctune.solvers.nabla_db`).

The log-flow is forward-looking, log F(x_k) = λ γ_k r(x̂₁(x_k)) + f_φ(x_k, t_k) with f_φ a small
scalar network (zero-initialised) owned by the solver. The terminal state is the state after
the last stochastic step, with log F(x_T) = λ r(Φ(x_T)) where Φ is the base model's
deterministic tail (the DDPM/flow jump to t = 1); predictions on the tail are anchored to the
base, exactly as in :mod:`soctune.solvers.nabla_db` whose module docstring explains why.

Loss: mean over sampled transitions and the batch of δ_k², plus the tail anchor.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..models.base import Denoiser, index_batch
from ..registry import SoctuneError
from ..sde.base import Process
from ..trajectory import Trajectory, base_states, model_step
from .base import FinetuneContext, LossOutput, Solver, register_solver
from .nabla_db import (FlowNet, GammaSpec, SocCostEstimate, anchor_loss, check_transitions, make_gamma,
                       rollout_for_training, subsample_transitions, terminal_index, terminal_map)


@register_solver("db", "Gradient-free detailed balance with a scalar flow: variant dag-db (fixed noising P_B) or residual-db")
class DetailedBalance(Solver):
    """DAG-DB / residual DB (see the module docstring).

    Args:
        reward_scale: λ.
        variant: ``"residual-db"`` (default) or ``"dag-db"``.
        prior_strength: η of the residual variant (ignored by dag-db).
        transitions: stochastic transitions per update: float in (0, 1] = fraction, int = count;
            the last stochastic transition is always included.
        stratified: draw the others one per contiguous chunk of the chain.
        anchor_weight: weight of ‖pred_θ − pred_base‖² on the deterministic tail.
        inner_steps: optimiser updates per rollout, on disjoint minibatches of it.
        gamma: forward-looking weight γ(t) (``"alpha2"``, ``"alpha"``, ``"one"``, ``"zero"`` or a
            callable), as in nabla-db.
        lookahead_model: ``"finetuned"`` or ``"base"``: whose x̂₁ enters r(x̂₁(x_k)).
        flow_net, flow_hidden, flow_depth, flow_time_features: the scalar flow network f_φ.
    """

    wants_memoryless = True
    needs_stochastic = True

    def __init__(self, reward_scale: float = 1.0, variant: str = "residual-db", prior_strength: float = 1.0,
                 transitions: float | int = 0.25, stratified: bool = True, anchor_weight: float = 1.0,
                 inner_steps: int = 1, gamma: GammaSpec = "alpha2", lookahead_model: str = "finetuned",
                 flow_net: str = "auto", flow_hidden: int | None = None, flow_depth: int = 2,
                 flow_time_features: int = 8) -> None:
        super().__init__(reward_scale)
        if variant not in ("residual-db", "dag-db"):
            raise SoctuneError(f"variant must be 'residual-db' or 'dag-db', got '{variant}'")
        check_transitions(transitions)
        if not prior_strength > 0:
            raise SoctuneError(f"prior_strength (η) must be > 0, got {prior_strength}")
        if anchor_weight < 0:
            raise SoctuneError(f"anchor_weight must be ≥ 0, got {anchor_weight}")
        if int(inner_steps) < 1:
            raise SoctuneError(f"inner_steps must be ≥ 1, got {inner_steps}")
        if lookahead_model not in ("finetuned", "base"):
            raise SoctuneError(f"lookahead_model must be 'finetuned' or 'base', got '{lookahead_model}'")
        if not callable(gamma) and gamma not in ("alpha2", "alpha", "one", "zero"):
            raise SoctuneError(f"gamma must be 'alpha2', 'alpha', 'one', 'zero' or a callable, got '{gamma}'")
        self.variant, self.prior_strength = variant, float(prior_strength)
        self.transitions, self.stratified = transitions, bool(stratified)
        self.anchor_weight, self.inner_steps = float(anchor_weight), int(inner_steps)
        self.gamma_spec, self.lookahead_model = gamma, lookahead_model
        self.flow_options = dict(kind=flow_net, hidden=flow_hidden, depth=int(flow_depth),
                                 time_features=int(flow_time_features))
        self.flow: FlowNet | None = None
        self._gamma_fn: Callable[[float], float] | None = None

    @property
    def claims_tilt(self) -> bool:  # dag-db targets e^{λr} alone; residual-db with η ≠ 1 p_base^η·e^{λr}
        return self.variant == "residual-db" and self.prior_strength == 1.0

    def check(self, process: Process, model: Denoiser) -> None:
        super().check(process, model)
        if self.variant == "dag-db" and getattr(process, "schedule", None) is None:
            raise SoctuneError(f"db variant 'dag-db' needs a Gaussian-path process (its noising kernel is P_B); "
                               f"'{process.registered_name}' has none — use variant='residual-db'")

    def setup(self, ctx: FinetuneContext) -> None:
        if self.flow is None:
            self.flow = FlowNet(tuple(ctx.sample_shape), scalar=True, **self.flow_options).to(ctx.device)

    # ---- pieces ------------------------------------------------------------------------------
    def backward_log_prob(self, process: Process, traj: Trajectory, k: int, x: Tensor, x_next: Tensor) -> Tensor:
        """log P_B(x_k | x_{k+1}) of the noising kernel N((α_k/α_{k+1}) x_{k+1}, c² I), [b]."""
        sched = process.schedule  # type: ignore[attr-defined]
        t, u = traj.ts[k].double(), traj.ts[k + 1].double()
        a_t, b_t = float(sched.alpha(t)), float(sched.beta(t))
        a_u, b_u = float(sched.alpha(u)), float(sched.beta(u))
        c2 = b_t**2 - (a_t * b_u / a_u) ** 2
        if not c2 > 0:
            raise SoctuneError(f"dag-db: the noising kernel of step {k} is degenerate (variance {c2:.3g}); "
                               "use variant='residual-db'")
        std = torch.tensor(math.sqrt(c2), dtype=x.dtype, device=x.device)
        return Process.log_prob(x, (a_t / a_u) * x_next, std)

    def lookahead(self, ctx: FinetuneContext, traj: Trajectory, k: int, x: Tensor, cond: Any, idx: Tensor,
                  x1: Tensor | None = None) -> Tensor:
        """λ γ_k r(x̂₁(x_k)) [b] without gradients (``x1``: x̂₁ if the caller has it)."""
        gam = self._gamma_fn(float(traj.ts[k])) if self._gamma_fn is not None else 0.0
        if gam == 0:
            return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        with torch.no_grad():
            if x1 is None:
                state = index_batch(traj.states[k], idx, traj.batch_size)
                if self.lookahead_model == "base":
                    with ctx.model.base():
                        x1 = model_step(ctx.process, ctx.model, x, k, cond, state).x1_hat
                else:
                    x1 = model_step(ctx.process, ctx.model, x, k, cond, state).x1_hat
                if x1 is None:
                    x1 = x
            return self.reward_scale * gam * ctx.reward(x1.detach(), cond).float().to(x.dtype)

    def log_flow(self, ctx: FinetuneContext, traj: Trajectory, k: int, x: Tensor, cond: Any, idx: Tensor,
                 T: int, x1: Tensor | None = None) -> Tensor:
        """log F(x_k) [b]: λ r(Φ(x_T)) at the terminal, else the forward-looking form (graph into φ)."""
        if k == T:
            with torch.no_grad():
                return self.reward_scale * ctx.reward(terminal_map(ctx.process, ctx.model, traj, x, T, cond, idx),
                                                      cond).float().to(x.dtype)
        assert self.flow is not None
        tb = torch.full((x.shape[0],), float(traj.ts[k]), dtype=x.dtype, device=x.device)
        return self.lookahead(ctx, traj, k, x, cond, idx, x1) + self.flow(x, tb)

    def residual(self, ctx: FinetuneContext, traj: Trajectory, k: int, T: int, cond: Any, idx: Tensor,
                 soc: SocCostEstimate | None = None) -> Tensor:
        """δ_k per sample, [b] (graph into θ through log P_F^θ and into φ through the flows). With ``soc``
        (residual-db), the rollout's ½‖u_k‖² from the base mean computed here is added to it."""
        process, model = ctx.process, ctx.model
        B = traj.batch_size
        x, x_next = traj.xs[k][idx], traj.xs[k + 1][idx]
        state = index_batch(traj.states[k], idx, B)
        std = traj.stds[k].to(x.dtype)
        with torch.enable_grad():
            out = model_step(process, model, x, k, cond, state)
            logp_ft = Process.log_prob(x_next, out.mean, std)
        x1_k = out.x1_hat.detach() if (out.x1_hat is not None and self.lookahead_model == "finetuned") else None
        if self.variant == "residual-db":
            b_state = index_batch(base_states(process, model, traj)[k], idx, B)
            with torch.no_grad(), model.base():
                out_b = model_step(process, model, x, k, cond, b_state)
            if self.lookahead_model == "base" and out_b.x1_hat is not None:
                x1_k = out_b.x1_hat
            logp_ref = self.prior_strength * Process.log_prob(x_next, out_b.mean, std)
            if soc is not None:
                soc.add(k, 0.5 * ((traj.means[k][idx] - out_b.mean) / std).flatten(1).double().pow(2).sum(1), idx)
        else:
            logp_ref = self.backward_log_prob(process, traj, k, x, x_next)
        return (self.log_flow(ctx, traj, k, x, cond, idx, T, x1_k) + logp_ft - logp_ref
                - self.log_flow(ctx, traj, k + 1, x_next, cond, idx, T))

    # ---- iteration -------------------------------------------------------------------------
    def iteration(self, ctx: FinetuneContext) -> Iterator[LossOutput]:
        self._gamma_fn = make_gamma(ctx.process, self.gamma_spec)
        traj, reward = rollout_for_training(ctx, ctx.reward)
        T = terminal_index(traj)
        B = traj.batch_size
        chunks = torch.arange(B, device=traj.xs.device).tensor_split(self.inner_steps)
        metrics0 = {"reward_mean": float(reward.mean()), "reward_std": float(reward.std(unbiased=False))}
        soc = SocCostEstimate(self, traj, T, reward) if self.variant == "residual-db" else None
        for idx in chunks:
            if idx.numel() == 0:
                continue
            ks = subsample_transitions(list(range(T)), self.transitions, ctx.generator, self.stratified)
            cond = index_batch(traj.cond, idx, B)
            l_db = torch.stack([self.residual(ctx, traj, k, T, cond, idx, soc).pow(2).mean() for k in ks]).mean()
            zero = torch.zeros((), device=traj.xs.device)
            l_anchor = (anchor_loss(ctx.process, ctx.model, traj, T, cond, idx)
                        if self.anchor_weight > 0 and T < traj.num_steps else zero)
            loss = l_db + self.anchor_weight * l_anchor
            metrics = dict(metrics0, num_transitions=float(len(ks)), loss_db=float(l_db.detach()),
                           loss_anchor=float(l_anchor.detach()), **(soc.metrics() if soc is not None else {}))
            yield LossOutput(loss=loss, metrics=metrics)
