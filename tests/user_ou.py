"""A user-defined process in one file: the Ornstein–Uhlenbeck SDE

    dX = θ(μ − X) dt + σ dW,   X_0 ~ N(m₀, s₀²),

written the way a user would: subclass :class:`~soctune.sde.euler_maruyama.EulerMaruyama`,
override the base drift and the diffusion, register a name. It is then reachable as
``get_process("user-ou")`` and as the import path ``"user_ou:OUProcess"``.
"""

from __future__ import annotations

import math

from torch import Tensor

from soctune.sde import register_process
from soctune.sde.euler_maruyama import EulerMaruyama


@register_process("user-ou", "Ornstein–Uhlenbeck dX=θ(μ−X)dt+σdW (a user plug-in used by the tests)")
class OUProcess(EulerMaruyama):
    """OU process on t ∈ [0, 1], Euler–Maruyama on a uniform grid; a ``control`` model adds
    σ·u(x, t) to the drift.

    Args:
        num_steps: K.
        theta, mu, sigma: mean-reversion rate θ > 0, level μ, diffusion σ.
        prior_mean, prior_std: X_0 ~ N(m₀, s₀²).
    """

    def __init__(self, num_steps: int = 100, theta: float = 1.5, mu: float = 1.0, sigma: float = 0.8,
                 prior_mean: float = -1.0, prior_std: float = 0.5) -> None:
        self.theta, self.mu, self.sigma = float(theta), float(mu), float(sigma)
        super().__init__(num_steps=num_steps, prior_mean=prior_mean, prior_std=prior_std)

    def base_drift(self, x: Tensor, t: float) -> Tensor:
        return self.theta * (self.mu - x)

    def diffusion(self, t: float) -> float:
        return self.sigma

    def marginal(self, t: float) -> tuple[float, float]:
        """Closed-form law of X_t of the uncontrolled SDE: (mean, variance) per coordinate,
        m(t) = μ + (m₀ − μ)e^{−θt},  v(t) = s₀²e^{−2θt} + σ²(1 − e^{−2θt})/(2θ)."""
        d = math.exp(-self.theta * t)
        mean = self.mu + (self.prior_mean - self.mu) * d
        var = self.prior_std**2 * d * d + self.sigma**2 * (1 - d * d) / (2 * self.theta)
        return mean, var
