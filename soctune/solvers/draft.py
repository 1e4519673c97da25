"""Reward backpropagation through the sampler: DRaFT, DRaFT-K, DRaFT-LV and ReFL in one solver.

Following the unified algorithm of DRaFT (Clark et al. 2023), every variant maximises
λ·E[r(x)] by differentiating the reward through (part of) the sampling chain
x_{k+1} = m_θ(x_k, k) + s_k ξ_k; they differ only in which steps keep the autograd graph and
at which state the reward is read:

* **DRaFT-K** (``k=K``): graph through the last K executed steps, stop-gradient before them
  (``rollout(grad=GradSpec.last(K))``); reward r(x_final).
* **DRaFT** (``k="all"`` or ``k`` ≥ the number of steps): graph through every step, each
  wrapped in gradient checkpointing (``GradSpec.all(checkpoint=True)``).
* **DRaFT-LV** (``lv_samples=n``, with ``k=1``): the paper re-noises the final sample to the
  last step's noise level n times and averages the rewards of n one-step denoisings. On the
  trajectory interface: let j be the last stochastic step before the final one (s_j > 0,
  j ≤ K−2). Roll out without gradient to x_j, redraw the kernel noise of step j n times,
      x̃ⁱ_{j+1} = m_j + s_j ξⁱ   (m_j, s_j from the recorded, gradient-free step j),
  and run the remaining steps j+1 … K−1 from every x̃ⁱ WITH gradient (fresh noise for any
  stochastic step among them); loss −λ·mean_{b,i} r(x_Kⁱ). On DDPM and flow processes the
  remaining step is the deterministic final jump to x̂₁, exactly the paper's setting.
* **ReFL** (``variant="refl"``): roll out without gradient to a random late step
  k ~ U{k_min, …, k_max−1}, take that one step with gradient and score the data estimate
  x̂₁ it predicts (``traj.x1_hat_final``), not the final sample.

Loss = −λ·mean_b r_b + kl_weight·mean_b Σ_{k∈D, s_k>0} ‖m_θ(x_k) − m_base(x_k)‖²/(2 s_k²)
       + output_reg_weight·mean_b Σ_{k∈D} ‖pred_θ(x_k) − pred_base(x_k)‖²,
where D is the set of differentiated steps and the regularisers are evaluated at the recorded
(detached) states: they penalise the per-step KL between the fine-tuned and the base Gaussian
kernels (the discrete path-space KL restricted to D) and the drift of the raw prediction.
Deterministic steps (s_k = 0) have no KL term — use the output regulariser there.

None of these samples the tilt p_base·e^{λr}: without a (full-path) KL the optimum is
mode-seeking reward maximisation. λ only scales the reward against the regularisers.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from einops import rearrange
from torch import Tensor

from ..models.base import Denoiser, index_batch
from ..registry import SoctuneError
from ..sde.base import Process
from ..trajectory import GradSpec, model_step, rollout
from .base import FinetuneContext, LossOutput, Solver, _probe_stds, register_solver


@register_solver("draft", "DRaFT / DRaFT-K / DRaFT-LV / ReFL: backpropagate the reward through the last sampling steps")
class DraftSolver(Solver):
    """Direct reward fine-tuning (see the module docstring for the variants' definitions).

    Args:
        reward_scale: λ (loss = −λ·mean reward + regularisers).
        k: steps kept in the graph: an int ≥ 1 (DRaFT-K) or ``"all"`` (full DRaFT).
        checkpoint: gradient checkpointing for full DRaFT (memory O(1) in the number of steps).
        lv_samples: n > 0 selects DRaFT-LV with n re-noised copies per sample (needs ``k=1``).
        variant: ``"draft"`` (the default family above) or ``"refl"``.
        refl_k_min, refl_k_max: ReFL's stop step is uniform on {k_min, …, k_max − 1};
            defaults ⌊0.75·K⌋ and K (the last quarter of the chain, ReFL's last 10 of 40).
        kl_weight: weight of the per-step Gaussian KL to the base on the differentiated steps.
        output_reg_weight: weight of ‖pred_θ − pred_base‖² on the differentiated steps.
    """

    def __init__(self, reward_scale: float = 1.0, k: int | str = 1, checkpoint: bool = True,
                 lv_samples: int = 0, variant: str = "draft", refl_k_min: int | None = None,
                 refl_k_max: int | None = None, kl_weight: float = 0.0, output_reg_weight: float = 0.0) -> None:
        super().__init__(reward_scale)
        if variant not in ("draft", "refl"):
            raise SoctuneError(f"draft variant must be 'draft' or 'refl', got '{variant}'")
        self.variant = variant
        self.k_all, self.k = _parse_k(k)
        self.checkpoint = bool(checkpoint)
        self.lv_samples = int(lv_samples)
        if self.lv_samples < 0:
            raise SoctuneError(f"lv_samples must be ≥ 0, got {lv_samples}")
        if variant == "refl" and (self.k_all or self.k != 1):
            raise SoctuneError("ReFL differentiates exactly one step (its random stop step); drop k or use variant='draft'")
        if self.lv_samples and (variant == "refl" or self.k_all or self.k != 1):
            raise SoctuneError("lv_samples (DRaFT-LV) is defined for k=1 and variant='draft'; drop lv_samples or set k=1")
        if kl_weight < 0 or output_reg_weight < 0:
            raise SoctuneError("kl_weight and output_reg_weight must be ≥ 0")
        self.kl_weight, self.output_reg_weight = float(kl_weight), float(output_reg_weight)
        self.refl_k_min, self.refl_k_max = refl_k_min, refl_k_max

    # ---- impossible pairs ----------------------------------------------------------------
    def check(self, process: Process, model: Denoiser) -> None:
        super().check(process, model)
        if self.variant == "refl":
            lo, _ = self.refl_range(process)
            try:  # probe the kernel with a zero prediction: does it expose x̂₁?
                has_x1_hat = process.step_kernel(torch.zeros(1, 1), lo, torch.zeros(1, 1), process.init_state(),
                                                 process.accepts[0]).x1_hat is not None
            except Exception:  # a kernel that needs a real prediction: decided at the first iteration
                has_x1_hat = True
            if not has_x1_hat:
                raise SoctuneError(f"ReFL scores the data estimate x̂₁, which process '{process.registered_name}' "
                                   "does not provide; use variant='draft'")
        if self.lv_samples:
            self.lv_step(process)

    def refl_range(self, process: Process) -> tuple[int, int]:
        """ReFL's stop-step range [k_min, k_max) on ``process`` (validated)."""
        n = process.num_steps
        lo = int(0.75 * n) if self.refl_k_min is None else int(self.refl_k_min)
        hi = n if self.refl_k_max is None else int(self.refl_k_max)
        if not 0 <= lo < hi <= n:
            raise SoctuneError(f"ReFL needs 0 ≤ refl_k_min < refl_k_max ≤ num_steps={n}, got [{lo}, {hi})")
        return lo, hi

    def lv_step(self, process: Process) -> int:
        """j: the last stochastic step before the final one, whose noise DRaFT-LV redraws."""
        stds = _probe_stds(process)
        cands = [k for k in range(process.num_steps - 1) if stds[k] > 0]
        if not cands:
            raise SoctuneError(f"DRaFT-LV redraws the noise of a stochastic step before the last one, but "
                               f"'{process.registered_name}' has none; raise noise_scale/num_steps or drop lv_samples")
        return cands[-1]

    # ---- one iteration -------------------------------------------------------------------
    def iteration(self, ctx: FinetuneContext) -> Iterator[LossOutput]:
        cond = ctx.sample_cond()
        if self.variant == "refl":
            reward, diff_states, metrics = self._refl(ctx, cond)
        elif self.lv_samples:
            reward, diff_states, metrics = self._lv(ctx, cond)
        else:
            reward, diff_states, metrics = self._draft_k(ctx, cond)
        loss = -self.reward_scale * reward.mean()
        if self.kl_weight > 0 or self.output_reg_weight > 0:
            kl, out_reg = self._regularisers(ctx, diff_states)
            loss = loss + self.kl_weight * kl + self.output_reg_weight * out_reg
            metrics.update(kl=float(kl.detach()), output_reg=float(out_reg.detach()))
        r = reward.detach().float()
        metrics.update(reward_mean=float(r.mean()), reward_std=float(r.std()) if r.numel() > 1 else 0.0)
        yield LossOutput(loss, metrics)

    def grad_spec(self, num_steps: int) -> GradSpec:
        if self.k_all or self.k >= num_steps:
            return GradSpec.all(checkpoint=self.checkpoint)
        return GradSpec.last(self.k)

    def _draft_k(self, ctx: FinetuneContext, cond: Any) -> tuple[Tensor, list[_DiffStep], dict[str, float]]:
        p = ctx.process
        spec = self.grad_spec(p.num_steps)
        traj = rollout(p, ctx.model, batch_size=ctx.batch_size, sample_shape=ctx.sample_shape, cond=cond,
                       generator=ctx.generator, grad=spec, device=ctx.device)
        reward = ctx.reward(traj.x_final, cond)
        n = traj.num_steps
        diff = [_DiffStep(k, traj.xs[k], traj.states[k], cond, float(traj.stds[k]))
                for k in range(n) if spec.keeps_graph(k, n)] if self._regularised else []
        return reward, diff, {}

    def _refl(self, ctx: FinetuneContext, cond: Any) -> tuple[Tensor, list[_DiffStep], dict[str, float]]:
        p = ctx.process
        lo, hi = self.refl_range(p)
        stop = int(torch.randint(lo, hi, (1,), generator=ctx.generator, device=ctx.generator.device))
        traj = rollout(p, ctx.model, batch_size=ctx.batch_size, sample_shape=ctx.sample_shape, cond=cond,
                       generator=ctx.generator, grad=GradSpec.last(1), stop_at=stop + 1, device=ctx.device)
        if traj.x1_hat_final is None:
            raise SoctuneError(f"ReFL needs the data estimate x̂₁, which process '{p.registered_name}' does not "
                               "provide; use variant='draft'")
        reward = ctx.reward(traj.x1_hat_final, cond)
        diff = [_DiffStep(stop, traj.xs[stop], traj.states[stop], cond, float(traj.stds[stop]))] \
            if self._regularised else []
        return reward, diff, {"stop_step": float(stop)}

    def _lv(self, ctx: FinetuneContext, cond: Any) -> tuple[Tensor, list[_DiffStep], dict[str, float]]:
        p, model, n = ctx.process, ctx.model, self.lv_samples
        j = self.lv_step(p)
        # one extra gradient-free step so the trajectory records the state entering step j+1
        # (multistep kernels carry the previous x̂₁); j ≤ K−2 so j+2 ≤ K
        traj = rollout(p, model, batch_size=ctx.batch_size, sample_shape=ctx.sample_shape, cond=cond,
                       generator=ctx.generator, grad=GradSpec.none(), stop_at=j + 2, device=ctx.device)
        b = traj.batch_size
        xi = torch.randn((n, *traj.means[j].shape), generator=ctx.generator, device=traj.xs.device,
                         dtype=traj.xs.dtype)
        x = rearrange(traj.means[j][None] + traj.stds[j] * xi, "n b ... -> (n b) ...")
        tile = torch.arange(n * b, device=traj.xs.device) % b  # n copies of the batch, laid out as (n b)
        cond_n = index_batch(cond, tile, b)
        state = index_batch(traj.states[j + 1], tile, b)
        diff: list[_DiffStep] = []
        for k in range(j + 1, p.num_steps):
            if self._regularised:
                diff.append(_DiffStep(k, x.detach(), {key: v.detach() for key, v in state.items()}, cond_n, -1.0))
            out = model_step(p, model, x, k, cond_n, state)
            if self._regularised:
                diff[-1].std = float(out.std)
            if float(out.std) > 0:
                x = out.mean + out.std * torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
            else:
                x = out.mean
            state = out.state
        reward = ctx.reward(x, cond_n)
        # per-sample average over the n re-noised copies: [n·B] -> [B]
        reward = rearrange(reward, "(n b) -> n b", n=n).mean(0)
        return reward, diff, {"lv_step": float(j)}

    # ---- regularisers --------------------------------------------------------------------
    @property
    def _regularised(self) -> bool:
        return self.kl_weight > 0 or self.output_reg_weight > 0

    def _regularisers(self, ctx: FinetuneContext, steps: list["_DiffStep"]) -> tuple[Tensor, Tensor]:
        """(mean_b Σ_k ‖m_θ − m_base‖²/(2s_k²) over stochastic steps, mean_b Σ_k ‖pred_θ − pred_base‖²),
        both at the recorded states x_k [B,*S] (gradient through θ only)."""
        kl = torch.zeros((), device=ctx.device)
        out_reg = torch.zeros((), device=ctx.device)
        for st in steps:
            out = model_step(ctx.process, ctx.model, st.x, st.k, st.cond, st.state)
            with torch.no_grad(), ctx.model.base():
                out_b = model_step(ctx.process, ctx.model, st.x, st.k, st.cond, st.state)
            assert out.pred is not None and out_b.pred is not None
            out_reg = out_reg + (out.pred - out_b.pred).pow(2).flatten(1).sum(1).mean()
            if st.std > 0:
                kl = kl + ((out.mean - out_b.mean).pow(2).flatten(1).sum(1) / (2 * st.std**2)).mean()
        return kl, out_reg


class _DiffStep:
    """A differentiated step for the regularisers: index k, detached x_k [B,*S], state, cond, s_k."""

    __slots__ = ("k", "x", "state", "cond", "std")

    def __init__(self, k: int, x: Tensor, state: dict[str, Tensor], cond: Any, std: float) -> None:
        self.k, self.x, self.state, self.cond, self.std = k, x, state, cond, std


def _parse_k(k: int | str) -> tuple[bool, int]:
    if isinstance(k, str):
        if k.strip().lower() == "all":
            return True, 0
        try:
            k = int(k)
        except ValueError:
            raise SoctuneError(f"draft k must be a positive integer or 'all', got '{k}'") from None
    if int(k) < 1:
        raise SoctuneError(f"draft k must be ≥ 1 (or 'all'), got {k}")
    return False, int(k)

