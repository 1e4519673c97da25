"""A correction model in control units, for analytic and user-defined problems.

The fine-tuned chain differs from the base only through its step means, and a solver that claims
the tilt regresses the per-step control u_k = (m_θ(x_k) − m_base(x_k)) / s_k. A plain additive
correction of the prediction, pred_θ = pred_base + c_φ, gives u_k = (c_k / s_k)·c_φ with
c_k = ∂m_k/∂pred: on a velocity model with the memoryless flow SDE, s_k / |c_k| runs over three
decades along a 25-step chain, so c_φ must output values three decades apart. With the gain
g_k = s_k / |c_k| in front of it, c_φ outputs the control itself, O(1) at every step.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..registry import SoctuneError
from ..sde.base import Process
from ..trajectory import step_prediction_coefficient
from .base import CorrectedDenoiser, Denoiser


class ControlGainDenoiser(CorrectedDenoiser):
    """The base plus a correction expressed in CONTROL units:

        pred_θ(x, t_k) = pred_base(x, t_k) + g_k·c_φ(x, t_k, pred_base),   g_k = s_k / |∂m_k/∂pred|,

    so that u_k = sign(c_k)·c_φ. g = 0 on deterministic steps (s_k = 0; e.g. the last jump to the
    data) keeps the base's step there, as the tilted path measure does.

    Solvers weigh their regression in the units the model outputs (``step_weighting="auto"``):
    :attr:`control_units` is True here, so a control-units loss is the well-conditioned one.

    Args:
        base_model: the frozen base :class:`Denoiser` (e.g. an exact Gaussian mixture).
        process: the process (and grid) the model will be rolled out on; the gains are computed
            once from its step kernels. Times off this grid take the nearest grid step's gain.
        sample_shape: the state shape S (the correction works on the flattened [B, D]); may be left
            out when the base model knows it (:attr:`~soctune.models.base.Denoiser.sample_shape`).
        net_options: :class:`~soctune.models.base.CorrectionNet` size (hidden, depth, time_features).
    """

    control_units = True
    #: a from-scratch network whose output is the control itself, O(1) at every step: it tolerates a
    #: far larger step than a LoRA on a pretrained network, and the tilt's mixture weights hinge on
    #: small controls at mid times that a 3e-4 Adam step fits too slowly — even against exact targets
    #: (the K-step optimum's control by dynamic programming, benchmarks/NOTES.md). The cosine decay
    #: then averages the noise of the solvers' regression targets down.
    train_defaults = {"lr": 1e-2, "lr_schedule": "cosine"}

    def __init__(self, base_model: Denoiser, process: Process, sample_shape: Sequence[int] | int | None = None,
                 **net_options: Any) -> None:
        super().__init__(base_model, base_features=True, sample_shape=sample_shape, **net_options)
        if self.sample_shape is None:
            raise SoctuneError("ControlGainDenoiser needs the state shape: pass sample_shape=(...) (or a base model "
                               "that knows it)")
        x, state = torch.zeros(1, *self.sample_shape), process.init_state()
        gains = []
        for k in range(process.num_steps):
            c = abs(step_prediction_coefficient(process, k, x, state, self.prediction_type))
            out = process.step_kernel(x, k, torch.zeros_like(x), state, self.prediction_type)
            gains.append(float(out.std) / c if c > 0 else 0.0)
            # multistep kernels (order-2 dpmpp-sde) read the previous step's state: thread it
            state = out.state or state
        self.register_buffer("times", process.ts[:-1].clone().double(), persistent=False)
        self.register_buffer("gains", torch.tensor(gains, dtype=torch.float64), persistent=False)

    def gain(self, t: Tensor) -> Tensor:
        """g_k of each row's nearest grid step: t [B] -> [B] float64."""
        k = torch.argmin((self.times[None, :] - t.reshape(-1, 1).double()).abs(), dim=1)
        return self.gains[k]

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self.base_model(x, t, cond)
        if not self._adapt:
            return out
        b = x.shape[0]
        corr = self.correction(x.reshape(b, -1), t, out.reshape(b, -1)).reshape(x.shape)
        gain = self.gain(t.expand(b) if t.numel() == 1 else t).to(corr.dtype)
        return out + gain.reshape(b, *([1] * (x.dim() - 1))) * corr
