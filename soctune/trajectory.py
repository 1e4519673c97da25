"""The one sampling loop (:func:`rollout`) and the :class:`Trajectory` record it returns.

Every solver, sampler and metric in soctune samples through :func:`rollout`; replaying a
trajectory's recorded noise reproduces its states exactly, which is what lets solvers
recompute a step's mean (with a graph, under the base model, …) after the fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .distributed import current_shard
from .models.base import Denoiser
from .registry import SoctuneError
from .sde.base import Process, StepOutput

RewardFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class GradSpec:
    """Which steps of a rollout keep the autograd graph.

    ``none``: no step. ``last``: the last ``k`` executed steps (stop-gradient before them,
    DRaFT-K). ``all``: every step, each wrapped in gradient checkpointing when ``checkpoint``
    (memory O(1) in K at the price of one extra forward per step).
    """

    mode: Literal["none", "last", "all"] = "none"
    k: int = 1
    checkpoint: bool = True

    @classmethod
    def none(cls) -> "GradSpec":
        return cls("none")

    @classmethod
    def last(cls, k: int = 1) -> "GradSpec":
        return cls("last", k=k)

    @classmethod
    def all(cls, checkpoint: bool = True) -> "GradSpec":
        return cls("all", checkpoint=checkpoint)

    def keeps_graph(self, k: int, n_steps: int) -> bool:
        if self.mode == "all":
            return True
        return self.mode == "last" and k >= n_steps - self.k


@dataclass
class Trajectory:
    """A recorded rollout of K' ≤ K steps (K' < K when stopped early).

    Shapes: ts [K'+1] (float64 generation times), xs [K'+1, B, *S] (``xs[0]`` the noise x_0),
    noises / means / x1_hats [K', B, *S] (``x1_hats[k]`` the data estimate x̂₁ predicted at step
    k), stds [K'] (per-step std, 0 for deterministic steps). ``states[k]`` is the process state
    entering step k (constants, e.g. the previous x̂₁ of a multistep solver). ``x_final`` and
    ``x1_hat_final`` (x̂₁ predicted at the last executed step) carry the autograd graph
    requested by the rollout's :class:`GradSpec`; every other tensor is detached.
    """

    ts: Tensor
    xs: Tensor
    noises: Tensor
    means: Tensor
    stds: Tensor
    x1_hats: Tensor | None
    states: list[dict[str, Tensor]]
    cond: Any
    prediction_type: str
    x_final: Tensor
    x1_hat_final: Tensor | None = None
    reward: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.noises.shape[0]

    @property
    def batch_size(self) -> int:
        return self.xs.shape[1]

    def log_probs(self) -> Tensor:
        """log N(x_{k+1}; m_k, s_k² I) per step and sample, [K', B]; steps with s_k = 0 are 0."""
        out = torch.zeros(self.num_steps, self.batch_size, dtype=self.xs.dtype, device=self.xs.device)
        for k in range(self.num_steps):
            if float(self.stds[k]) > 0:
                out[k] = Process.log_prob(self.xs[k + 1], self.means[k], self.stds[k])
        return out

    def stochastic_steps(self) -> list[int]:
        """Indices of steps with s_k > 0 (the ones that carry control cost / log-density)."""
        return [k for k in range(self.num_steps) if float(self.stds[k]) > 0]


def model_step(process: Process, model: Denoiser, x: Tensor, k: int, cond: Any,
               state: dict[str, Tensor]) -> StepOutput:
    """One evaluation of the mean map: pred = model(x_k, t_k, cond), then the process's kernel.

    x: [B, *S]. Returns the step's (mean, std, x̂₁, next state) with the raw prediction [B, *S]
    in ``.pred`` (output regularisers compare it with the base's). Differentiable in x and in
    the model's parameters when called under grad.
    """
    tb = torch.full((x.shape[0],), process.model_time(k), dtype=x.dtype, device=x.device)
    pred = model(x, tb, cond)
    out = process.step_kernel(x, k, pred, state, model.prediction_type)
    out.pred = pred
    return out


def base_states(process: Process, model: Denoiser, traj: Trajectory) -> list[dict[str, Tensor]]:
    """The step states the BASE chain carries along this trajectory's states: ``[K']`` dicts like
    ``traj.states`` (which are the rolled-out model's own).

    A multistep kernel (order-2 dpmpp-sde) reads the previous step's x̂₁ from its state. The base
    chain's step k is N(m_base(x_k; x̂₁^base(x_{k−1})), s_k²I), so the path KL of the fine-tuned chain
    to the base chain — the control u_k = (m_θ − m_base)/s_k every tilt solver regresses or costs —
    needs the base mean with the BASE model's previous x̂₁, not the fine-tuned one's (with the
    fine-tuned one the previous step's correction re-enters step k's mean unpaid). For a process
    without step state (every order-1 kernel) this is ``traj.states`` itself and costs nothing;
    otherwise one no-grad base forward per step on the whole batch, computed once per trajectory
    (cached in ``traj.extras`` per model; the base is frozen). The states are constants (detached), like
    ``traj.states``.
    """
    if not any(traj.states):
        return traj.states
    key = ("base_states", id(model))  # a guided and an unguided view of one model differ
    cached = traj.extras.get(key)
    if cached is not None:
        return cached
    out: list[dict[str, Tensor]] = []
    state = process.init_state()
    with torch.no_grad(), model.base():
        for k in range(traj.num_steps):
            out.append({name: v.detach() for name, v in state.items()})
            if k + 1 < traj.num_steps:
                state = model_step(process, model, traj.xs[k], k, traj.cond, state).state
    traj.extras[key] = out
    return out


def step_prediction_coefficient(process: Process, k: int, x: Tensor, state: dict[str, Tensor],
                                prediction_type: str) -> float:
    """c_k = ∂m_k/∂pred: the step kernel's response to a unit change of the model prediction,
    probed at the state x [1,*S] — one number, which presumes m_k(pred) = a + c_k·pred with the
    same c_k for every dimension (true of the built-in processes without clipping). Checked here:
    the slope must be the same in every dimension (a per-dimension kernel has none) and the same
    from pred = 1 to 2 as from 0 to 1 (a scheduler with ``clip_sample`` clamps x̂₁ and is not
    affine); otherwise a one-line :class:`SoctuneError` names the options that need no c_k."""
    m = [process.step_kernel(x, k, torch.full_like(x, v), state, prediction_type).mean.double() for v in (0.0, 1.0, 2.0)]
    d1, d2 = m[1] - m[0], m[2] - m[1]
    c = float(d1.mean())
    # float32 means: differences of numbers of size |m| carry ~1e-7·|m| rounding; a clip changes the
    # slope by O(c), far above this tolerance
    tol = 1e-3 * abs(c) + 1e-6 * float(m[0].abs().max()) + 1e-9
    if float((d1 - c).abs().max()) > tol or float((d2 - d1).abs().max()) > tol:
        raise SoctuneError(
            f"process '{getattr(process, 'registered_name', type(process).__name__)}': the step mean at step {k} is "
            "not affine in the model prediction with one slope for every dimension (a clipped x̂₁, e.g. "
            "clip_sample=true, or a per-dimension kernel), so steps cannot be weighted in prediction units; set "
            "clip_sample=false in the scheduler config, or pass step_weighting='am' (adjoint-matching) / 'variance' "
            "(nabla-db) and use a plain CorrectedDenoiser instead of ControlGainDenoiser")
    return c


def prediction_coefficients(process: Process, traj: "Trajectory") -> Tensor:
    """c_k of every step, [K] float64 (:func:`step_prediction_coefficient` on the first recorded
    state of each step). Solvers use it to express a mean-space residual in prediction units
    (pred_θ − pred_base = c_k⁻¹(m_θ − m_base))."""
    return torch.tensor([step_prediction_coefficient(process, k, traj.xs[k][:1], traj.states[k], traj.prediction_type)
                         for k in range(traj.num_steps)], dtype=torch.float64)


def rollout(process: Process, model: Denoiser, *, batch_size: int | None = None,
            sample_shape: tuple[int, ...] | None = None, cond: Any = None, x_init: Tensor | None = None,
            noises: Tensor | None = None, generator: torch.Generator | None = None,
            grad: GradSpec = GradSpec(), stop_at: int | None = None, reward_fn: RewardFn | None = None,
            device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
            callback: Callable[[int, Tensor], None] | None = None) -> Trajectory:
    """Sample the discrete chain x_{k+1} = m_k + s_k ξ_k with ``model`` and record it.

    Args:
        process: the discretised SDE.
        model: the denoiser (wrap in ``with model.base():`` for the base process).
        batch_size, sample_shape: B and S when ``x_init`` is not given (x_0 from the prior).
        cond: conditioning passed to the model untouched (class labels, text embeddings).
        x_init: [B, *S] start state (overrides the prior).
        noises: [K, B, *S] recorded ξ to replay (or [K'] for a shorter rollout); drawn from
            ``generator`` otherwise.
        grad: which steps keep the autograd graph.
        stop_at: execute only steps 0 … stop_at−1 (ReFL's early stop).
        reward_fn: r(x [B,*S], cond) -> [B] evaluated on the final state (with its graph).
        callback: called as ``callback(k, x_{k+1})`` after each step (progress bars).

    Returns:
        the :class:`Trajectory`.
    """
    process.check_model(model)
    n = process.num_steps if stop_at is None else int(stop_at)
    if not 0 < n <= process.num_steps:
        raise SoctuneError(f"stop_at must be in 1..{process.num_steps}, got {stop_at}")
    # data-parallel training (soctune.distributed.batch_shard): draw the prior and the noise of the
    # whole global batch and keep this rank's rows, so a sample's noise depends on its global index only
    shard = current_shard(batch_size) if x_init is None and noises is None else None
    if x_init is None:
        sample_shape = sample_shape if sample_shape is not None else getattr(model, "sample_shape", None)
        if batch_size is None or sample_shape is None:
            raise SoctuneError("rollout needs x_init or both batch_size and sample_shape (or a model that knows its "
                               "sample_shape)")
        n_draw = batch_size if shard is None else shard.total
        x = process.prior((n_draw, *sample_shape), generator=generator, device=device, dtype=dtype)
        x = x if shard is None else shard.take(x)
    else:
        x = x_init
    if noises is not None and noises.shape[0] < n:
        raise SoctuneError(f"replay has {noises.shape[0]} noise draws for {n} steps")

    xs, means, x1_hats, stds, states, drawn = [x.detach()], [], [], [], [], []
    state = process.init_state()
    out: StepOutput | None = None
    for k in range(n):
        if noises is not None:
            xi = noises[k]
        elif shard is None:
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            xi = shard.take(torch.randn(shard.global_shape(x.shape), generator=generator, device=x.device,
                                        dtype=x.dtype))
        states.append({key: v.detach() for key, v in state.items()})
        if not grad.keeps_graph(k, n):
            with torch.no_grad():
                out = model_step(process, model, x, k, cond, state)
                x_new = out.mean + out.std * xi
        elif grad.mode == "all" and grad.checkpoint and torch.is_grad_enabled():
            out, x_new = _checkpointed_step(process, model, x, k, cond, state, xi)
        else:
            out = model_step(process, model, x, k, cond, state)
            x_new = out.mean + out.std * xi
        state = out.state
        x = x_new
        xs.append(x.detach())
        means.append(out.mean.detach())
        stds.append(out.std.detach().reshape(()))
        if out.x1_hat is not None:
            x1_hats.append(out.x1_hat.detach())
        drawn.append(xi)
        if callback is not None:
            callback(k, x.detach())

    assert out is not None
    traj = Trajectory(
        ts=process.ts[: n + 1].detach(), xs=torch.stack(xs), noises=torch.stack(drawn), means=torch.stack(means),
        stds=torch.stack(stds), x1_hats=torch.stack(x1_hats) if len(x1_hats) == n else None, states=states,
        cond=cond, prediction_type=model.prediction_type, x_final=x, x1_hat_final=out.x1_hat,
    )
    if reward_fn is not None:
        traj.reward = reward_fn(x, cond)
    return traj


def _checkpointed_step(process: Process, model: Denoiser, x: Tensor, k: int, cond: Any,
                       state: dict[str, Tensor], xi: Tensor) -> tuple[StepOutput, Tensor]:
    keys = sorted(state)
    next_keys: list[str] = []  # filled by the first (forward) execution of fn
    has_x1_hat: list[bool] = []  # checkpoint outputs must be tensors; remember whether x̂₁ was None

    def fn(x_in: Tensor, *state_vals: Tensor) -> tuple[Tensor, ...]:
        o = model_step(process, model, x_in, k, cond, dict(zip(keys, state_vals)))
        x1_hat = o.x1_hat if o.x1_hat is not None else torch.zeros_like(x_in)
        next_keys[:] = sorted(o.state)
        has_x1_hat[:] = [o.x1_hat is not None]
        assert o.pred is not None
        return (o.mean, o.std, x1_hat, o.pred, o.mean + o.std * xi, *[o.state[key] for key in next_keys])

    mean, std, x1_hat, pred, x_new, *nxt = checkpoint(fn, x, *[state[key] for key in keys], use_reentrant=False)
    return StepOutput(mean=mean, std=std, x1_hat=x1_hat if has_x1_hat[0] else None, state=dict(zip(next_keys, nxt)),
                      pred=pred), x_new
