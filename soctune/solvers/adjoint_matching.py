"""Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen 2024), on the trajectory interface.

The fine-tuned chain x_{k+1} = m_θ(x_k) + s_k ξ_k differs from the base chain only through its
means, so each stochastic step carries the control u_k = (m_θ(x_k) − m_base(x_k)) / s_k and the
KL (control cost) ½‖u_k‖². The SOC problem

    J(θ) = E[Σ_k ½‖u_k‖² − λ r(x_K)]  ≥  −log E_base[exp(λ r(x_K))] = −log Z

is minimised by the path measure p_base(x_{0:K})·exp(λ r(x_K))/Z; when the base chain is
memoryless (x_0 independent of x_K) its last marginal is the tilt p_base·exp(λ r)/Z.

Lean adjoint (no graph kept, one VJP per step through the BASE mean map, base model without
classifier-free guidance):

    ã_K = −λ ∇r(x_K),   ã_k = ∇_{x_k} ⟨m_base(x_k), ã_{k+1}⟩.

Loss (regression of the control on the adjoint, over stochastic steps k):

    L = Σ_k ‖u_k + s_k ã_{k+1}‖².

Why this target is exact for the discrete chain: the optimal kernel at step k is
p*(x_{k+1} | x_k) ∝ N(x_{k+1}; m_base, s_k²) e^{−V_{k+1}(x_{k+1})}, whose mean is (Stein's
lemma) m_base − s_k² E*[∇V_{k+1}(x_{k+1}) | x_k]; and ∇V_{k+1}(x) = E*[ã_{k+1} | x_{k+1} = x]
because ã is the pathwise (reparameterised, noise ξ + u held fixed) gradient of −λ r through the
base chain. So the minimiser u_k = −s_k E[ã_{k+1} | x_k] matches the mean of the optimal kernel.
In continuous time s_k ≈ σ√Δt and u_k ≈ u√Δt, so the sum is the Riemann sum of the paper's
½∫‖u + σᵀã‖²dt (up to the factor ½): every step gets weight 1 (and the random sub-sample is
reweighted to keep the estimator unbiased).

Score-function target (``estimator="score"``). The basic adjoint below is the pathwise gradient
of the sampled path's cost-to-go C_{k+1} = Σ_{j>k} ½‖u_j‖² − λ r(x_K) with respect to
x_{k+1} = m_θ(x_k) + s_k ξ_k (later noises held fixed), so Stein's identity for the Gaussian ξ_k gives

    −s_k E[a_{k+1} | x_k] = −E[(C_{k+1} − b) ξ_k | x_k]        (any b independent of ξ_k),

an estimate of the same conditional mean, for any control, without a Jacobian: no reward
gradient, no VJP (one base forward per step), and finite variance whenever C has. The pathwise
adjoint through a base chain whose noise-free map is nearly discontinuous (a watershed between
separated modes) is like the derivative of a smoothed step: P(‖ã‖ > y) ∝ 1/y, infinite variance,
and a regression on it sees too small a target (benchmarks/adjoint_tails.py). The score target's
variance grows with Var(C) and with the dimension instead, so it suits low-dimensional,
multimodal problems, not images: on the shipped 8×8 digits model it drives the reward down where
the pathwise adjoint turns the model into a three-generator (``estimator="auto"`` picks by the state
size, :meth:`AdjointMatching.estimator_for`).

Two control variates, both exact (the target's conditional mean given x_k is unchanged). Measured
per step on the ground-truth mixtures (benchmarks/score_baseline.py, numbers in benchmarks/NOTES.md),
the plain target's second moment is tens to hundreds of times the squared control it estimates;
most of that is not ξ_k's doing:
* the cost-to-go (``cost_to_go="log-ratio"``): adding ⟨u_j, ξ_j⟩ for every later step (zero mean
  given x_j, and ξ_j is independent of ξ_k) turns C_{k+1} into the path's own log dP^u/dP^base from
  k+1 on, minus λr. Under the tilted path measure that is −log Z_{k+1}(x_{k+1}), a function of
  x_{k+1} alone: the later steps' noise, which dominates the plain target at early steps, cancels
  as the control approaches the optimum;
* the baseline (``baseline="state"``): the best b is E[C_{k+1} | x_k], and a path's cost-to-go
  varies far more with where x_k already is (which mode it is heading for) than with ξ_k.
  :func:`state_baseline` estimates it by a kernel regression of the batch's other C_{k+1} on their
  x_k, which matters most at mid and late steps.
``cost_to_go="quadratic"`` and ``baseline="mean"`` (leave-one-out batch mean) give the plain target.

The ``basic`` variant uses the full adjoint of the current control's cost instead,
a_k = ∇_{x_k}[⟨m_θ(x_k), a_{k+1}⟩ + ½‖u_k(x_k)‖²] (fine-tuned mean map, running cost), which has
the same fixed point but more variance and twice the model evaluations per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal

import torch
from torch import Tensor

from ..models.base import Denoiser
from ..registry import SoctuneError, warn_user
from ..sde.base import Process
from ..soc import running_cost_fn, running_costs, step_control_costs
from ..trajectory import GradSpec, Trajectory, base_states, model_step, prediction_coefficients, rollout
from .base import FinetuneContext, LossOutput, Solver, control_units, register_solver


@dataclass
class AdjointPass:
    """Result of the backward sweep over a trajectory of K steps.

    adjoints: [K+1, B, *S] (ã_0 … ã_K, ã_K = −λ∇r(x_K)). base_means: [K, B, *S], m_base(x_k)
    on the recorded states (detached). reward: [B] r(x_K) in float32.
    """

    adjoints: Tensor
    base_means: Tensor
    reward: Tensor


#: kernel bandwidths tried by :func:`state_baseline`, in units of the batch's per-coordinate spread
BASELINE_BANDWIDTHS: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)


def loo_mean(c: Tensor) -> Tensor:
    """Leave-one-out batch mean: c [B] -> [B], entry i the mean of the others (0 for B = 1)."""
    b = c.shape[0]
    return (c.sum() - c) / (b - 1) if b > 1 else torch.zeros_like(c)


def _kernel_regression(zq: Tensor, iq: Tensor, zr: Tensor, ir: Tensor, cr: Tensor, h: float,
                       chunk: int = 4096) -> Tensor:
    """Nadaraya–Watson means of cr [R] at the queries zq [Q, D] from the references zr [R, D],
    leaving out a query's own sample (iq [Q], ir [R]: sample indices) -> [Q]; h = ∞: their plain mean."""
    out = []
    for q0 in range(0, zq.shape[0], chunk):
        zc, ic = zq[q0:q0 + chunk], iq[q0:q0 + chunk]
        own = ic[:, None] == ir[None, :]
        if math.isinf(h):
            w = (~own).double()
        else:
            d2 = torch.cdist(zc, zr).pow(2) / zr.shape[1]
            # each row's nearest other sample at weight 1: the kernel cannot underflow to all zeros
            d2 = d2 - d2.masked_fill(own, math.inf).min(1, keepdim=True).values
            w = torch.exp(-d2 / (2 * h * h)).masked_fill(own, 0.0)
        out.append((w @ cr) / w.sum(1).clamp_min(1e-300))
    return torch.cat(out)


def state_baseline(x: Tensor, c: Tensor, bandwidths: tuple[float, ...] = BASELINE_BANDWIDTHS,
                   max_reference: int = 1024) -> Tensor:
    """A baseline for sample i's cost-to-go that depends on its state but not on its own noise:
    x [B, *S] (the states x_k), c [B] (the costs C_{k+1}) -> b [B] float64,

        b_i = Σ_{j≠i} w_ij c_j / Σ_{j≠i} w_ij,   w_ij = exp(−‖z_i − z_j‖² / (2 D h²)),

    z the batch's states standardised per coordinate (D numbers each), a Nadaraya–Watson estimate of
    E[C_{k+1} | x_k = x_i] from the other samples (at most ``max_reference`` of each half of the batch:
    cost B·2·max_reference distances). h is picked among ``bandwidths`` and h = ∞ (the plain mean) by
    leave-one-out error on the OTHER half of the batch — the even samples' h from the odd ones' costs
    and vice versa — so no b_i reads c_i, directly or through the choice of h, and
    E[(c_i − b_i) ξ_i | x_i] = E[c_i ξ_i | x_i] holds exactly. Batches under 8 take the leave-one-out mean."""
    n = c.shape[0]
    c = c.double()
    if n < 8:
        return loo_mean(c)
    z = x.reshape(n, -1).double()
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-12)
    idx = torch.arange(n, device=c.device)
    halves = (idx[0::2], idx[1::2])
    refs = tuple(h[:max_reference] for h in halves)
    ref = torch.cat(refs)
    out = torch.empty_like(c)
    for target, source in ((halves[0], refs[1]), (halves[1], refs[0])):
        errors = {h: float((c[source] - _kernel_regression(z[source], source, z[source], source, c[source], h))
                           .pow(2).mean()) for h in (*bandwidths, math.inf)}
        best = min(errors, key=errors.__getitem__)
        out[target] = _kernel_regression(z[target], target, z[ref], ref, c[ref], best)
    return out


@register_solver("adjoint-matching",
                 "Adjoint Matching (lean or basic): regress the control on the adjoint; samples p_base·e^{λr} on memoryless processes")
class AdjointMatching(Solver):
    """Adjoint Matching on any process's Gaussian step kernel (see the module docstring).

    Args:
        reward_scale: λ.
        variant: ``"lean"`` (adjoint through the base mean map, the paper's method) or
            ``"basic"`` (adjoint through the fine-tuned mean map plus the running control cost).
        num_loss_steps: how many stochastic steps enter the loss per iteration: ``None`` = all;
            otherwise ``num_last_steps`` last stochastic steps always plus random ones from the
            rest up to this total, reweighted so the loss stays an unbiased estimate of the sum.
        num_last_steps: the last stochastic steps always in the loss (the paper uses the last
            ones, where the control is largest relative to the noise).
        loss_clip: per-sample bound on the loss (0 = off); above it the sample's loss is scaled
            down to the bound, which keeps its gradient direction but bounds its size.
        reward_grad_clip: per-sample bound on ‖∇r(x_K)‖ (0 = off).
        step_weighting: ``"auto"`` (default): ``"am"`` for a model whose correction outputs the
            control (:class:`~soctune.models.control.ControlGainDenoiser`), ``"prediction"`` for
            a prediction correction (LoRA, :class:`~soctune.models.base.CorrectedDenoiser`) — the
            units in which the network's regression targets are O(1) at every step.
            ``"am"`` weighs every step 1 (the AM loss itself); ``"prediction"`` weighs
            step k by (s_k/c_k)², c_k = ∂m_k/∂pred, i.e. a uniform regression of the model
            prediction on its target pred_base − s_k² ã_{k+1}/c_k. Same minimiser, far better
            conditioned when the s_k span decades (the DDIM kernel's last stochastic step has s ≈ 0.001).
        bootstrap: β ∈ [0, 1], variance reduction of the adjoint (0 = the plain adjoint). Before
            each VJP the propagated vector a_{k+1} is mixed with the current control's estimate of
            its conditional mean, v_k = (1 − β_k) a_{k+1} + β_k (−u_k(x_k)/s_k), β_k = β min(1, ρ_k/median ρ), ρ_k = s_k²/|∂m_k/∂pred|
            (a TD(λ)-style return). The fixed point is unchanged (at the optimum E[a_{k+1} | x_k] =
            −u_k/s_k exactly), but the heavy tail of the pathwise adjoint — rare paths that pass
            near the watershed between modes carry most of its mean — is damped geometrically.
        estimator: ``"auto"`` (default, :meth:`estimator_for`: the score target on states of at
            most :attr:`SCORE_MAX_DIM` numbers, the pathwise adjoint above), ``"pathwise"`` (the
            adjoint of ``variant``, the paper's method) or ``"score"``
            (Stein's identity, see the module docstring: the regression target is
            −(C_{k+1} − b)ξ_k, whose conditional mean is the basic adjoint's; needs no reward
            gradient; ``variant``, ``bootstrap`` and ``reward_grad_clip`` do not apply).
        baseline: the score target's b: ``"state"`` (default, :func:`state_baseline`: an estimate
            of E[C_{k+1} | x_k] from the batch's other paths) or ``"mean"`` (the leave-one-out
            batch mean). Both leave the target's conditional mean unchanged; ``"state"`` has far
            less variance on multimodal problems (module docstring).
        cost_to_go: the score target's C_{k+1}: ``"log-ratio"`` (default) Σ_{j>k} log dP^u/dP^base of
            the path's later steps − λ r(x_K), i.e. Σ_{j>k} (½‖u_j‖² + ⟨u_j, ξ_j⟩) − λ r(x_K); or
            ``"quadratic"``, Σ_{j>k} ½‖u_j‖² − λ r(x_K). Same conditional mean (module docstring);
            the log-ratio cancels most of what the later steps' noise adds to the target.
    """

    wants_memoryless = True
    needs_stochastic = True
    supports_running_cost = True  # Δt∇f in the adjoint, Δt·f in the score target's cost-to-go
    #: ``estimator="auto"`` uses the score target up to this state size (numbers per sample). What is
    #: measured: the 2-D multimodal ground-truth mixtures pass only with the score target
    #: (tests/test_solver_ground_truth.py); on the 12 8-D random mixtures of benchmarks/ground_truth.py
    #: its runs end no further above the K-step bound J*_K than the pathwise adjoint's on any problem
    #: of either process, and much nearer on the one the pathwise adjoint stopped short on (benchmarks/
    #: NOTES.md, "the score target on 8-D states");
    #: the 64-D digits collapse with it (module docstring), and on unimodal 2-D linear-quadratic
    #: problems the pathwise adjoint is the better one (its target is then smooth):
    #: tests/test_user_soc.py and test_adjoint_matching.py's linear SOC problem record both. The SOC
    #: benchmark problems (d ≥ 10) use the pathwise adjoint.
    SCORE_MAX_DIM: ClassVar[int] = 8

    def __init__(self, reward_scale: float = 1.0, variant: Literal["lean", "basic"] = "lean",
                 num_loss_steps: int | None = None, num_last_steps: int = 0, loss_clip: float = 0.0,
                 reward_grad_clip: float = 0.0, step_weighting: Literal["auto", "am", "prediction"] = "auto",
                 bootstrap: float = 0.0, estimator: Literal["auto", "pathwise", "score"] = "auto",
                 baseline: Literal["state", "mean"] = "state",
                 cost_to_go: Literal["log-ratio", "quadratic"] = "log-ratio") -> None:
        super().__init__(reward_scale)
        if variant not in ("lean", "basic"):
            raise SoctuneError(f"variant must be 'lean' or 'basic', got '{variant}'")
        if num_loss_steps is not None and int(num_loss_steps) < 1:
            raise SoctuneError(f"num_loss_steps must be ≥ 1 or None (all steps), got {num_loss_steps}")
        if int(num_last_steps) < 0:
            raise SoctuneError(f"num_last_steps must be ≥ 0, got {num_last_steps}")
        if num_loss_steps is not None and int(num_last_steps) > int(num_loss_steps):
            raise SoctuneError(f"num_last_steps ({num_last_steps}) exceeds num_loss_steps ({num_loss_steps})")
        if not 0.0 <= bootstrap <= 1.0:
            raise SoctuneError(f"bootstrap must be in [0, 1], got {bootstrap}")
        if loss_clip < 0 or reward_grad_clip < 0:
            raise SoctuneError("loss_clip and reward_grad_clip must be ≥ 0 (0 = off)")
        if step_weighting not in ("auto", "am", "prediction"):
            raise SoctuneError(f"step_weighting must be 'auto', 'am' or 'prediction', got '{step_weighting}'")
        if estimator not in ("auto", "pathwise", "score"):
            raise SoctuneError(f"estimator must be 'auto', 'pathwise' or 'score', got '{estimator}'")
        if estimator == "score" and (variant != "lean" or bootstrap > 0 or reward_grad_clip > 0):
            raise SoctuneError("estimator='score' uses no adjoint: leave variant, bootstrap and reward_grad_clip at their defaults")
        if baseline not in ("state", "mean"):
            raise SoctuneError(f"baseline must be 'state' or 'mean', got '{baseline}'")
        if cost_to_go not in ("log-ratio", "quadratic"):
            raise SoctuneError(f"cost_to_go must be 'log-ratio' or 'quadratic', got '{cost_to_go}'")
        self.estimator = estimator
        self.baseline = baseline
        self.cost_to_go = cost_to_go
        self.variant = variant
        self.step_weighting = step_weighting
        self.bootstrap = float(bootstrap)
        self.num_loss_steps = None if num_loss_steps is None else int(num_loss_steps)
        self.num_last_steps = int(num_last_steps)
        self.loss_clip = float(loss_clip)
        self.reward_grad_clip = float(reward_grad_clip)

    def estimator_for(self, sample_shape: tuple[int, ...]) -> str:
        """The estimator used on states of shape S: ``estimator`` unless ``"auto"``, which takes
        the score target on states of at most :attr:`SCORE_MAX_DIM` numbers (low-dimensional,
        possibly multimodal problems, where the pathwise adjoint's heavy tail biases the fit) and
        the pathwise adjoint above (images: the score target's variance grows with the dimension)
        or whenever an adjoint-only option (``variant="basic"``, ``bootstrap``,
        ``reward_grad_clip``) is set."""
        if self.estimator != "auto":
            return self.estimator
        adjoint_only = self.variant != "lean" or self.bootstrap > 0 or self.reward_grad_clip > 0
        return "score" if math.prod(sample_shape) <= self.SCORE_MAX_DIM and not adjoint_only else "pathwise"

    # ---- checks ------------------------------------------------------------------------------
    @property
    def claims_tilt(self) -> bool:
        return True

    def check(self, process: Process, model: Denoiser) -> None:
        super().check(process, model)
        if not process.memoryless:
            warn_user(
                f"adjoint-matching on the non-memoryless process '{process.registered_name}' solves the SOC "
                "problem min E[Σ½‖u‖² − λr] but its samples are NOT the reward tilt p_base·exp(λr); "
                "use a memoryless process (fm-memoryless or ddpm with noise_scale=1) for the tilt")

    # ---- adjoint --------------------------------------------------------------------------------
    @staticmethod
    def reward_of(ctx: FinetuneContext, x: Tensor, cond: Any) -> Tensor:
        """r(x) [B] (the reward on float32 states [B, *S]), checked to give one value per sample."""
        r = ctx.reward(x, cond)
        if r.shape != (x.shape[0],):
            raise SoctuneError(f"the reward must return one value per sample [B]={x.shape[0]}, got {tuple(r.shape)}")
        return r

    def terminal_adjoint(self, ctx: FinetuneContext, x: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        """ã_K = −λ∇r(x_K) (reward and gradient in float32, optionally norm-clipped per sample).

        x: [B, *S]. Returns (ã_K [B, *S] in x's dtype, r(x_K) [B] float32)."""
        with torch.enable_grad():
            xf = x.detach().float().requires_grad_(True)
            r = self.reward_of(ctx, xf, cond)
            (g,) = torch.autograd.grad(r.sum(), xf)
        if self.reward_grad_clip > 0:
            norm = g.flatten(1).norm(dim=1).clamp(min=1e-12)
            g = g * (self.reward_grad_clip / norm).clamp(max=1.0).reshape(-1, *[1] * (g.dim() - 1))
        return (-self.reward_scale * g).to(x.dtype), r.detach()

    def adjoint_pass(self, ctx: FinetuneContext, traj: Trajectory, variant: str | None = None) -> AdjointPass:
        """Backward sweep k = K−1 … 0 over the recorded states, one VJP per step, no graph kept.

        lean:  ã_k = ∇_{x_k}⟨m_base(x_k), ã_{k+1}⟩.
        basic: a_k = ∇_{x_k}[⟨m_θ(x_k), a_{k+1}⟩ + ½‖(m_θ(x_k) − m_base(x_k))/s_k‖²] (the cost term on
        stochastic steps only). Process state (e.g. a multistep solver's previous x̂₁) is held
        constant: the rollout's own for m_θ, the base chain's (:func:`~soctune.trajectory.base_states`)
        for m_base, so that u_k = (m_θ − m_base)/s_k is the step of the path KL to the base chain.
        """
        variant = variant or self.variant
        model = ctx.model.unguided()
        process = ctx.process
        a, reward = self.terminal_adjoint(ctx, traj.xs[-1], traj.cond)
        K = traj.num_steps
        mix = self.bootstrap_weights(process, traj) if self.bootstrap > 0 else None
        b_states = base_states(process, model, traj)
        running = running_cost_fn(process)
        adjoints: list[Tensor] = [a]
        base_means: list[Tensor] = [torch.empty(0)] * K
        for k in range(K - 1, -1, -1):
            s = float(traj.stds[k])
            with torch.enable_grad():
                x = traj.xs[k].detach().requires_grad_(True)
                with model.base():
                    m_base = model_step(process, model, x, k, traj.cond, b_states[k]).mean
                m_ft = None
                if variant == "basic":
                    m_ft = model_step(process, model, x, k, traj.cond, traj.states[k]).mean
                v = a
                if mix is not None and mix[k] > 0:
                    # the current control's own estimate of E[a_{k+1} | x_k]: u_k = −s_k E[a_{k+1} | x_k]
                    m_theta = traj.means[k] if m_ft is None else m_ft.detach()
                    v = (1 - mix[k]) * a - mix[k] * (m_theta - m_base.detach()) / s**2
                if m_ft is None:
                    objective = (m_base * v).sum()
                else:
                    objective = (m_ft * v).sum()
                    if s > 0:
                        objective = objective + 0.5 * ((m_ft - m_base) / s).pow(2).sum()
                if running is not None:
                    # a running state cost f adds Δt_k∇f(x_k) to the adjoint (ã' = −∇bᵀã − ∇f)
                    objective = objective + float(traj.ts[k + 1] - traj.ts[k]) * running(x, float(traj.ts[k])).sum()
                (g,) = torch.autograd.grad(objective, x, allow_unused=True)
            # a mean map that ignores x_k (first step of a memoryless chain) has zero Jacobian
            a = torch.zeros_like(a) if g is None else g.detach()
            adjoints.append(a)
            base_means[k] = m_base.detach()
        adjoints.reverse()
        return AdjointPass(torch.stack(adjoints), torch.stack(base_means), reward)

    @torch.no_grad()
    def score_pass(self, ctx: FinetuneContext, traj: Trajectory) -> AdjointPass:
        """Stein form of the regression target, packed like an adjoint so the loss is unchanged:
        ``adjoints[k+1]`` = (C_{k+1} − b_k) ξ_k / s_k on stochastic steps (so −s_k·adjoints[k+1] is
        the target −(C_{k+1} − b_k)ξ_k), 0 elsewhere; C_{k+1} the path's cost-to-go per sample
        (``cost_to_go``: Σ_{j>k} (½‖u_j‖² + ⟨u_j, ξ_j⟩) − λ r(x_K), or without the ⟨u_j, ξ_j⟩), b_k its
        baseline (``baseline``: :func:`state_baseline` of x_k, or the leave-one-out batch mean).
        Shapes as :class:`AdjointPass`; one base forward per step."""
        model = ctx.model.unguided()
        reward = self.reward_of(ctx, traj.xs[-1].float(), traj.cond).detach()
        B, K = traj.batch_size, traj.num_steps
        b_states = base_states(ctx.process, model, traj)
        with model.base():
            base_means = torch.stack([model_step(ctx.process, model, traj.xs[k], k, traj.cond, b_states[k]).mean
                                      for k in range(K)])
        step_costs = step_control_costs(ctx.process, model, traj, base_means)
        cost_to_go = -self.reward_scale * reward.double()
        running = running_cost_fn(ctx.process)
        adjoints = torch.zeros_like(traj.xs)
        for k in range(K - 1, -1, -1):
            s = float(traj.stds[k])
            if s > 0:
                baseline = (state_baseline(traj.xs[k], cost_to_go) if self.baseline == "state"
                            else loo_mean(cost_to_go))
                weight = (cost_to_go - baseline).to(traj.xs.dtype).reshape(B, *[1] * (traj.xs.dim() - 2))
                adjoints[k + 1] = weight * traj.noises[k] / s
            cost_to_go = cost_to_go + step_costs[k]
            if s > 0 and self.cost_to_go == "log-ratio":
                # + ⟨u_k, ξ_k⟩: mean zero given x_k, so the targets of the earlier steps keep their mean
                u = (traj.means[k] - base_means[k]) / s
                cost_to_go = cost_to_go + (u * traj.noises[k]).flatten(1).double().sum(1)
            if running is not None:  # C_k also carries the running state cost Δt_k f(x_k)
                cost_to_go = cost_to_go + float(traj.ts[k + 1] - traj.ts[k]) * running(traj.xs[k], float(traj.ts[k])).double()
        return AdjointPass(adjoints, base_means, reward.float())

    def bootstrap_weights(self, process: Process, traj: Trajectory) -> list[float]:
        """β_k = β · min(1, ρ_k / median_j ρ_j) with ρ_k = s_k²/|c_k| (0 on deterministic steps).

        The bootstrap −u_k/s_k = −c_k·δpred/s_k² turns an error δ of the learned prediction into
        an adjoint error c_k δ/s_k² = δ/ρ_k, so it is trusted less where ρ_k is small: near the end
        of the chain, and above all on the DDIM kernel's last stochastic step (s ≈ 1e-3)."""
        coef = prediction_coefficients(process, traj).abs()
        rho = [float(traj.stds[k]) ** 2 / max(float(coef[k]), 1e-30) for k in range(traj.num_steps)]
        positive = sorted(v for v in rho if v > 0)
        if not positive:
            return [0.0] * len(rho)
        ref = positive[len(positive) // 2]
        return [self.bootstrap * min(1.0, v / ref) for v in rho]

    def lean_adjoint(self, ctx: FinetuneContext, traj: Trajectory) -> Tensor:
        """The lean adjoint ã_0 … ã_K, [K+1, B, *S] (equals −λ∇_{x_k} r(x_K) through a base-model
        replay of the trajectory's noise)."""
        return self.adjoint_pass(ctx, traj, "lean").adjoints

    def basic_adjoint(self, ctx: FinetuneContext, traj: Trajectory) -> Tensor:
        """The basic (full-cost) adjoint a_0 … a_K of the current control, [K+1, B, *S]."""
        return self.adjoint_pass(ctx, traj, "basic").adjoints

    # ---- loss -----------------------------------------------------------------------------------
    def loss_steps(self, stochastic: list[int], generator: torch.Generator) -> list[tuple[int, float]]:
        """(step, weight) pairs: the last ``num_last_steps`` stochastic steps with weight 1, plus a
        uniform random subset of the rest with weight (#rest / #drawn), so Σ_selected w_k f_k is
        an unbiased estimate of Σ_k f_k."""
        n = len(stochastic)
        if self.num_loss_steps is None or self.num_loss_steps >= n:
            return [(k, 1.0) for k in stochastic]
        n_last = min(self.num_last_steps, n)
        last = stochastic[n - n_last:]
        rest = stochastic[: n - n_last]
        n_rand = min(self.num_loss_steps - n_last, len(rest))
        picked: list[tuple[int, float]] = []
        if n_rand > 0:
            idx = torch.randperm(len(rest), generator=generator, device=generator.device)[:n_rand].tolist()
            picked = [(rest[i], len(rest) / n_rand) for i in sorted(idx)]
        return picked + [(k, 1.0) for k in last]

    def step_weights(self, process: Process, model: Denoiser, traj: Trajectory,
                     stochastic: list[int]) -> dict[int, float]:
        """Per-step loss weights (mean 1 over the stochastic steps): 1 in control units (``"am"``,
        or ``"auto"`` with a model whose correction outputs the control), else prediction units."""
        if self.step_weighting == "am" or (self.step_weighting == "auto" and control_units(model)):
            return {k: 1.0 for k in stochastic}
        coef = prediction_coefficients(process, traj)
        raw = {k: (float(traj.stds[k]) / max(abs(float(coef[k])), 1e-12)) ** 2 for k in stochastic}
        mean = sum(raw.values()) / len(raw)
        return {k: v / mean for k, v in raw.items()}

    def iteration(self, ctx: FinetuneContext) -> Iterator[LossOutput]:
        model = ctx.model.unguided()
        cond = ctx.sample_cond()
        with torch.no_grad():
            traj = rollout(ctx.process, model, batch_size=ctx.batch_size, sample_shape=ctx.sample_shape,
                           cond=cond, generator=ctx.generator, grad=GradSpec.none(), device=ctx.device)
        stochastic = traj.stochastic_steps()
        if not stochastic:
            raise SoctuneError("adjoint-matching needs stochastic steps; this rollout has none (raise noise_scale)")
        estimator = self.estimator_for(ctx.sample_shape)
        sweep = self.score_pass(ctx, traj) if estimator == "score" else self.adjoint_pass(ctx, traj)
        adj = sweep.adjoints

        # control cost of the sampled chain (free: the rollout recorded the fine-tuned means)
        cost = step_control_costs(ctx.process, model, traj, sweep.base_means).sum(0) + running_costs(ctx.process, traj)

        lam_r = self.reward_scale * sweep.reward.double()
        metrics = {
            "reward_mean": float(sweep.reward.mean()),
            "reward_std": float(sweep.reward.std()) if traj.batch_size > 1 else 0.0,
            "control_cost": float(cost.mean()),
            "soc_cost": float((cost - lam_r).mean()),
        }
        if estimator == "pathwise":
            metrics["adjoint_norm"] = float(adj.flatten(2).norm(dim=2).mean())
            metrics["terminal_adjoint_norm"] = float(adj[-1].flatten(1).norm(dim=1).mean())
        if not math.isfinite(metrics["soc_cost"]):
            metrics["soc_cost"] = float("nan")
        step_w = self.step_weights(ctx.process, model, traj, stochastic)
        steps = self.loss_steps(stochastic, ctx.generator)

        def step_loss(k: int, w: float) -> Tensor:
            """w_k‖u_k + s_k ã_{k+1}‖² per sample [B], over the per-step average's denominator
            (the scale stays comparable across K and step sub-sampling)."""
            s = traj.stds[k]
            m_ft = model_step(ctx.process, model, traj.xs[k], k, cond, traj.states[k]).mean
            resid = (m_ft - sweep.base_means[k]) / s + s * adj[k + 1]
            return w * step_w[k] * resid.flatten(1).pow(2).sum(1) / len(stochastic)

        if self.loss_clip > 0:
            # the per-sample clip needs each sample's total over steps: one graph for all steps
            per_sample = sum(step_loss(k, w) for k, w in steps)
            scale = (self.loss_clip / per_sample.detach().clamp(min=1e-30)).clamp(max=1.0)
            yield LossOutput(loss=(per_sample * scale).mean(), metrics=metrics)
            return
        # the loss is a sum over steps: backpropagate step by step (memory flat in K), one update
        for i, (k, w) in enumerate(steps):
            last = i == len(steps) - 1
            yield LossOutput(loss=step_loss(k, w).mean(), metrics=metrics if last else {}, accumulate=not last)
