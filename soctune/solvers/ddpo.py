"""DDPO: PPO-clip policy gradient on the per-step Gaussian log-densities (Black et al. 2023).

Each iteration samples B trajectories of the fine-tuned model without gradient, scores them,
and turns rewards into advantages normalised per condition (a per-prompt stat tracker as in the
paper: a running buffer of each condition's recent rewards; the batch statistics while the
buffer holds fewer than ``stat_min_count`` rewards; the whole batch when there is no per-sample
hashable conditioning). It then runs ``inner_epochs`` passes over the batch in ``minibatches``
shuffled minibatches; each minibatch is one PPO update (one yielded :class:`LossOutput`):

    ρ_{k,b} = exp(log N(x_{k+1}; m_θ(x_k), s_k²I) − log p_old),      A_b ∈ [−A_max, A_max],
    L = mean_{k∈S, b} max(−A_b ρ_{k,b}, −A_b clip(ρ_{k,b}, 1−ε, 1+ε)),

with the recorded x_k, x_{k+1} of the sampling pass (the mean recomputed through
``model_step``), S the stochastic steps (s_k > 0; deterministic steps have no density), or a
random ``step_fraction`` of them per minibatch. Advantages are normalised, so the result does
not depend on λ (accepted for a uniform interface; it only scales the loss).

``logprob_reduction="mean"`` (the default) averages the log-density over the state's D
dimensions, as the DDPO paper's code (ddpo-pytorch) and flow_grpo do, with their clip_range 1e-4:
the ratio is then the D-th root of the exact likelihood ratio. ``"sum"`` is the exact ratio, but
its log grows with D, so after one update nearly every latent sample's ratio leaves [1 − 1e-4,
1 + 1e-4] and the surrogate is clipped almost everywhere (no gradient): with "sum" use a much wider
clip_range (e.g. 0.2, as the GMM benchmarks do).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Hashable, Iterator

import torch
from torch import Tensor

from ..models.base import index_batch
from ..registry import SoctuneError
from ..sde.base import Process
from ..trajectory import GradSpec, Trajectory, model_step, rollout
from .base import FinetuneContext, LossOutput, Solver, register_solver


class PerConditionStatTracker:
    """Running reward statistics per condition key (DDPO's per-prompt stat tracker).

    ``update(keys, rewards)`` appends each condition's rewards to its buffer (the last
    ``buffer_size``) and returns A = (r − μ)/(σ + 1e-6) with μ, σ (population std) of that buffer,
    or of the whole current batch while the buffer holds fewer than ``min_count`` rewards.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 0:
            raise SoctuneError(f"stat_buffer_size must be ≥ 1 and stat_min_count ≥ 0, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.buffers: dict[Hashable, deque[float]] = {}

    def update(self, keys: list[Hashable], rewards: Tensor) -> Tensor:
        """keys: B hashable condition keys; rewards [B] -> advantages [B] (float64)."""
        r = rewards.detach().double().cpu()
        adv = torch.empty_like(r)
        batch_mu, batch_sd = float(r.mean()), float(r.std(unbiased=False))
        groups: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            buf = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buf.extend(float(v) for v in r[idx])
            if len(buf) < self.min_count:
                mu, sd = batch_mu, batch_sd
            else:
                vals = torch.tensor(list(buf), dtype=torch.float64)
                mu, sd = float(vals.mean()), float(vals.std(unbiased=False))
            adv[idx] = (r[idx] - mu) / (sd + 1e-6)
        return adv.to(rewards.device)

    def state(self) -> list[tuple[Hashable, list[float]]]:
        """[(condition key, buffered rewards)] — pairs, not a dict: keys may be any hashable
        (None, tuples, prompts), and checkpoints store plain JSON, whose keys are strings."""
        return [(k, list(v)) for k, v in self.buffers.items()]

    def load_state(self, state: list[tuple[Hashable, list[float]]]) -> None:
        self.buffers = {_hashable(k): deque(v, maxlen=self.buffer_size) for k, v in state}


@register_solver("ddpo", "DDPO: PPO-clip policy gradient on per-step log-probs, per-condition advantages (reward-gradient free)")
class DDPOSolver(Solver):
    """Denoising diffusion policy optimisation (see the module docstring for the objective).

    Args:
        reward_scale: λ (advantages are normalised, so it only scales the loss).
        inner_epochs: PPO passes over each sampled batch.
        minibatches: minibatches per pass (each is one optimiser step).
        clip_range: ε of the ratio clip [1−ε, 1+ε].
        adv_clip_max: advantages are clamped to [−A_max, A_max].
        per_condition: normalise advantages per condition (when the conditioning is per-sample
            hashable); otherwise over the batch.
        stat_buffer_size, stat_min_count: the per-condition tracker's buffer length and the
            count below which the batch statistics are used.
        step_fraction: share of the stochastic steps trained on per minibatch (random subset).
        logprob_reduction: ``"mean"`` over the state dimensions (default, the paper's setting
            for clip_range 1e-4) or ``"sum"`` (the exact density; needs a wider clip_range).
    """

    needs_stochastic = True

    def __init__(self, reward_scale: float = 1.0, inner_epochs: int = 1, minibatches: int = 1,
                 clip_range: float = 1e-4, adv_clip_max: float = 5.0, per_condition: bool = True,
                 stat_buffer_size: int = 32, stat_min_count: int = 16, step_fraction: float = 1.0,
                 logprob_reduction: str = "mean") -> None:
        super().__init__(reward_scale)
        if int(inner_epochs) < 1 or int(minibatches) < 1:
            raise SoctuneError(f"inner_epochs and minibatches must be ≥ 1, got {inner_epochs}, {minibatches}")
        if not clip_range > 0 or not adv_clip_max > 0:
            raise SoctuneError(f"clip_range and adv_clip_max must be > 0, got {clip_range}, {adv_clip_max}")
        if not 0 < step_fraction <= 1:
            raise SoctuneError(f"step_fraction must be in (0, 1], got {step_fraction}")
        if logprob_reduction not in ("sum", "mean"):
            raise SoctuneError(f"logprob_reduction must be 'sum' or 'mean', got '{logprob_reduction}'")
        self.inner_epochs, self.minibatches = int(inner_epochs), int(minibatches)
        self.clip_range, self.adv_clip_max = float(clip_range), float(adv_clip_max)
        self.per_condition = bool(per_condition)
        self.step_fraction = float(step_fraction)
        self.logprob_reduction = logprob_reduction
        self.tracker = PerConditionStatTracker(stat_buffer_size, stat_min_count)

    # ---- advantages ----------------------------------------------------------------------
    def advantages(self, rewards: Tensor, cond: Any) -> Tensor:
        """Normalised advantages [B] from rewards [B] (updates the per-condition tracker)."""
        keys = _condition_keys(cond, rewards.shape[0]) if self.per_condition else None
        if keys is None:
            keys = [None] * rewards.shape[0]
        return self.tracker.update(keys, rewards)

    # ---- one iteration -------------------------------------------------------------------
    def iteration(self, ctx: FinetuneContext) -> Iterator[LossOutput]:
        p, model = ctx.process, ctx.model
        cond = ctx.sample_cond()
        with torch.no_grad():
            traj = rollout(p, model, batch_size=ctx.batch_size, sample_shape=ctx.sample_shape, cond=cond,
                           generator=ctx.generator, grad=GradSpec.none(), device=ctx.device)
            reward = ctx.reward(traj.x_final, cond).detach().float()
        steps = traj.stochastic_steps()
        if not steps:
            raise SoctuneError(f"DDPO needs stochastic steps, but '{p.registered_name}' sampled none; "
                               "raise noise_scale or pick another process")
        adv = self.advantages(reward, cond).float().clamp(-self.adv_clip_max, self.adv_clip_max)
        old_logp = self._reduce(traj.log_probs(), traj)  # [K, B]
        base_metrics = {"reward_mean": float(reward.mean()),
                        "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
                        "adv_abs_mean": float(adv.abs().mean())}
        b = traj.batch_size
        n_train = max(1, math.ceil(self.step_fraction * len(steps)))
        for epoch in range(self.inner_epochs):
            perm = torch.randperm(b, generator=ctx.generator, device=ctx.generator.device).to(traj.xs.device)
            for mb in perm.chunk(self.minibatches):
                if mb.numel() == 0:
                    continue
                pick = torch.randperm(len(steps), generator=ctx.generator, device=ctx.generator.device)[:n_train].sort().values.cpu()
                loss, metrics = self.ppo_loss(p, model, traj, [steps[int(i)] for i in pick], mb, adv, old_logp)
                metrics.update(base_metrics, epoch=float(epoch))
                yield LossOutput(loss, metrics)

    def ppo_loss(self, process: Process, model: Any, traj: Trajectory, steps: list[int], idx: Tensor,
                 adv: Tensor, old_logp: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Clipped surrogate averaged over ``steps`` and the minibatch ``idx`` [b];
        adv [B], old_logp [K, B]. Returns (loss, metrics incl. ratio and clip statistics)."""
        cond = index_batch(traj.cond, idx, traj.batch_size)
        a = adv[idx]
        total = torch.zeros((), device=traj.xs.device)
        unclipped_sum, clipfrac, approx_kl, ratio_dev = 0.0, 0.0, 0.0, 0.0
        for k in steps:
            state = index_batch(traj.states[k], idx, traj.batch_size)
            out = model_step(process, model, traj.xs[k][idx], k, cond, state)
            logp = Process.log_prob(traj.xs[k + 1][idx], out.mean, traj.stds[k])
            logp = self._reduce(logp, traj)
            ratio = torch.exp(logp - old_logp[k, idx])
            unclipped = -a * ratio
            clipped = -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
            total = total + torch.maximum(unclipped, clipped).mean()
            with torch.no_grad():
                unclipped_sum += float(unclipped.mean())
                clipfrac += float(((ratio - 1).abs() > self.clip_range).float().mean())
                approx_kl += float(0.5 * (logp - old_logp[k, idx]).pow(2).mean())
                ratio_dev = max(ratio_dev, float((ratio - 1).abs().max()))
        n = len(steps)
        loss = self.reward_scale * total / n
        metrics = {"loss_unclipped": self.reward_scale * unclipped_sum / n, "clipfrac": clipfrac / n,
                   "approx_kl": approx_kl / n, "ratio_max_dev": ratio_dev}
        return loss, metrics

    def _reduce(self, logp: Tensor, traj: Trajectory) -> Tensor:
        return logp / traj.xs[0, 0].numel() if self.logprob_reduction == "mean" else logp

    def extra_state(self) -> dict[str, Any]:
        return {"stat_tracker": self.tracker.state(), "logprob_reduction": self.logprob_reduction}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        # the reduction sets the ratio's scale: resuming with the other one would change the run's
        # objective mid-way (checkpoints written before it was recorded carry no entry: accepted)
        saved = state.get("logprob_reduction", self.logprob_reduction)
        if saved != self.logprob_reduction:
            raise SoctuneError(f"the checkpoint was trained with ddpo logprob_reduction='{saved}', this run has "
                               f"'{self.logprob_reduction}'; resume with solver.logprob_reduction={saved}")
        self.tracker.load_state(state.get("stat_tracker", []))


def _hashable(key: Any) -> Hashable:
    """A condition key as stored (lists from JSON become tuples again)."""
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def _condition_keys(cond: Any, b: int) -> list[Hashable] | None:
    """One hashable key per sample, or None when the conditioning is absent or not per-sample
    (then advantages are normalised over the batch)."""
    if cond is None:
        return None
    prompts = getattr(cond, "prompts", None)  # text conditioning: the prompt is the key (DDPO's per-prompt stats)
    if isinstance(prompts, (list, tuple)) and len(prompts) == b:
        return list(prompts)
    if isinstance(cond, Tensor):
        if cond.dim() == 0 or cond.shape[0] != b:
            return None
        flat = cond.detach().reshape(b, -1).cpu()
        return [tuple(row.tolist()) for row in flat]
    if isinstance(cond, (list, tuple)) and len(cond) == b:
        try:
            for c in cond:
                hash(c)
        except TypeError:
            return None
        return list(cond)
    if isinstance(cond, dict):
        parts = [_condition_keys(v, b) for v in cond.values()]
        if not parts or any(p is None for p in parts):
            return None
        return [tuple(p[i] for p in parts) for i in range(b)]  # type: ignore[index]
    return None
