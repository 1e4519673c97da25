"""Ancestral DDPM: the exact posterior step on a diffusers VP schedule (= DDIM with η = 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..registry import SoctuneError
from .base import StepOutput, register_process
from .gaussian import DiscreteVPSchedule, GaussianPathProcess


def load_scheduler_config(config: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    """A diffusers scheduler config from a dict, a ``scheduler_config.json`` file, or a
    folder holding one (a pipeline folder's ``scheduler/`` is looked into too)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    for cand in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise SoctuneError(f"no diffusers scheduler config at '{config}'; pass a scheduler_config.json or its folder")


@register_process("ddpm", "Ancestral DDPM / DDIM(η=1) on the model's VP schedule; memoryless, for ε, v or x̂₁ (sample) models")
class DDPM(GaussianPathProcess):
    """Ancestral DDPM on the discrete ᾱ schedule of a diffusers scheduler config.

    The step from diffusers timestep τ to τ' = τ − N/K is q(x_τ' | x_τ, x̂₁) (x̂₁ the data
    estimate, diffusers' ``pred_original_sample``):
        mean = √ᾱ_τ' x̂₁ + √(1 − ᾱ_τ' − v) ε̂,  v = (1−ᾱ_τ')/(1−ᾱ_τ)·(1 − ᾱ_τ/ᾱ_τ'),
    which equals ``DDPMScheduler.step`` (variance_type="fixed_small"). The last step lands
    on ᾱ = 1 and is deterministic (std = 0): solvers leave it out of log-density terms.

    Args:
        num_steps: K inference steps; timesteps follow the config's ``timestep_spacing`` and
            ``steps_offset`` exactly as ``DDPMScheduler.set_timesteps``.
        scheduler_config: a diffusers DDPM/DDIM scheduler config (dict, file or folder);
            ``None`` = diffusers' DDPMScheduler defaults with ``clip_sample=False``.
        noise_scale: DDIM η (1 = DDPM).
        kernel: ``"ddim"`` (exact) or ``"euler"``.
    """

    accepts = ("epsilon", "v_prediction", "sample")

    def __init__(self, num_steps: int = 50, scheduler_config: dict[str, Any] | str | Path | None = None,
                 noise_scale: float = 1.0, kernel: str = "ddim", time_offset: float = 1e-3) -> None:
        from diffusers import DDPMScheduler

        # without a config, diffusers' defaults except clip_sample: clipping x̂₁ to [−1, 1] is an
        # image-space heuristic that would corrupt any data outside that range
        cfg = load_scheduler_config(scheduler_config) if scheduler_config is not None else {"clip_sample": False}
        cfg.pop("_class_name", None)
        cfg.pop("_diffusers_version", None)
        self._sched = DDPMScheduler.from_config(cfg)
        if self._sched.config.thresholding:
            raise SoctuneError("dynamic thresholding is not supported; set thresholding=false in the scheduler config")
        self.scheduler_config = dict(self._sched.config)
        self.schedule = DiscreteVPSchedule(self._sched.alphas_cumprod)
        super().__init__(num_steps, noise_scale=noise_scale, kernel=kernel, time_offset=time_offset)

    def make_grid(self, num_steps: int) -> Tensor:
        self._sched.set_timesteps(num_steps)
        taus = self._sched.timesteps.to(torch.float64)
        N = self._sched.config.num_train_timesteps
        return torch.cat([1 - (taus + 1) / N, torch.ones(1, dtype=torch.float64)])

    def step_kernel(self, x: Tensor, k: int, pred: Tensor, state: dict[str, Tensor],
                    prediction_type: str) -> StepOutput:
        cfg = self._sched.config
        if not cfg.clip_sample or self.kernel == "euler":
            return super().step_kernel(x, k, pred, state, prediction_type)
        # clip x̂₁ as diffusers does, then re-derive ε̂ from the clipped x̂₁ (DDIM's rule, which
        # leaves the η = 1 mean equal to DDPM's posterior mean on the clipped x̂₁)
        x1, _ = self.split(x, self.model_time(k), pred, prediction_type)
        x1 = x1.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return super().step_kernel(x, k, x1, state, "sample")
