"""A user-defined SOC problem in one file, written with soctune's public API only: a linear SDE
with a quadratic terminal reward, whose optimal control is known in closed form.

    dX = (−θX + σu(X, t)) dt + σ dW  on t ∈ [0, 1],   X_0 ~ N(m₀, s₀² I),
    minimise  E[½∫‖u‖² dt − λ r(X_1)],   r(x) = −½ c ‖x − b‖².

The process is an :class:`~soctune.sde.euler_maruyama.EulerMaruyama` subclass (override the base
drift and the diffusion, register a name); the model is :class:`~soctune.models.base.ZeroDenoiser`
(u = 0) plus a learnable correction, so the "prediction" is the control u(x, t) itself.

Closed forms (κ = λc, ρ = 1 − θΔt, s = σ√Δt):

* continuous: X_1 | X_t = x ~ N(x e^{−θτ}, v(τ)), τ = 1 − t, v = σ²(1 − e^{−2θτ})/(2θ), so
  V_t(x) = κ‖x e^{−θτ} − b‖²/(2(1 + κv)) + const and u*(t, x) = −σ∇V = −σκe^{−θτ}(x e^{−θτ} − b)/(1 + κv);
* the Euler chain actually trained, x_{k+1} = ρx_k + σΔt·u_k + sξ_k: V_k(x) = q_k/2 ‖x − y_k‖² + C_k
  with the backward (Riccati) recursion q_K = κ, y_K = b, q_k = ρ²q_{k+1}/(1 + q_{k+1}s²),
  y_k = y_{k+1}/ρ, C_k = C_{k+1} + (D/2)log(1 + q_{k+1}s²); the optimal kernel's mean is
  (ρx/s² + q_{k+1}y_{k+1})/(1/s² + q_{k+1}), i.e. the control
  u*_k(x) = q_{k+1}s²/(1 + q_{k+1}s²) · (y_{k+1} − ρx)/(σΔt).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from soctune.sde import register_process
from soctune.sde.euler_maruyama import EulerMaruyama


@register_process("user-linear-soc", "Linear SDE dX=(−θX+σu)dt+σdW with a closed-form LQ optimal control (test plug-in)")
class LinearSOCProcess(EulerMaruyama):
    """dX = (−θX + σu) dt + σ dW, Euler–Maruyama on a uniform grid, X_0 ~ N(m₀, s₀² I).

    Args:
        num_steps: K.
        theta, sigma: mean reversion θ and diffusion σ.
        prior_mean, prior_std: m₀ and s₀ (s₀ = 0: a fixed start, then the chain is memoryless).
    """

    def __init__(self, num_steps: int = 20, theta: float = 1.0, sigma: float = 0.8, prior_mean: float = 0.0,
                 prior_std: float = 0.5) -> None:
        self.theta, self.sigma = float(theta), float(sigma)
        super().__init__(num_steps=num_steps, prior_mean=prior_mean, prior_std=prior_std,
                         memoryless=prior_std == 0.0)

    def base_drift(self, x: Tensor, t: float) -> Tensor:
        return -self.theta * x

    def diffusion(self, t: float) -> float:
        return self.sigma


class QuadraticTarget:
    """The terminal reward r(x) = −½c‖x − b‖² (a plain callable, as users write rewards):
    [B, D] -> [B]."""

    def __init__(self, b: Any, c: float = 1.0) -> None:
        self.b = torch.as_tensor(b, dtype=torch.float32)
        self.c = float(c)

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        return -0.5 * self.c * (x - self.b.to(x)).pow(2).sum(-1)


def discrete_riccati(process: LinearSOCProcess, target: QuadraticTarget, lam: float
                     ) -> tuple[list[float], list[Tensor], list[float]]:
    """(q_k, y_k [D], C_k) for k = 0 … K of the Euler chain's value V_k(x) = q_k/2‖x − y_k‖² + C_k."""
    K = process.num_steps
    dt = 1.0 / K
    rho, s2 = 1.0 - process.theta * dt, process.sigma**2 * dt
    D = target.b.numel()
    q, y, C = [0.0] * (K + 1), [torch.zeros(D, dtype=torch.float64)] * (K + 1), [0.0] * (K + 1)
    q[K], y[K] = lam * target.c, target.b.double()
    for k in range(K - 1, -1, -1):
        q[k] = rho**2 * q[k + 1] / (1 + q[k + 1] * s2)
        y[k] = y[k + 1] / rho
        C[k] = C[k + 1] + 0.5 * D * math.log(1 + q[k + 1] * s2)
    return q, y, C


def optimal_control_discrete(process: LinearSOCProcess, target: QuadraticTarget, lam: float, k: int,
                             x: Tensor) -> Tensor:
    """u*_k(x) of the Euler chain (see the module docstring), x [B, D] -> [B, D] (float64)."""
    q, y, _ = discrete_riccati(process, target, lam)
    dt = 1.0 / process.num_steps
    rho, s2 = 1.0 - process.theta * dt, process.sigma**2 * dt
    gain = q[k + 1] * s2 / (1 + q[k + 1] * s2)
    return gain * (y[k + 1] - rho * x.double()) / (process.sigma * dt)


def optimal_control_continuous(process: LinearSOCProcess, target: QuadraticTarget, lam: float, t: float,
                               x: Tensor) -> Tensor:
    """u*(t, x) = −σκe^{−θτ}(x e^{−θτ} − b)/(1 + κv(τ)) of the SDE, x [B, D] -> [B, D] (float64)."""
    tau = 1.0 - t
    th, sig, kappa = process.theta, process.sigma, lam * target.c
    e = math.exp(-th * tau)
    v = sig**2 * (1 - e * e) / (2 * th)
    return -sig * kappa * e * (x.double() * e - target.b.double()) / (1 + kappa * v)


def optimal_cost(process: LinearSOCProcess, target: QuadraticTarget, lam: float) -> float:
    """J* = E_{X_0}[V_0(X_0)] of the Euler chain: q_0/2 Σ_d (s₀² + (m₀ − y_{0,d})²) + C_0."""
    q, y, C = discrete_riccati(process, target, lam)
    return 0.5 * q[0] * float((process.prior_std**2 + (process.prior_mean - y[0]) ** 2).sum()) + C[0]
