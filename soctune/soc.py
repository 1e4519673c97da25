"""Stochastic-optimal-control metrics of a model on its process's discrete chain.

A fine-tuned chain x_{k+1} = m_θ(x_k) + s_k ξ_k differs from the base chain only through its step
means, so each stochastic step carries the control (in units of the step's noise)

    u_k = (m_θ(x_k) − m_base(x_k)) / s_k,

whose KL cost is ½‖u_k‖². For a continuous SDE dX = (b + σu)dt + σdW discretised by
Euler–Maruyama, u_k = √Δt_k·u(x_k, t_k), so u_k/√Δt_k is the control in the SDE's units.

* :func:`soc_cost`: J = E[Σ_k ½‖u_k‖² + Σ_k Δt_k f(x_k, t_k) − λ r(x_K)] on the model's own rollouts
  (:func:`soc_costs`: each rollout's cost, to compare two models on the same noise);
* :func:`soc_lower_bound`: J*_K = −log E_base[exp(λ r(x_K) − Σ_k Δt_k f(x_k, t_k))], the least J any
  control of this K-step chain reaches (Donsker–Varadhan), by Monte Carlo over base rollouts;
* :func:`path_costs` / :func:`cost_summary`: the same from rollouts a caller already drew (``soctune
  evaluate`` reports J, J*_K and the gap of a run, and with :class:`StepCosts` the step that costs most);
* :func:`control_l2_error`: E[Σ_k ‖u_k/√Δt_k − u*(x_k, t_k)‖² Δt_k] on rollouts of the learned control
  against a known optimal control u*, and the same ratio for the zero control.

A running state cost f enters only for processes that declare one (``has_running_cost = True``
and ``running_cost(x [B,*S], t) -> [B]``, e.g. :mod:`soctune.problems`); f is evaluated at the left
end of each step, as the discrete adjoint sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .models.base import Denoiser, SwitchableDenoiser
from .registry import SoctuneError
from .sde.base import Process
from .trajectory import Trajectory, base_states, model_step, rollout

RewardFn = Callable[[Tensor, Any], Tensor]
#: u*(x [B, *S], t) -> [B, *S], the optimal control in the SDE's units
ControlFn = Callable[[Tensor, float], Tensor]

#: samples per rollout chunk (bounds memory: K+1 states of this many samples at a time)
CHUNK = 4096


@dataclass(frozen=True)
class ControlL2Error:
    """E[Σ_k ‖u_k/√Δt_k − u*(x_k, t_k)‖² Δt_k] (``error``, with its standard error ``error_se``), the
    same for the zero control on the same states (``zero_error`` = E[Σ_k ‖u*‖² Δt_k]), and
    ``relative`` = error / zero_error (0: the optimum; 1: no better than u = 0).
    ``relative_rms`` = √relative, the ratio of root-mean-square errors.
    Where the error sits, each a share of ``zero_error`` (so each sums to ``relative``): ``by_step``
    [one per stochastic step, in order] and ``by_coord`` [one per number of the flattened state]."""

    error: float
    error_se: float
    zero_error: float
    relative: float
    by_step: tuple[float, ...] = ()
    by_coord: tuple[float, ...] = ()

    @property
    def relative_rms(self) -> float:
        return math.sqrt(self.relative)


@dataclass(frozen=True)
class StepCosts:
    """Where a chain's control cost sits: ``costs`` [K, n] float64, ½‖u_k‖² per step of n rollouts
    (:func:`step_control_costs`), the grid ``ts`` [K+1] and each step's noise ``stds`` [K] (s_k), the
    state size ``dim`` (numbers per sample)."""

    costs: Tensor
    ts: tuple[float, ...]
    stds: tuple[float, ...]
    dim: int

    def summary(self) -> dict[str, Any]:
        """``control_cost_by_step``: E[½‖u_k‖²] per step [K]; ``costliest_step``: the step k with the
        largest E[½‖u_k‖²], its times (t_k, t_{k+1}), noise s_k, that cost, and the root-mean-square
        mean shift per number that buys it, √(E‖m_θ − m_base‖²/dim) = s_k·√(2·E[½‖u_k‖²]/dim).

        Why: on a kernel whose last stochastic step has s_k ≪ the other steps' (the DDIM/ancestral
        step into the schedule's smallest noise level), a shift of the mean too small to see in a
        sample costs ½‖Δm‖²/s_k² nats; that one step can carry nearly all of J − J*_K."""
        per_step = self.costs.mean(1)
        k = int(per_step.argmax())
        cost = float(per_step[k])
        return {"control_cost_by_step": [float(v) for v in per_step],
                "costliest_step": {"step": k, "t": [self.ts[k], self.ts[k + 1]], "noise_std": self.stds[k],
                                   "control_cost": cost,
                                   "mean_shift_rms": self.stds[k] * math.sqrt(2 * cost / max(self.dim, 1))}}

    @staticmethod
    def of(process: Process, model: Denoiser, traj: Trajectory) -> "StepCosts":
        """One rollout batch's :class:`StepCosts`, costs on the CPU (concatenate batches with :meth:`cat`)."""
        return StepCosts(step_control_costs(process, model, traj).cpu(), tuple(float(t) for t in traj.ts),
                         tuple(float(s) for s in traj.stds), math.prod(traj.xs.shape[2:]))

    def cat(self, other: "StepCosts") -> "StepCosts":
        return StepCosts(torch.cat([self.costs, other.costs], 1), self.ts, self.stds, self.dim)


class ControlFunctionModel(SwitchableDenoiser):
    """A control given as a function, as a model for the ``control`` processes
    (:class:`~soctune.sde.euler_maruyama.EulerMaruyama`): forward(x [B,*S], t [B]) = u(x, t_0) in x's
    dtype (the whole batch is at one time, as in every rollout); ``base()`` is the zero control.
    Use it to evaluate a known control (e.g. a problem's ``optimal_control``) with these metrics."""

    prediction_type = "control"

    def __init__(self, control: ControlFn) -> None:
        super().__init__()
        self.control = control

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not self._adapt:
            return torch.zeros_like(x)
        return self.control(x, float(t.reshape(-1)[0])).to(x.dtype)


def _check(n: int, reward_scale: float | None = None) -> None:
    if int(n) < 2:
        raise SoctuneError(f"n must be ≥ 2 samples (a standard error needs two), got {n}")
    if reward_scale is not None and not math.isfinite(reward_scale):
        raise SoctuneError(f"reward_scale must be a finite number, got {reward_scale}")


def _chunks(n: int) -> list[int]:
    return [min(CHUNK, n - i) for i in range(0, int(n), CHUNK)]


def step_controls(process: Process, model: Denoiser, traj: Trajectory, cond: Any = None) -> dict[int, Tensor]:
    """u_k = (m_θ(x_k) − m_base(x_k)) / s_k on every stochastic step k of a rollout of ``model``:
    {k: [B, *S]} (m_θ is the rollout's recorded mean; m_base one base forward per step, with the base
    chain's own step state, :func:`~soctune.trajectory.base_states`)."""
    out: dict[int, Tensor] = {}
    states = base_states(process, model, traj)
    with torch.no_grad(), model.base():
        for k in traj.stochastic_steps():
            m_base = model_step(process, model, traj.xs[k], k, cond, states[k]).mean
            out[k] = (traj.means[k] - m_base) / traj.stds[k]
    return out


def running_cost_fn(process: Process) -> Callable[[Tensor, float], Tensor] | None:
    """The process's running state cost f(x [B,*S], t) -> [B], or None when it declares none
    (``has_running_cost`` false or absent: a terminal-reward problem, every diffusion model)."""
    return getattr(process, "running_cost", None) if getattr(process, "has_running_cost", False) else None


def running_costs(process: Process, traj: Trajectory) -> Tensor:
    """Σ_k Δt_k f(x_k, t_k) per sample, [B] float64 (zeros for a process without a running cost)."""
    total = torch.zeros(traj.batch_size, dtype=torch.float64, device=traj.xs.device)
    f = running_cost_fn(process)
    if f is None:
        return total
    for k in range(traj.num_steps):
        total += float(traj.ts[k + 1] - traj.ts[k]) * f(traj.xs[k], float(traj.ts[k])).double()
    return total


def _reward(reward: RewardFn, x: Tensor, cond: Any) -> Tensor:
    r = reward(x.float(), cond)
    if r.shape != (x.shape[0],):
        raise SoctuneError(f"the reward must return one value per sample [B]={x.shape[0]}, got {tuple(r.shape)}")
    return r.double()


def _mean_se(values: Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def step_control_costs(process: Process, model: Denoiser, traj: Trajectory,
                       base_means: Tensor | None = None) -> Tensor:
    """½‖u_k‖² per step and rollout, [K, B] float64 (0 on deterministic steps): the path KL of a
    rollout of ``model`` to the base chain, step by step. ``base_means`` [K, B, *S]: the base chain's step
    means at the rollout's states when the caller has them (a solver's sweep computed them; no forward),
    else one base forward per step (:func:`step_controls`)."""
    costs = torch.zeros(traj.num_steps, traj.batch_size, dtype=torch.float64, device=traj.xs.device)
    if base_means is None:
        controls = step_controls(process, model, traj, traj.cond)
    else:
        controls = {k: (traj.means[k] - base_means[k]) / traj.stds[k] for k in traj.stochastic_steps()}
    for k, u in controls.items():
        costs[k] = 0.5 * u.flatten(1).double().pow(2).sum(1)
    return costs


def path_costs(process: Process, model: Denoiser, traj: Trajectory, rewards: Tensor, reward_scale: float,
               controlled: bool = True) -> Tensor:
    """The SOC cost of each rollout, [B] float64: Σ_k ½‖u_k‖² (when ``controlled``; 0 for a rollout of the
    base itself, :func:`step_control_costs`) + Σ_k Δt_k f(x_k, t_k) − λ r(x_K), with ``rewards`` [B] the
    rollout's r(x_K).

    J = E[path cost] on rollouts of ``model``; on BASE rollouts (``controlled=False``)
    J*_K = −log E[exp(−path cost)] (:func:`cost_summary`)."""
    cost = running_costs(process, traj) - reward_scale * rewards.to(device=traj.xs.device, dtype=torch.float64)
    if controlled:
        cost = cost + step_control_costs(process, model, traj).sum(0)
    return cost


def lower_bound_of(base_costs: Tensor) -> tuple[float, float]:
    """J*_K = −log mean exp(−c_i) over the path costs c_i [n] of BASE rollouts, and the delta-method
    standard error sd(e^{−c_i}) / (√n·mean e^{−c}) (logsumexp: no overflow)."""
    ell = -base_costs.double()
    log_mean = torch.logsumexp(ell, 0) - math.log(ell.numel())
    rel = torch.exp(ell - log_mean)  # e^{ℓ_i} / mean e^{ℓ}
    return float(-log_mean), float(rel.std() / math.sqrt(ell.numel()))


def cost_summary(costs: Tensor, base_costs: Tensor, step_costs: StepCosts | None = None) -> dict[str, Any]:
    """``soctune evaluate``'s SOC report from the path costs [n] of fine-tuned and of base rollouts
    (:func:`path_costs`): J (``soc_cost``), the base's own J (``base_soc_cost``: no control cost), J*_K
    (``soc_lower_bound``), J − J*_K (``soc_gap``, ≥ 0 up to noise: the gap is KL(fine-tuned path ‖ tilted
    base path)) and their standard errors; with the fine-tuned rollouts' ``step_costs`` also where the
    control cost sits (:meth:`StepCosts.summary`: ``control_cost_by_step`` and ``costliest_step``)."""
    j, j_se = _mean_se(costs.double())
    j_base, j_base_se = _mean_se(base_costs.double())
    lb, lb_se = lower_bound_of(base_costs)
    out: dict[str, Any] = {"soc_cost": j, "soc_cost_se": j_se, "base_soc_cost": j_base, "base_soc_cost_se": j_base_se,
                           "soc_lower_bound": lb, "soc_lower_bound_se": lb_se, "soc_gap": j - lb,
                           "soc_gap_se": math.hypot(j_se, lb_se)}
    if step_costs is not None:
        out.update(step_costs.summary())
    return out


@torch.no_grad()
def soc_costs(process: Process, model: Denoiser, reward: RewardFn, reward_scale: float, n: int,
              generator: torch.Generator, *, sample_shape: tuple[int, ...], cond: Any = None) -> Tensor:
    """The path cost Σ_k ½‖u_k‖² + Σ_k Δt_k f(x_k, t_k) − λ r(x_K) of each of n rollouts of ``model``, [n]
    float64 (:func:`soc_cost` is their mean).

    Two models rolled out from generators with the same seed draw the same prior and step noise, so the
    difference of their costs, rollout by rollout, gives J_a − J_b with a PAIRED standard error
    sd(c_a − c_b)/√n — far below either J's own when the controls are close (common random numbers).
    Args as :func:`soc_cost`."""
    _check(n, reward_scale)
    totals = []
    for b in _chunks(n):
        traj = rollout(process, model, batch_size=b, sample_shape=sample_shape, cond=cond, generator=generator)
        totals.append(path_costs(process, model, traj, _reward(reward, traj.xs[-1], cond), reward_scale))
    return torch.cat(totals)


def soc_cost(process: Process, model: Denoiser, reward: RewardFn, reward_scale: float, n: int,
             generator: torch.Generator, *, sample_shape: tuple[int, ...], cond: Any = None) -> tuple[float, float]:
    """J = E[Σ_k ½‖u_k‖² + Σ_k Δt_k f(x_k, t_k) − λ r(x_K)] over n rollouts of ``model``, and its standard error.

    Args:
        process, model: the chain and the (fine-tuned) model; the base is ``with model.base()``.
        reward: r(x [B,*S], cond) -> [B]. reward_scale: λ.
        n: rollouts (drawn in chunks of :data:`CHUNK`). generator: their randomness.
        sample_shape: S.
    Returns:
        (J, s.e. of J) in nats.
    """
    return _mean_se(soc_costs(process, model, reward, reward_scale, n, generator, sample_shape=sample_shape,
                              cond=cond))


@torch.no_grad()
def soc_lower_bound(process: Process, model: Denoiser, reward: RewardFn, reward_scale: float, n: int,
                    generator: torch.Generator, *, sample_shape: tuple[int, ...], cond: Any = None
                    ) -> tuple[float, float]:
    """J*_K = −log E_base[exp(ℓ)], ℓ = λ r(x_K) − Σ_k Δt_k f(x_k, t_k), over n rollouts of the BASE chain
    (``model`` with its adaptation off), and the delta-method standard error
    s.e. = sd(e^{ℓ_i})/(√n·mean(e^{ℓ_i})), computed with logsumexp.

    Every control of the K-step chain has J ≥ J*_K (equality for the tilted path measure); the
    estimate is biased upwards by about s.e.²/2 and is only trustworthy while the s.e. is small.

    Returns:
        (J*_K, s.e.) in nats.
    """
    _check(n, reward_scale)
    costs = []
    with model.base():
        for b in _chunks(n):
            traj = rollout(process, model, batch_size=b, sample_shape=sample_shape, cond=cond, generator=generator)
            costs.append(path_costs(process, model, traj, _reward(reward, traj.xs[-1], cond), reward_scale,
                                    controlled=False))
    return lower_bound_of(torch.cat(costs))


@torch.no_grad()
def control_l2_error(process: Process, model: Denoiser, optimal_control: ControlFn, n: int,
                     generator: torch.Generator, *, sample_shape: tuple[int, ...], cond: Any = None) -> ControlL2Error:
    """The control L2 error on n rollouts of the learned control (SOC-matching's metric):

        error = E[Σ_k ‖u_k/√Δt_k − u*(x_k, t_k)‖² Δt_k],   zero_error = E[Σ_k ‖u*(x_k, t_k)‖² Δt_k],

    over the stochastic steps, with u_k = (m_θ − m_base)/s_k (so u_k/√Δt_k is the control in the SDE's
    units for an Euler–Maruyama chain) and u*(x [B,*S], t) -> [B,*S] the continuous-time optimal control
    at the step's left end. Both sums are over the same states, so ``relative`` = error / zero_error
    is 1 for the zero control and 0 for the optimum.
    """
    _check(n)
    errs, zeros = [], []
    by_step: dict[int, Tensor] = {}  # Σ over rollouts of each step's squared error (on the device: no sync per step)
    by_coord: Tensor | None = None
    for b in _chunks(n):
        traj = rollout(process, model, batch_size=b, sample_shape=sample_shape, cond=cond, generator=generator)
        err = torch.zeros(b, dtype=torch.float64, device=traj.xs.device)
        zero = torch.zeros_like(err)
        for k, u in step_controls(process, model, traj, cond).items():
            dt = float(traj.ts[k + 1] - traj.ts[k])
            u_star = optimal_control(traj.xs[k], float(traj.ts[k])).double().reshape(u.shape)
            sq = dt * (u.double() / math.sqrt(dt) - u_star).flatten(1).pow(2)  # [b, numbers]
            err += sq.sum(1)
            zero += dt * u_star.flatten(1).pow(2).sum(1)
            by_step[k] = by_step[k] + sq.sum() if k in by_step else sq.sum()
            by_coord = sq.sum(0) if by_coord is None else by_coord + sq.sum(0)
        errs.append(err)
        zeros.append(zero)
    error, error_se = _mean_se(torch.cat(errs))
    zero_error = float(torch.cat(zeros).mean())
    if zero_error <= 0:
        raise SoctuneError("the optimal control is zero on every visited state: the relative error is undefined")
    total = n * zero_error
    coords = () if by_coord is None else tuple(float(v) / total for v in by_coord.cpu())
    return ControlL2Error(error, error_se, zero_error, error / zero_error,
                          tuple(float(by_step[k]) / total for k in sorted(by_step)), coords)
