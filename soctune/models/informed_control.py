"""A control network for user-defined SOC problems that sees the problem's own structure.

For an SOC problem dX = (b + σu)dt + σdW with terminal reward λr, the optimal control tends to
u*(x, t) → σλ∇r(x) as t → 1 and is shaped by the base drift b(x, t) before that. A plain MLP on
(x, t) must discover these functions of x from raw coordinates; when they are not monotone in x
(a double well: b and ∇r change sign at every well and at the barrier between them) its best
early fit is u ≈ 0 and it stays on that plateau for thousands of updates — SOC-matching's Double
Well is the case in point (tests/test_soc_matching.py shows the plateau and its end). Handing the
network b(x, t) and λ∇r(x) as inputs, plus a time-gated copy of λ∇r (the Path Integral Sampler's
"gradient-informed" parameterisation, Zhang & Chen 2022), removes it:

    u_φ(x, t) = c_φ(x, t, b(x, t), λ∇r(x)) + γ_φ(t) ⊙ λ∇r(x),

with c_φ a :class:`~soctune.models.base.CorrectionNet` and γ_φ a small MLP of time, both with zero
last layers, so the model starts at the zero control (the base process).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..registry import SoctuneError
from .base import CorrectionNet, FourierTimeEmbedding, SwitchableDenoiser

RewardFn = Callable[[Tensor, Any], Tensor]


class InformedControl(SwitchableDenoiser):
    """u_φ(x, t) = c_φ(x, t, b(x, t), λ∇r(x)) + γ_φ(t) ⊙ λ∇r(x) for ``control`` processes (module docstring).

    ``base()`` gives the zero control (the uncontrolled process). States are [B, D] (flat).

    Args:
        process: a process with ``base_drift(x [B, D], t) -> [B, D]`` (an
            :class:`~soctune.sde.euler_maruyama.EulerMaruyama` subclass).
        reward: r(x [B, D], cond) -> [B], differentiable; its gradient is an input feature (computed
            under its own autograd call, detached: a feature, not a path to the parameters).
        dim: D.
        reward_scale: λ (the feature is λ∇r, the control's terminal value).
        net_options: :class:`~soctune.models.base.CorrectionNet` size (hidden, depth, time_features).
    """

    prediction_type = "control"
    #: a from-scratch control network like ControlGainDenoiser's, with the same training defaults: on the
    #: Double Well (benchmarks/soc_matching.py, 1500 × 128) lr 1e-2 with a cosine decay reaches a lower
    #: control error than lr 1e-3 constant, and so do the OU problems (benchmarks/RESULTS.md)
    train_defaults = {"lr": 1e-2, "lr_schedule": "cosine"}

    def __init__(self, process: Any, reward: RewardFn, dim: int, reward_scale: float = 1.0,
                 **net_options: Any) -> None:
        super().__init__()
        if not callable(getattr(process, "base_drift", None)):
            raise SoctuneError(f"InformedControl needs a process with base_drift(x, t) (an euler-maruyama SDE), "
                               f"not {type(process).__name__}")
        # the process is a reference, not a submodule: its buffers stay out of this model's state_dict
        object.__setattr__(self, "process", process)
        self.reward, self.dim = reward, int(dim)
        self.reward_scale = float(reward_scale)
        self.correction = CorrectionNet(self.dim, context=2 * self.dim, **net_options)
        self.gate_time = FourierTimeEmbedding(8)
        self.gate = nn.Sequential(nn.Linear(2 * 8 + 1, 64), nn.SiLU(), nn.Linear(64, self.dim))
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)

    def reward_gradient(self, x: Tensor, cond: Any = None) -> Tensor:
        """λ∇r(x): [B, D] -> [B, D] (float32 reward, detached)."""
        with torch.enable_grad():
            xf = x.detach().float().requires_grad_(True)
            (g,) = torch.autograd.grad(self.reward(xf, cond).sum(), xf)
        return (self.reward_scale * g).to(x.dtype)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not self._adapt:
            return torch.zeros_like(x)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        drift = self.process.base_drift(x, float(t.reshape(-1)[0])).detach()  # one time per batch (rollouts)
        grad_r = self.reward_gradient(x, cond)
        out = self.correction(x, t, torch.cat([drift, grad_r], dim=-1))
        gate = self.gate(torch.cat([self.gate_time(t), t[:, None].float()], dim=-1)).to(x.dtype)
        return out + gate * grad_r
