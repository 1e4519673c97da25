"""Residual ∇-DB (∇-GFlowNet, Liu et al. 2024) on the trajectory interface.

Detailed balance with a fixed backward policy P_B, for the fine-tuned chain and for the base
chain, F(x_k) P_F^θ(x_{k+1}|x_k) = F(x_{k+1}) P_B(x_k|x_{k+1}) and the same with F_base, P_F^base,
divide out P_B: with the residual flow F̃ = F / F_base^η (η = prior strength)

    log P_F^θ(x_{k+1}|x_k) − η log P_F^base(x_{k+1}|x_k) = log F̃(x_{k+1}) − log F̃(x_k),

and at the terminal state F̃ = exp(λ r). Taking ∇ w.r.t. x_{k+1} and w.r.t. x_k gives the two
∇-DB conditions this solver regresses (our time runs t = 0 noise → t = 1 data, transitions
x_k → x_{k+1}):

    forward:  ∇_{x_{k+1}}[log P_F^θ − η log P_F^base] = ∇ log F̃(x_{k+1}),
    reverse:  ∇_{x_k}    [log P_F^θ − η log P_F^base] = −∇ log F̃(x_k).

Every step is Gaussian, P_F(x'|x) = N(x'; m(x), s² I), so the forward score is closed form,
∇_{x'} log P_F = −(x' − m(x))/s², and the reverse score J_m(x)ᵀ(x' − m(x))/s² comes from autograd
through the mean map (:func:`soctune.trajectory.model_step`). For η = 1 the path measure
solving all conditions is P_base(τ)·exp(λ r(x_K))/F̃(x_0): on a memoryless chain F̃(x_0) is
constant and the last marginal is the tilt p* ∝ p_base·exp(λ r). For η ≠ 1 it is the paper's
prior-strength heuristic (the path measure ∝ P_base(τ)^η e^{λr}, not p_base^η e^{λr} exactly).

The flow score is parameterised forward-looking,

    ∇ log F̃(x_k) = λ γ_k ∇_{x_k} r(x̂₁(x_k)) + g_φ(x_k, t_k),

with x̂₁ the model's data estimate at (x_k, t_k), γ_k ∈ [0, 1] rising to 1 at the data end
(default 1; the paper's reference code uses α_t², i.e. ᾱ on a VP schedule) and g_φ a small
network shaped like the data, zero-initialised, owned by the solver. The reward gradient is a
constant target (no second-order terms), as in the reference implementation.

**The deterministic last step** (DDPM and flow chains land on t = 1 with s = 0): a delta kernel
has no density, so it cannot enter detailed balance. We take the GFlowNet's terminal state to
be x_T, the state after the LAST STOCHASTIC step, and the deterministic tail x_T → x_K to be
the base model's map Φ (for DDPM the jump x_K = x̂₁^base(x_T)). The terminal condition is then
exact and has no learnable part,

    ∇ log F̃(x_T) = λ ∇_{x_T} r(Φ(x_T))     (γ = 1, g_φ not used),

plus the terminal loss ‖g_φ(x_T, t_T)‖² that keeps g_φ consistent near the end. The tilted path
measure keeps the deterministic steps of the base, so the fine-tuned model's predictions on the
tail are anchored to the base ones by ``anchor_weight``·‖pred_θ − pred_base‖² on the recorded
tail states (otherwise the shared network would drift there unconstrained).

Loss per iteration, on a random subset of the stochastic transitions (stratified over the
chain, always containing the last stochastic transition, same subset for the whole batch):

    L = mean_k [ w_F ‖fwd residual_k − ∇log F̃(x_{k+1})‖² + w_B ‖rev residual_k + ∇log F̃(x_k)‖² ]
        + w_T ‖g_φ(x_T)‖² + w_A ‖pred_θ − pred_base‖²_tail + w_R ‖pred_θ − pred_ref‖²,

squared norms averaged over the batch and the data dimensions. As in the reference code the
reverse residual of the fine-tuned policy is computed without a second-order graph, so the
reverse term trains g_φ only (``reverse_trains_policy=True`` backpropagates it into θ too).

**The chain target** (``reverse_target="chain"``). Adding J_bᵀ(forward residual) to the
reverse residual leaves (J_θ − J_b)ᵀ(x_{k+1} − m_θ)/s², which has mean zero under the rollout's
own step; so the two conditions together say

    ∇ log F̃(x_k) = J_b(x_k)ᵀ ∇ log F̃(x_{k+1})     in expectation over x_{k+1} ~ P_F^θ(·|x_k),

the adjoint equation one step at a time, with the learned flow one step later in place of the
pathwise adjoint (one Jacobian per target, not a product along the path). With the paper's target the
flow at x_k is regressed onto J_bᵀ(m_θ − m_b)/s², what the CURRENT policy implies: the flow
then tracks the policy rather than the reward, and where the policy is poorly fitted — the low
density watershed between modes, where log F̃ jumps — the jump is lost step after step. On DESIGN
§6's mixture the paper's target plateaus far from the tilt, and the exact flow score in its place
does not; the chain target with ``gamma="one"`` and ``lookahead_model="base"`` (the defaults)
reaches the closed-form tilt (tests/test_solver_ground_truth.py, whose notes keep the figures).

Output regularisation (the reference code's ``unet_reg``): pred_ref are the predictions of the
iterate that generated the rollout, stored on the sampled transitions (one no-grad forward
each) before the first update. Each iteration makes ``inner_steps`` updates on disjoint
minibatches of its rollout, so from the second update on the term is a trust region around the
rollout policy; with ``inner_steps = 1`` it is identically zero and skipped.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from einops import rearrange
from torch import Tensor, nn

from ..models.base import CorrectionNet, Denoiser, FourierTimeEmbedding, index_batch
from ..registry import SoctuneError
from ..sde.base import Process
from ..trajectory import Trajectory, base_states, model_step, prediction_coefficients, rollout
from .base import FinetuneContext, LossOutput, Solver, control_units, register_solver

GammaSpec = str | Callable[[float], float]


# ---- networks ------------------------------------------------------------------------------
class TinyConvNet(nn.Module):
    """A few 3×3 convolutions with a time embedding added as a per-channel bias.

    [B, C, H, W], [B] -> [B, C, H, W] (``scalar=False``) or [B, 1] (``scalar=True``: global mean
    pool then a linear head). The output layer is zero-initialised.
    """

    def __init__(self, channels: int, hidden: int = 32, depth: int = 2, time_features: int = 8,
                 scalar: bool = False) -> None:
        super().__init__()
        self.time = FourierTimeEmbedding(time_features)
        self.time_proj = nn.Linear(2 * time_features + 1, hidden)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(hidden, hidden, 3, padding=1) for _ in range(depth))
        self.norms = nn.ModuleList(nn.GroupNorm(_groups(hidden), hidden) for _ in range(depth))
        self.scalar = scalar
        self.out: nn.Module = nn.Linear(hidden, 1) if scalar else nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # type: ignore[arg-type]
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time_proj(torch.cat([self.time(t), t[:, None].float()], dim=-1).to(x.dtype))
        h = self.conv_in(x) + rearrange(temb, "b c -> b c 1 1")
        for conv, norm in zip(self.blocks, self.norms):
            h = h + conv(nn.functional.silu(norm(h)))
        h = nn.functional.silu(h)
        if self.scalar:
            return self.out(h.mean(dim=(2, 3)))
        return self.out(h)


def _groups(c: int) -> int:
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


class FlowNet(nn.Module):
    """Residual flow network for a data shape S: a score g_φ(x, t) [B, *S] (``scalar=False``)
    or a log-flow f_φ(x, t) [B] (``scalar=True``).

    ``kind="auto"`` picks a tiny conv net for image-shaped S = (C, H, W) and an MLP on the
    flattened state otherwise. Zero-initialised output.
    """

    def __init__(self, sample_shape: tuple[int, ...], scalar: bool = False, kind: str = "auto",
                 hidden: int | None = None, depth: int = 2, time_features: int = 8, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)
        if kind == "auto":
            kind = "conv" if len(sample_shape) == 3 else "mlp"
        if kind not in ("mlp", "conv"):
            raise SoctuneError(f"flow_net must be 'auto', 'mlp' or 'conv', got '{kind}'")
        if kind == "conv" and len(sample_shape) != 3:
            raise SoctuneError(f"flow_net='conv' needs image-shaped data (C, H, W), got shape {sample_shape}; use 'mlp'")
        self.sample_shape, self.scalar, self.kind = tuple(sample_shape), scalar, kind
        dim = math.prod(sample_shape)
        if kind == "mlp":
            self.net: nn.Module = CorrectionNet(dim, hidden or 128, depth, time_features, out_dim=1 if scalar else dim)
        else:
            self.net = TinyConvNet(sample_shape[0], hidden or 32, depth, time_features, scalar=scalar)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self.kind == "mlp":
            out = self.net(x.reshape(x.shape[0], -1), t)
        else:
            out = self.net(x, t)
        out = self.scale * out
        if self.scalar:
            return out.reshape(x.shape[0])
        return out.reshape(x.shape)


# ---- helpers shared with the gradient-free DB solver (soctune.solvers.db) --------------------
def _subset_size(n_all: int, transitions: float | int) -> int:
    n = max(1, round(transitions * n_all)) if isinstance(transitions, float) else int(transitions)
    return min(n, n_all)


def subsample_transitions(stochastic: list[int], transitions: float | int, generator: torch.Generator,
                          stratified: bool = True) -> list[int]:
    """Pick the transitions entering the loss: the last stochastic one always, plus random others.

    transitions: a float in (0, 1] is a fraction of the stochastic steps, an int ≥ 1 a count
    (both including the last one). ``stratified`` splits the remaining steps into equal
    contiguous chunks and draws one per chunk (lower variance than a uniform subset).
    Returns sorted step indices.
    """
    if not stochastic:
        raise SoctuneError("the trajectory has no stochastic step; raise the process's noise_scale")
    n = _subset_size(len(stochastic), transitions)
    last, rest = stochastic[-1], stochastic[:-1]
    n_rest = n - 1
    if n_rest <= 0:
        return [last]
    if n_rest >= len(rest):
        return [*rest, last]
    dev = generator.device
    if stratified:
        chunks = torch.arange(len(rest)).tensor_split(n_rest)
        picks = [int(c[int(torch.randint(len(c), (1,), generator=generator, device=dev))]) for c in chunks]
    else:
        picks = torch.randperm(len(rest), generator=generator, device=dev)[:n_rest].tolist()
    return sorted({rest[i] for i in picks} | {last})


def inclusion_weights(stochastic: list[int], transitions: float | int, stratified: bool = True) -> dict[int, float]:
    """1/π_k for every step k of ``stochastic``: π_k the probability that :func:`subsample_transitions`
    (same arguments) picks k. Σ_{k ∈ picked} g_k/π_k is then an unbiased estimate of Σ_k g_k
    (Horvitz–Thompson), e.g. of a rollout's control cost from the transitions a solver evaluated."""
    n_rest = _subset_size(len(stochastic), transitions) - 1
    last, rest = stochastic[-1], stochastic[:-1]
    out = {last: 1.0}
    if n_rest >= len(rest):
        return {**{k: 1.0 for k in rest}, **out}
    if n_rest <= 0:
        return {**{k: math.inf for k in rest}, **out}
    if stratified:
        for chunk in torch.arange(len(rest)).tensor_split(n_rest):
            out.update({rest[int(i)]: float(len(chunk)) for i in chunk})
    else:
        out.update({k: len(rest) / n_rest for k in rest})
    return out


def check_transitions(transitions: float | int) -> None:
    if isinstance(transitions, bool) or not isinstance(transitions, (int, float)):
        raise SoctuneError(f"transitions must be a fraction in (0, 1] or a count ≥ 1, got {transitions!r}")
    if isinstance(transitions, float) and not 0 < transitions <= 1:
        raise SoctuneError(f"transitions as a float is a fraction in (0, 1], got {transitions}; pass an int for a count")
    if isinstance(transitions, int) and transitions < 1:
        raise SoctuneError(f"transitions as an int is a count ≥ 1, got {transitions}")


def make_gamma(process: Process, spec: GammaSpec) -> Callable[[float], float]:
    """γ(t) ∈ [0, 1] for the forward-looking term.

    ``"alpha2"``: α_t² (ᾱ on a VP path, t² for flow matching); ``"alpha"``: α_t; ``"one"``;
    ``"zero"`` (no forward-looking term); or a callable t -> γ. Processes without a Gaussian-path
    schedule (``euler-maruyama``) use t in place of α_t.
    """
    if callable(spec):
        return lambda t: float(min(max(spec(t), 0.0), 1.0))
    if spec not in ("alpha2", "alpha", "one", "zero"):
        raise SoctuneError(f"gamma must be 'alpha2', 'alpha', 'one', 'zero' or a callable, got '{spec}'")
    if spec == "one":
        return lambda t: 1.0
    if spec == "zero":
        return lambda t: 0.0
    schedule = getattr(process, "schedule", None)

    def alpha(t: float) -> float:
        if schedule is None:
            return min(max(t, 0.0), 1.0)
        return min(max(float(schedule.alpha(torch.tensor(t, dtype=torch.float64))), 0.0), 1.0)

    return (lambda t: alpha(t) ** 2) if spec == "alpha2" else alpha


def terminal_index(traj: Trajectory) -> int:
    """T = 1 + the last stochastic step; raise if a deterministic step precedes a stochastic one."""
    stoch = traj.stochastic_steps()
    if not stoch:
        raise SoctuneError("the trajectory has no stochastic step; raise the process's noise_scale")
    if stoch != list(range(stoch[-1] + 1)):
        raise SoctuneError("GFlowNet solvers need every step before the last stochastic one to be stochastic "
                           "(deterministic steps only at the end); use a noise_scale > 0 on every step")
    return stoch[-1] + 1


def terminal_map(process: Process, model: Denoiser, traj: Trajectory, x: Tensor, T: int, cond: Any,
                 idx: Tensor) -> Tensor:
    """Φ(x_T): the base model's deterministic tail steps T … K'−1 applied to x [b,*S] (identity
    when the last step is stochastic). Differentiable in x."""
    states = base_states(process, model, traj)
    with model.base():
        for j in range(T, traj.num_steps):
            state = index_batch(states[j], idx, traj.batch_size)
            x = model_step(process, model, x, j, cond, state).mean
    return x


def anchor_loss(process: Process, model: Denoiser, traj: Trajectory, T: int, cond: Any, idx: Tensor) -> Tensor:
    """mean ‖pred_θ − pred_base‖² over the deterministic tail states x_T … x_{K'−1} (0 if none)."""
    terms = []
    for j in range(T, traj.num_steps):
        x = traj.xs[j][idx]
        state = index_batch(traj.states[j], idx, traj.batch_size)
        with torch.no_grad(), model.base():
            ref = model_step(process, model, x, j, cond, state).pred
        pred = model_step(process, model, x, j, cond, state).pred
        terms.append((pred - ref).pow(2).mean())
    return torch.stack(terms).mean() if terms else torch.zeros((), device=traj.xs.device)


def rollout_for_training(ctx: FinetuneContext, reward_fn: Callable[[Tensor, Any], Tensor]) -> tuple[Trajectory, Tensor]:
    """A no-grad rollout of the fine-tuned model and its rewards r(x_K) [B] (float32, no grad)."""
    cond = ctx.sample_cond()
    with torch.no_grad():
        traj = rollout(ctx.process, ctx.model, batch_size=ctx.batch_size, sample_shape=ctx.sample_shape, cond=cond,
                       generator=ctx.generator, device=ctx.device)
        reward = reward_fn(traj.x_final, cond).float()
    traj.reward = reward
    return traj, reward


def forward_score(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """∇_{x_{k+1}} log N(x_{k+1}; m, s² I) = −(x_{k+1} − m)/s², [B,*S]."""
    return -(x_next - mean) / std.to(x_next.dtype) ** 2


def reverse_score(x_next: Tensor, mean: Tensor, std: Tensor, x: Tensor, retain_graph: bool = False,
                  create_graph: bool = False) -> Tensor:
    """∇_{x_k} log N(x_{k+1}; m(x_k), s² I) = J_m(x_k)ᵀ(x_{k+1} − m)/s² by autograd, [B,*S];
    ``mean`` must carry the graph from ``x`` (which requires grad)."""
    logp = -0.5 * (x_next.detach() - mean).pow(2).sum() / std.to(mean.dtype) ** 2
    (g,) = torch.autograd.grad(logp, x, retain_graph=retain_graph, create_graph=create_graph)
    return g


# ---- the solver ----------------------------------------------------------------------------
class SocCostEstimate:
    """The SOC cost J = E[Σ_k ½‖u_k‖² − λ r] of a training rollout, estimated from the transitions a
    DB-type solver evaluates anyway (their base means give u_k = (m_rollout − m_base)/s_k): each chunk of
    samples adds Σ_{k picked} ½‖u_k‖²/π_k (:func:`inclusion_weights`, unbiased for the whole chain's
    control cost), so logging it costs no forward pass. Metrics ``control_cost`` and ``soc_cost``, the
    running means over the samples seen so far this iteration; none when some step can never be
    picked (``transitions`` 1: the last transition only)."""

    def __init__(self, solver: Any, traj: Trajectory, T: int, reward: Tensor) -> None:
        steps = list(range(T))
        self.weights = inclusion_weights(steps, solver.transitions, solver.stratified) if steps else {}
        self.ok = bool(steps) and all(math.isfinite(w) for w in self.weights.values())
        self.stds = traj.stds
        self.reward = reward.detach().double()
        self.scale = solver.reward_scale
        # per chunk of samples (keyed by its first index): its indices, Σ_k w_k ½‖u_k‖² per sample
        self.rows: dict[int, Tensor] = {}
        self.sums: dict[int, Tensor] = {}

    def add(self, k: int, control_sq: Tensor, idx: Tensor) -> None:
        """Step k's ½‖u_k‖² [b] on the samples ``idx`` [b]."""
        if not self.ok or float(self.stds[k]) == 0:
            return
        key = int(idx[0])
        self.rows[key] = idx
        self.sums[key] = self.sums.get(key, 0) + self.weights[k] * control_sq.detach().double()

    def metrics(self) -> dict[str, float]:
        if not self.ok or not self.sums:
            return {}
        control = torch.cat(list(self.sums.values()))
        reward = torch.cat([self.reward[self.rows[key]] for key in self.sums])
        return {"control_cost": float(control.mean()), "soc_cost": float((control - self.scale * reward).mean())}


@register_solver("nabla-db", "Residual ∇-DB (∇-GFlowNet): match policy-score residuals to a learned flow score; samples p_base^η·e^{λr}")
class NablaDB(Solver):
    """Residual ∇-DB, see the module docstring for the equations.

    Args:
        reward_scale: λ.
        prior_strength: η, the weight of the base log-density in the residual (1 = exact tilt).
        transitions: stochastic transitions per iteration in the loss: a float in (0, 1] is a
            fraction, an int ≥ 1 a count; the last stochastic transition is always included.
        stratified: draw the other transitions one per contiguous chunk of the chain.
        forward_weight, reverse_weight, terminal_weight: w_F, w_B, w_T.
        anchor_weight: w_A, keeps the deterministic tail at the base (see module docstring).
        reg_weight: w_R, output regularisation towards the rollout iterate's predictions
            (active only with ``inner_steps`` > 1).
        inner_steps: optimiser updates per rollout, on disjoint minibatches of it.
        gamma: forward-looking weight γ(t): ``"one"`` (default), ``"alpha2"`` (α_t², the
            reference code's), ``"alpha"``, ``"zero"`` or a callable.
        lookahead_model: ``"base"`` (default) or ``"finetuned"`` (the reference code): which
            model's x̂₁ enters the forward-looking term r(x̂₁(x_k)).
        no_flow: drop g_φ (flow score = forward-looking term only); the reverse term then has
            nothing to train and is skipped unless ``reverse_trains_policy``.
        reverse_trains_policy: backpropagate the reverse term into θ (a second-order graph).
        reverse_target: the reverse term's target for the flow score ∇log F̃(x_k): ``"auto"``
            (default: ``"chain"``, or ``"policy"`` with ``no_flow`` / ``reverse_trains_policy``), ``"policy"``
            (the paper: minus the policy's reverse residual; the forward term trains g_φ too) or
            ``"chain"``: J_bᵀ ∇log F̃(x_{k+1}) (module docstring) — g_φ learns from the flow one
            step later instead of from the current policy, the forward term trains θ only, and
            the reverse term is not weighted by ``step_weighting``.
        step_weighting: ``"auto"`` (default): ``"variance"`` for a model whose correction outputs
            the control (:class:`~soctune.models.control.ControlGainDenoiser`), ``"prediction"``
            otherwise (LoRA, prediction corrections; see :func:`~soctune.solvers.base.control_units`);
            ``"none"`` (plain ∇-DB), ``"variance"``: weight step k by s_k², which
            puts the forward term in control units ‖u_k − s_k∇log F̃‖² (u_k = (m_θ − m_base)/s_k)
            instead of letting the smallest-noise steps dominate by 1/s_k², or ``"prediction"``:
            weight (s_k²/c_k)², c_k = ∂m_k/∂pred, i.e. prediction units
            ‖(pred_θ − pred_base) − s_k²∇log F̃/c_k‖² (as adjoint-matching's option; best
            conditioned when the s_k and c_k span decades). Same minimiser for all three.
        flow_net: ``"auto"``, ``"mlp"`` or ``"conv"``; flow_hidden, flow_depth, flow_time_features:
            its size (hidden defaults: 128 for the MLP, 32 channels for the conv net).
        flow_scale: g_φ's output multiplier (with Adam, a learning-rate factor for g_φ's output).
        flow_warmup: iterations at the start during which g_φ is frozen (the policy learns
            against the forward-looking term alone).
    """

    wants_memoryless = True
    needs_stochastic = True

    @property
    def claims_tilt(self) -> bool:  # η ≠ 1 targets p_base^η·e^{λr}, whose cost is not J
        return self.prior_strength == 1.0

    def __init__(self, reward_scale: float = 1.0, prior_strength: float = 1.0, transitions: float | int = 0.25,
                 stratified: bool = True, forward_weight: float = 1.0, reverse_weight: float = 1.0,
                 terminal_weight: float = 1.0, anchor_weight: float = 1.0, reg_weight: float = 0.0,
                 inner_steps: int = 1, gamma: GammaSpec = "one", lookahead_model: str = "base",
                 no_flow: bool = False, reverse_trains_policy: bool = False, reverse_target: str = "auto",
                 step_weighting: str = "auto",
                 flow_net: str = "auto", flow_hidden: int | None = None, flow_depth: int = 2,
                 flow_time_features: int = 8, flow_scale: float = 1.0, flow_warmup: int = 0) -> None:
        super().__init__(reward_scale)
        check_transitions(transitions)
        if not prior_strength > 0:
            raise SoctuneError(f"prior_strength (η) must be > 0, got {prior_strength}")
        for name, w in (("forward_weight", forward_weight), ("reverse_weight", reverse_weight),
                        ("terminal_weight", terminal_weight), ("anchor_weight", anchor_weight),
                        ("reg_weight", reg_weight)):
            if w < 0:
                raise SoctuneError(f"{name} must be ≥ 0, got {w}")
        if int(inner_steps) < 1:
            raise SoctuneError(f"inner_steps must be ≥ 1, got {inner_steps}")
        if lookahead_model not in ("finetuned", "base"):
            raise SoctuneError(f"lookahead_model must be 'finetuned' or 'base', got '{lookahead_model}'")
        if step_weighting not in ("auto", "none", "variance", "prediction"):
            raise SoctuneError(f"step_weighting must be 'auto', 'none', 'variance' or 'prediction', got '{step_weighting}'")
        if not callable(gamma) and gamma not in ("alpha2", "alpha", "one", "zero"):
            raise SoctuneError(f"gamma must be 'alpha2', 'alpha', 'one', 'zero' or a callable, got '{gamma}'")
        self.prior_strength = float(prior_strength)
        self.transitions = transitions
        self.stratified = bool(stratified)
        self.forward_weight, self.reverse_weight = float(forward_weight), float(reverse_weight)
        self.terminal_weight, self.anchor_weight = float(terminal_weight), float(anchor_weight)
        self.reg_weight, self.inner_steps = float(reg_weight), int(inner_steps)
        self.gamma_spec, self.lookahead_model = gamma, lookahead_model
        self.no_flow, self.reverse_trains_policy = bool(no_flow), bool(reverse_trains_policy)
        if reverse_target not in ("auto", "policy", "chain"):
            raise SoctuneError(f"reverse_target must be 'auto', 'policy' or 'chain', got '{reverse_target}'")
        if reverse_target == "auto":  # the chain target needs the flow network and trains only it
            reverse_target = "policy" if no_flow or reverse_trains_policy else "chain"
        if reverse_target == "chain" and (no_flow or reverse_trains_policy):
            raise SoctuneError("reverse_target='chain' trains the flow network g_φ only; it cannot be combined with "
                               "no_flow or reverse_trains_policy (use reverse_target='policy')")
        self.reverse_target = reverse_target
        self.step_weighting = step_weighting
        if not flow_scale > 0:
            raise SoctuneError(f"flow_scale must be > 0, got {flow_scale}")
        self.flow_options = dict(kind=flow_net, hidden=flow_hidden, depth=int(flow_depth),
                                 time_features=int(flow_time_features), scale=float(flow_scale))
        if int(flow_warmup) < 0:
            raise SoctuneError(f"flow_warmup must be ≥ 0, got {flow_warmup}")
        self.flow_warmup = int(flow_warmup)
        self.flow: FlowNet | None = None
        self._gamma_fn: Callable[[float], float] | None = None
        self._coef: Tensor | None = None
        self._weighting = step_weighting
        self._flow_frozen = False

    def setup(self, ctx: FinetuneContext) -> None:
        if not self.no_flow and self.flow is None:
            self.flow = FlowNet(tuple(ctx.sample_shape), scalar=False, **self.flow_options).to(ctx.device)

    # ---- flow score ------------------------------------------------------------------------
    def reward_grad(self, ctx: FinetuneContext, x: Tensor, k: int, cond: Any, state: dict[str, Tensor]) -> Tensor:
        """∇_x r(x̂₁(x)) at step k's model time, [b,*S], detached (a constant target)."""
        x = x.detach().requires_grad_(True)
        model = ctx.model
        with torch.enable_grad():
            if self.lookahead_model == "base":
                with model.base():
                    x1 = model_step(ctx.process, model, x, k, cond, state).x1_hat
            else:
                x1 = model_step(ctx.process, model, x, k, cond, state).x1_hat
            if x1 is None:  # process without a data estimate: the state itself
                x1 = x
            r = ctx.reward(x1, cond).float()
            (g,) = torch.autograd.grad(r.sum(), x)
        return g.detach()

    def terminal_score(self, ctx: FinetuneContext, traj: Trajectory, x: Tensor, T: int, cond: Any,
                       idx: Tensor) -> Tensor:
        """λ ∇_{x_T} r(Φ(x_T)), [b,*S], detached."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            r = ctx.reward(terminal_map(ctx.process, ctx.model, traj, x, T, cond, idx), cond).float()
            (g,) = torch.autograd.grad(r.sum(), x)
        return self.reward_scale * g.detach()

    def flow_score(self, ctx: FinetuneContext, traj: Trajectory, k: int, x: Tensor, cond: Any,
                   idx: Tensor, reward_grad: Tensor | None = None) -> Tensor:
        """∇ log F̃(x_k) = λγ_k ∇r(x̂₁(x_k)) + g_φ(x_k, t_k), [b,*S] (graph into φ only).
        ``reward_grad``: ∇r(x̂₁(x_k)) when the caller already has it."""
        t = float(traj.ts[k])
        gam = self._gamma(t)
        out = torch.zeros_like(x)
        if gam > 0:
            if reward_grad is None:
                state = index_batch(traj.states[k], idx, traj.batch_size)
                reward_grad = self.reward_grad(ctx, x, k, cond, state)
            out = out + self.reward_scale * gam * reward_grad
        if self.flow is not None:
            g = self.flow(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
            out = out + (g.detach() if self._flow_frozen else g)
        return out

    # ---- one transition ---------------------------------------------------------------------
    def residual_scores(self, ctx: FinetuneContext, traj: Trajectory, k: int, cond: Any, idx: Tensor,
                        reverse: bool = True, lookahead: bool = False) -> dict[str, Tensor]:
        """The residual policy scores of transition k on the samples ``idx`` (all [b,*S]):

        "forward" = ∇_{x_{k+1}}[log P_F^θ − η log P_F^base] (closed form, graph into θ),
        "reverse" = ∇_{x_k}[log P_F^θ − η log P_F^base] (autograd through both mean maps; graph
        into θ only with ``reverse_trains_policy``), "pred" = pred_θ(x_k) (graph into θ),
        "control_sq" = ½‖u_k‖² [b] of the rollout's step (u_k = (m_rollout − m_base)/s_k, detached) and,
        with ``lookahead``, "reward_grad" = ∇_{x_k} r(x̂₁^θ(x_k)) from the same forward pass.
        """
        process, model, eta = ctx.process, ctx.model, self.prior_strength
        x = traj.xs[k][idx].detach().requires_grad_(True)
        x_next = traj.xs[k + 1][idx]
        state = index_batch(traj.states[k], idx, traj.batch_size)
        std = traj.stds[k].to(x.dtype)
        res: dict[str, Tensor] = {}
        with torch.enable_grad():
            out = model_step(process, model, x, k, cond, state)
            res["pred"] = out.pred
            if reverse:
                res["reverse"] = reverse_score(x_next, out.mean, std, x, retain_graph=True,
                                               create_graph=self.reverse_trains_policy)
            if lookahead:  # ∇r(x̂₁(x_k)) through the graph we already have
                x1 = out.x1_hat if out.x1_hat is not None else x
                (rg,) = torch.autograd.grad(ctx.reward(x1, cond).float().sum(), x, retain_graph=True)
                res["reward_grad"] = rg.detach()
            xb = x.detach().requires_grad_(reverse)
            b_state = index_batch(base_states(process, model, traj)[k], idx, traj.batch_size)
            with model.base():
                m_b = model_step(process, model, xb, k, cond, b_state).mean
            if reverse:
                res["reverse"] = res["reverse"] - eta * reverse_score(x_next, m_b, std, xb)
        res["forward"] = forward_score(x_next, out.mean, std) - eta * forward_score(x_next, m_b.detach(), std)
        # ½‖u_k‖² of the ROLLOUT's policy (its recorded mean), for the logged SOC cost
        res["control_sq"] = 0.5 * ((traj.means[k][idx] - m_b.detach()) / std).flatten(1).double().pow(2).sum(1)
        return res

    def transition_terms(self, ctx: FinetuneContext, traj: Trajectory, k: int, T: int, cond: Any,
                         idx: Tensor) -> dict[str, Tensor]:
        """Forward and reverse ∇-DB terms of transition k on the samples ``idx``; returns
        {"forward", "reverse"} scalar losses, the prediction "pred" [b,*S] (with graph) and the
        rollout's step cost "control_sq" [b] (:meth:`residual_scores`)."""
        chain = self.reverse_target == "chain"
        want_rev = self.reverse_weight > 0 and (self.flow is not None or self.reverse_trains_policy)
        reuse = want_rev and not chain and self.lookahead_model == "finetuned" and self._gamma(float(traj.ts[k])) > 0
        res = self.residual_scores(ctx, traj, k, cond, idx, reverse=want_rev and not chain, lookahead=reuse)
        x, x_next = traj.xs[k][idx], traj.xs[k + 1][idx]
        # with the chain target the flow one step later is a constant target (no graph into φ)
        with torch.no_grad() if chain else contextlib.nullcontext():
            target_next = (self.terminal_score(ctx, traj, x_next, T, cond, idx) if k + 1 == T
                           else self.flow_score(ctx, traj, k + 1, x_next, cond, idx))
        w = self._step_weight(ctx.process, traj, k)
        terms = {"forward": w * (res["forward"] - target_next).pow(2).mean(), "pred": res["pred"],
                 "control_sq": res["control_sq"]}
        if want_rev and chain:
            lookahead = self.lookahead_model == "base" and self._gamma(float(traj.ts[k])) > 0
            target, reward_grad = self.chain_target(ctx, traj, k, cond, idx, target_next, lookahead=lookahead)
            score_k = self.flow_score(ctx, traj, k, x, cond, idx, reward_grad=reward_grad)
            terms["reverse"] = (score_k - target).pow(2).mean()
        elif want_rev:
            score_k = self.flow_score(ctx, traj, k, x, cond, idx, reward_grad=res.get("reward_grad"))
            terms["reverse"] = w * (res["reverse"] + score_k).pow(2).mean()
        return terms

    def chain_target(self, ctx: FinetuneContext, traj: Trajectory, k: int, cond: Any, idx: Tensor,
                     score_next: Tensor, lookahead: bool = False) -> tuple[Tensor, Tensor | None]:
        """J_bᵀ(x_k) ∇log F̃(x_{k+1}) (one vector-Jacobian product through the base mean map: the
        reverse condition with the forward one substituted, module docstring) and, with
        ``lookahead``, ∇_{x_k} r(x̂₁^base(x_k)) from the same base forward pass; [b,*S], detached."""
        x = traj.xs[k][idx].detach().requires_grad_(True)
        state = index_batch(base_states(ctx.process, ctx.model, traj)[k], idx, traj.batch_size)
        reward_grad = None
        with torch.enable_grad(), ctx.model.base():
            out = model_step(ctx.process, ctx.model, x, k, cond, state)
            (g,) = torch.autograd.grad(out.mean, x, grad_outputs=score_next.detach(), retain_graph=lookahead)
            if lookahead:
                x1 = out.x1_hat if out.x1_hat is not None else x
                (reward_grad,) = torch.autograd.grad(ctx.reward(x1, cond).float().sum(), x)
        return g.detach(), None if reward_grad is None else reward_grad.detach()

    def _step_weight(self, process: Process, traj: Trajectory, k: int) -> float:
        s2 = float(traj.stds[k]) ** 2
        if self._weighting == "variance":
            return s2
        if self._weighting == "prediction":
            if self._coef is None:
                self._coef = prediction_coefficients(process, traj)
            return (s2 / max(abs(float(self._coef[k])), 1e-12)) ** 2
        return 1.0

    def _gamma(self, t: float) -> float:
        if self._gamma_fn is None:
            raise RuntimeError("gamma used before iteration() bound the process")
        return self._gamma_fn(t)

    # ---- iteration -----------------------------------------------------------------------
    def iteration(self, ctx: FinetuneContext) -> Iterator[LossOutput]:
        self._gamma_fn = make_gamma(ctx.process, self.gamma_spec)
        self._coef = None  # c_k of this rollout's grid, probed on first use
        self._weighting = self.step_weighting
        if self._weighting == "auto":  # the units of the model's output (solvers.base.control_units)
            self._weighting = "variance" if control_units(ctx.model) else "prediction"
        self._flow_frozen = ctx.iteration < self.flow_warmup
        traj, reward = rollout_for_training(ctx, ctx.reward)
        T = terminal_index(traj)
        # a fresh transition subset per update (DB losses are off-policy, any subset is valid)
        ks_per_step = [subsample_transitions(list(range(T)), self.transitions, ctx.generator, self.stratified)
                       for _ in range(self.inner_steps)]
        B = traj.batch_size
        cond_all = traj.cond
        chunks = torch.arange(B, device=traj.xs.device).tensor_split(self.inner_steps)
        use_reg = self.reg_weight > 0 and self.inner_steps > 1
        refs: dict[int, Tensor] = {}
        if use_reg:  # the rollout iterate's predictions, stored before any update
            with torch.no_grad():
                for k in sorted(set().union(*ks_per_step)):
                    refs[k] = model_step(ctx.process, ctx.model, traj.xs[k], k, cond_all, traj.states[k]).pred
        base_metrics = {"reward_mean": float(reward.mean()), "reward_std": float(reward.std(unbiased=False)),
                        "num_transitions": float(len(ks_per_step[0]))}
        soc = SocCostEstimate(self, traj, T, reward)
        for idx, ks in zip(chunks, ks_per_step):
            if idx.numel() == 0:
                continue
            cond = index_batch(cond_all, idx, B)
            # the transition terms are a mean over ks: backpropagate each transition's part as
            # it is built (its graph freed before the next; memory flat in K), one update
            fwd, rev, reg = [], [], []
            n = len(ks)
            for k in ks:
                terms = self.transition_terms(ctx, traj, k, T, cond, idx)
                soc.add(k, terms["control_sq"], idx)
                part = self.forward_weight * terms["forward"]
                fwd.append(float(terms["forward"].detach()))
                if "reverse" in terms:
                    part = part + self.reverse_weight * terms["reverse"]
                    rev.append(float(terms["reverse"].detach()))
                if use_reg:
                    l_k = (terms["pred"] - refs[k][idx]).pow(2).mean()
                    part = part + self.reg_weight * l_k
                    reg.append(float(l_k.detach()))
                yield LossOutput(loss=part / n, accumulate=True)
            zero = torch.zeros((), device=traj.xs.device)
            l_term = zero
            if self.flow is not None and self.terminal_weight > 0 and not self._flow_frozen:
                xT = traj.xs[T][idx]
                l_term = self.flow(xT, torch.full((xT.shape[0],), float(traj.ts[T]), dtype=xT.dtype,
                                                  device=xT.device)).pow(2).mean()
            l_anchor = (anchor_loss(ctx.process, ctx.model, traj, T, cond, idx)
                        if self.anchor_weight > 0 and T < traj.num_steps else zero)
            metrics = dict(base_metrics)
            metrics.update(loss_forward=sum(fwd) / n, loss_reverse=sum(rev) / n if rev else 0.0,
                           loss_terminal=float(l_term.detach()), loss_anchor=float(l_anchor.detach()),
                           loss_reg=sum(reg) / n if reg else 0.0, **soc.metrics())
            yield LossOutput(loss=self.terminal_weight * l_term + self.anchor_weight * l_anchor, metrics=metrics)
