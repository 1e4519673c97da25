"""A user-defined SDE dX = b(X, t) dt + σ(t) dW, discretised by Euler–Maruyama."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..registry import SoctuneError
from .base import Process, register_process

DriftFn = Callable[[Tensor, float], Tensor]
DiffusionFn = Callable[[float], float]


@register_process("euler-maruyama", "Any user SDE dX=b(X,t)dt+σ(t)dW (Euler–Maruyama); the model is a control or a drift")
class EulerMaruyama(Process):
    """The library API for new SDE samplers.

    The model prediction enters the drift in one of two ways:

    * ``prediction_type == "control"``: b_θ(x, t) = b(x, t) + σ(t)·u_θ(x, t) — SOC form; the
      base model of an SOC problem is :class:`~soctune.models.base.ZeroDenoiser`.
    * ``prediction_type == "drift"``: b_θ(x, t) = pred (a neural SDE's full drift).

    Subclass and override :meth:`base_drift` and :meth:`diffusion` (and ``make_grid``/``prior``)
    to define a process in one file, or pass callables. The subclass's own parameters are
    annotated class attributes with defaults, taken as constructor keywords::

        @register_process("my-linear")
        class MyLinear(EulerMaruyama):
            a: float = -1.0                      # dX = a·X dt + σ dW
            def base_drift(self, x, t):
                return self.a * x

        get_process("my-linear", a=-2.0, num_steps=20)

    Args:
        drift: b(x [B,*S], t) -> [B,*S]; default 0.
        diffusion: σ(t) -> float; default 1.
        num_steps: K (uniform grid on [0, 1]).
        params: the subclass's declared parameters (see :meth:`Process.declared_params`).
        prior_std: x_0 ~ N(prior_mean, prior_std² I); 0 gives a fixed start.
        memoryless: declare that X_0 and X_1 are independent under the base process (implied
            by a fixed start, prior_std = 0).
    """

    accepts = ("control", "drift")

    def __init__(self, drift: DriftFn | None = None, diffusion: DiffusionFn | float | None = None,
                 num_steps: int = 100, prior_mean: float = 0.0, prior_std: float = 1.0,
                 memoryless: bool = False, **params: Any) -> None:
        if prior_std < 0:
            raise SoctuneError(f"prior_std must be ≥ 0, got {prior_std}")
        self._drift_fn = drift
        self._sigma = diffusion
        self.prior_mean, self.prior_std = float(prior_mean), float(prior_std)
        # a fixed start (prior_std = 0) is independent of X_1 whatever the dynamics
        self.memoryless = bool(memoryless) or self.prior_std == 0.0  # type: ignore[misc]
        super().__init__(num_steps, **params)

    def prior(self, shape, generator=None, device=None, dtype=torch.float32) -> Tensor:  # type: ignore[override]
        return self.prior_mean + self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def base_drift(self, x: Tensor, t: float) -> Tensor:
        """Uncontrolled drift b(x, t) [B,*S]."""
        return torch.zeros_like(x) if self._drift_fn is None else self._drift_fn(x, t)

    def diffusion(self, t: float) -> float:
        if self._sigma is None:
            return 1.0
        return float(self._sigma(t)) if callable(self._sigma) else float(self._sigma)

    def drift(self, x: Tensor, t: float, pred: Tensor, prediction_type: str) -> Tensor:
        if prediction_type == "drift":
            return pred
        if prediction_type == "control":
            return self.base_drift(x, t) + self.diffusion(t) * pred
        raise SoctuneError(f"euler-maruyama takes 'control' or 'drift' models, not '{prediction_type}'")
