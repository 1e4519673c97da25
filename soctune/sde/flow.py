"""Memoryless flow matching: the SDE of a velocity model with σ(t) = √(2η_t) = √(2(1−t)/t)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import register_process
from .ddpm import load_scheduler_config
from .gaussian import FlowSchedule, GaussianPathProcess


@register_process("fm-memoryless", "Memoryless flow-matching SDE σ(t)=√(2(1−t)/t) for velocity models (SD3-style); any σ incl. ODE")
class FlowMatchingMemoryless(GaussianPathProcess):
    """Flow matching x_t = t·x₁ + (1 − t)·ε sampled with the memoryless SDE

        dX = (2v(X, t) − X/t) dt + √(2(1 − t)/t) dW        (noise_scale s = 1),

    discretised by default with the exact posterior (DDIM η = s) kernel of the flow path:
    its first step from t_0 = 0 ignores x_0, so the chain is memoryless at any K.

    Models follow diffusers' FlowMatchEulerDiscreteScheduler conventions (σ = 1 − t, the
    network predicts ε − x₁ = −velocity at timestep 1000σ); the model adapter converts.

    Args:
        num_steps: K; the σ grid is ``FlowMatchEulerDiscreteScheduler.set_timesteps(K)``'s,
            including the config's ``shift`` (SD3 uses 3.0).
        scheduler_config: a FlowMatchEulerDiscreteScheduler config (dict, file or folder).
        noise_scale: s; 0 gives the deterministic sampler (see also ``sample_ode``).
        kernel: ``"ddim"`` or ``"euler"`` (Euler–Maruyama with the time offset h).
        mu: the resolution-dependent shift of configs with ``use_dynamic_shifting`` (Flux).
    """

    # not "epsilon": the grid starts at t = 0 (α = 0), where x = ε and an ε-prediction says
    # nothing about x̂₁ (its conversion divides by α = 0)
    accepts = ("velocity", "sample")

    def __init__(self, num_steps: int = 50, scheduler_config: dict[str, Any] | str | Path | None = None,
                 noise_scale: float = 1.0, kernel: str = "ddim", time_offset: float = 1e-3,
                 mu: float | None = None) -> None:
        self.schedule = FlowSchedule()
        self.scheduler_config = load_scheduler_config(scheduler_config)
        self.mu = mu
        super().__init__(num_steps, noise_scale=noise_scale, kernel=kernel, time_offset=time_offset)

    def make_grid(self, num_steps: int) -> Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        kwargs: dict[str, Any] = {}
        if sched.config.use_dynamic_shifting:
            from ..registry import SoctuneError

            if self.mu is None:
                raise SoctuneError("this scheduler config uses dynamic shifting; pass mu=... (Flux: from image size)")
            kwargs["mu"] = self.mu
        sched.set_timesteps(num_steps, **kwargs)
        sigmas = sched.sigmas.to(torch.float64)  # [K+1], ends at 0
        ts = 1 - sigmas
        ts[-1] = 1.0
        return ts
