"""The control benchmarks of SOC-matching (Domingo-Enrich, Han, Amos, Bruna, Chen, "Stochastic
Optimal Control Matching", NeurIPS 2024; settings of github.com/facebookresearch/SOC-matching,
``SOC_matching/experiment_settings``), written as user-defined soctune processes.

Every problem is the SOC problem (T = 1, generation time t ∈ [0, 1] runs forward from x_0):

    dX = (b(X, t) + σ u(X, t)) dt + σ dW,   X_0 = x0,
    minimise  J(u) = E[∫₀¹ (½‖u‖² + f(X_t)) dt + g(X_1)],

with σ = I, λ = 1 (the paper's ``lmbd``), the reward r = −g, and the optimal control
u*(x, t) = −σᵀ∇V(x, t) from the value function V. soctune's step is Euler–Maruyama,
m_k = x_k + Δt(b + σ·pred), s_k = σ√Δt, with the model's prediction the control itself
(``prediction_type="control"``), so the per-step control is u_k = (m_θ − m_base)/s_k = √Δt·pred.

============================  ===  =====  ==============================  =====  ================
problem (registered name)      d    K      b(x)                            f      g
============================  ===  =====  ==============================  =====  ================
soc-quadratic-ou-easy          20   50     0.2x                            0.2‖x‖²  0.1‖x‖²
soc-quadratic-ou-hard          20   50     x                               ‖x‖²   0.5‖x‖²
soc-linear-ou                  10   100    Ax, A = −I + ξ                  0      ωᵀx, ω = 1
soc-double-well                10   200    −∇Σκ_i(x_i² − 1)²               0      Σν_i(x_i² − 1)²
============================  ===  =====  ==============================  =====  ================

Notes against the paper's settings:

* Quadratic OU has a running state cost f = xᵀPx. Solvers must add ∫f to the cost (Adjoint
  Matching's lean adjoint gains the term Δt∇f per step); :attr:`SOCProblemProcess.has_running_cost`
  says so, and :meth:`SOCProblemProcess.running_cost` gives f. x0 = 0.5·N(0, I) drawn once from a
  seeded generator (the paper draws it on its GPU after seeding, so the vector differs).
* Linear OU's σ = I + ξ is a full matrix, which soctune's isotropic step kernel does not take. The
  process is written in the coordinates y = σ⁻¹x, where the diffusion is I and the drift is
  σ⁻¹Aσ y; the control enters both as σu dt, so u and u* are the same functions of time and the
  control L2 error is unchanged; the terminal cost becomes (σᵀω)ᵀy. ξ = 0.1·N(0, 1)^{d×d}, seeded.
* Double Well: κ = 5, ν = 3 on the first three coordinates and 1 elsewhere, x0 = 0. The problem
  separates across coordinates, so u* comes from one 1-D PDE per distinct (κ, ν): the Feynman–Kac
  function ψ = E[exp(−g_i(X_1)) | X_t = x] solves ∂_tψ + b_iψ' + ½ψ'' = 0, ψ(·, 1) = e^{−g_i}, and
  u*_i = ∂_x log ψ (the paper's reference uses the same linear PDE, on [−2.75, 2.75]).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.linalg import solve_banded
from torch import Tensor

from ..registry import SoctuneError
from ..sde.base import register_process
from ..sde.euler_maruyama import EulerMaruyama


class SOCProblemProcess(EulerMaruyama):
    """An SOC benchmark as an SDE process: dX = (b + u) dt + dW from a fixed x0 ∈ R^d (σ = I).

    Subclasses define :meth:`base_drift`, :meth:`terminal_cost` and :meth:`optimal_control`
    (and :meth:`running_cost` with ``has_running_cost = True``). The model is a control model:
    :class:`~soctune.models.base.ZeroDenoiser` plus a learnable correction.

    Args:
        num_steps: K (uniform grid on [0, 1]).
        dim: d.
        x0: the start state [d].
    """

    #: whether f ≠ 0; solvers that only know a terminal reward must add ∫f or refuse the problem
    has_running_cost: ClassVar[bool] = False
    #: λ of the problem (the paper's ``lmbd``; the reward is r = −g at this scale)
    reward_scale: ClassVar[float] = 1.0

    def __init__(self, num_steps: int, dim: int, x0: Tensor) -> None:
        if num_steps < 1 or dim < 1:
            raise SoctuneError(f"num_steps and dim must be ≥ 1, got num_steps={num_steps}, dim={dim}")
        super().__init__(num_steps=num_steps, prior_std=0.0, memoryless=True)
        self.dim = int(dim)
        self.register_buffer("x0", x0.detach().to(torch.float32).reshape(self.dim).clone(), persistent=False)

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The fixed start x0 repeated: shape (B, d) -> [B, d]."""
        if tuple(shape[1:]) != (self.dim,):
            raise SoctuneError(f"{self.registered_name} has states of shape ({self.dim},); use sample_shape=({self.dim},)")
        return self.x0.to(device=device, dtype=dtype).expand(shape[0], self.dim).clone()

    def diffusion(self, t: float) -> float:
        return 1.0

    def terminal_cost(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """g(x): [B, d] -> [B]."""
        raise NotImplementedError

    def running_cost(self, x: Tensor, t: float) -> Tensor:
        """f(x, t): [B, d] -> [B] (0 unless ``has_running_cost``)."""
        return x.new_zeros(x.shape[0])

    def reward(self, x: Tensor, cond: Any = None) -> Tensor:
        """r(x) = −g(x): [B, d] -> [B] (the reward to train with at ``reward_scale``)."""
        return -self.terminal_cost(x)

    def optimal_control(self, x: Tensor, t: float) -> Tensor:  # pragma: no cover - abstract
        """u*(x, t): [B, d] -> [B, d] float64, the continuous-time optimal control."""
        raise NotImplementedError


def _seeded_normal(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- Quadratic OU: the Riccati solution ------------------------------------------------------------------

def solve_riccati(A: Tensor, P: Tensor, Q: Tensor, sigma: Tensor, n: int = 4000) -> Tensor:
    """K(t) on the uniform grid t_j = j/n, [n+1, d, d] float64, for V(x, t) = xᵀK(t)x + c(t) of
    dX = (Ax + σu)dt + σdW with running cost ½‖u‖² + xᵀPx and terminal cost xᵀQx:

        −K' = AᵀK + KA − 2KσσᵀK + P,   K(1) = Q,

    integrated backwards with classical RK4 (step 1/n; error O(n⁻⁴)). u* = −σᵀ∇V = −2σᵀK(t)x."""
    A, P, Q, sigma = (m.double() for m in (A, P, Q, sigma))
    S = sigma @ sigma.T

    def rate(K: Tensor) -> Tensor:  # dK/dt
        return -(A.T @ K + K @ A - 2 * K @ S @ K + P)

    h = 1.0 / n
    Ks = [Q.clone()]
    K = Q.clone()
    for _ in range(n):  # t goes 1 → 0, so each stage steps by −h
        k1 = rate(K)
        k2 = rate(K - 0.5 * h * k1)
        k3 = rate(K - 0.5 * h * k2)
        k4 = rate(K - h * k3)
        K = K - h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        Ks.append(K)
    Ks.reverse()
    return torch.stack(Ks)


def _interp_time(table: Tensor, t: float) -> Tensor:
    """Linear interpolation of a table sampled at t_j = j/(len−1) on [0, 1]: [n+1, ...] -> [...]."""
    n = table.shape[0] - 1
    pos = min(max(float(t), 0.0), 1.0) * n
    j = min(int(math.floor(pos)), n - 1)
    w = pos - j
    return (1 - w) * table[j] + w * table[j + 1]


class QuadraticOU(SOCProblemProcess):
    """dX = (aX + u)dt + dW, f = p‖x‖², g = q‖x‖² (A = aI, P = pI, Q = qI); u* = −2K(t)x from the
    Riccati ODE (:func:`solve_riccati`). x0 = 0.5·N(0, I_d) from ``seed``."""

    has_running_cost = True
    coefficients: ClassVar[tuple[float, float, float]] = (0.2, 0.2, 0.1)

    def __init__(self, num_steps: int = 50, dim: int = 20, seed: int = 0) -> None:
        super().__init__(num_steps, dim, 0.5 * _seeded_normal((dim,), seed))
        a, p, q = self.coefficients
        eye = torch.eye(self.dim, dtype=torch.float64)
        self.A, self.P, self.Q = a * eye, p * eye, q * eye
        self.register_buffer("riccati", solve_riccati(self.A, self.P, self.Q, eye), persistent=False)

    def base_drift(self, x: Tensor, t: float) -> Tensor:
        return x @ self.A.to(x).T

    def running_cost(self, x: Tensor, t: float) -> Tensor:
        return ((x @ self.P.to(x)) * x).sum(-1)

    def terminal_cost(self, x: Tensor) -> Tensor:
        return ((x @ self.Q.to(x)) * x).sum(-1)

    def optimal_control(self, x: Tensor, t: float) -> Tensor:
        K = _interp_time(self.riccati, t)
        return -2.0 * x.double() @ K.to(x.device).T


@register_process("soc-quadratic-ou-easy", "SOC-matching's Quadratic OU (easy): d=20, b=0.2x, f=0.2‖x‖², g=0.1‖x‖², Riccati u*")
class QuadraticOUEasy(QuadraticOU):
    """Quadratic OU, easy: A = 0.2I, P = 0.2I, Q = 0.1I (SOC-matching ``OU_quadratic_easy``)."""

    coefficients = (0.2, 0.2, 0.1)


@register_process("soc-quadratic-ou-hard", "SOC-matching's Quadratic OU (hard): d=20, b=x, f=‖x‖², g=0.5‖x‖², Riccati u*")
class QuadraticOUHard(QuadraticOU):
    """Quadratic OU, hard: A = I, P = I, Q = 0.5I (SOC-matching ``OU_quadratic_hard``)."""

    coefficients = (1.0, 1.0, 0.5)


# ---- Linear OU: closed form --------------------------------------------------------------------------------

@register_process("soc-linear-ou", "SOC-matching's Linear OU: d=10, b=Ax, g=ωᵀx, closed-form u*(t) (in σ⁻¹-coordinates)")
class LinearOU(SOCProblemProcess):
    """SOC-matching's ``OU_linear`` in the coordinates y = σ⁻¹x (module docstring):

        dY = (Ã Y + u)dt + dW,  Ã = σ⁻¹Aσ,  g(y) = ω̃ᵀy,  ω̃ = σᵀω,  Y_0 = 0,

    with A = −I + ξ, σ = I + ξ, ξ = 0.1·N(0, 1)^{d×d} from ``seed``, ω = 1. V(y, t) = ω̃ᵀe^{(1−t)Ã}y + c(t),
    so u*(t) = −e^{(1−t)Ãᵀ}ω̃ = −σᵀe^{(1−t)Aᵀ}ω, the same in both coordinates, independent of the state."""

    def __init__(self, num_steps: int = 100, dim: int = 10, seed: int = 0) -> None:
        super().__init__(num_steps, dim, torch.zeros(dim))
        xi = 0.1 * _seeded_normal((dim, dim), seed)
        eye = torch.eye(dim, dtype=torch.float64)
        self.A, self.sigma = -eye + xi, eye + xi
        self.A_tilde = torch.linalg.solve(self.sigma, self.A @ self.sigma)
        self.omega_tilde = self.sigma.T @ torch.ones(dim, dtype=torch.float64)

    def base_drift(self, x: Tensor, t: float) -> Tensor:
        return x @ self.A_tilde.to(x).T

    def terminal_cost(self, x: Tensor) -> Tensor:
        return x @ self.omega_tilde.to(x)

    def optimal_control(self, x: Tensor, t: float) -> Tensor:
        u = -torch.linalg.matrix_exp((1.0 - float(t)) * self.A_tilde.T) @ self.omega_tilde
        return u.to(x.device).expand(x.shape[0], self.dim)


# ---- Double Well: 1-D finite differences per coordinate ------------------------------------------------------

@lru_cache(maxsize=8)
def double_well_control_table(kappa: float, nu: float, xb: float = 2.75, dx: float = 0.002, dt: float = 5e-4
                              ) -> np.ndarray:
    """u*(x, t) = ∂_x log ψ of one coordinate on the nodes x_i = −xb + i·dx, t_n = n·dt: [N+1, M] float64.

    ψ solves the backward Kolmogorov equation ∂_tψ + b ψ' + ½ψ'' = 0, b = −4κx(x² − 1), with
    ψ(·, 1) = exp(−ν(x² − 1)²): implicit Euler in time (unconditionally stable against the stiff
    drift, b' = −8κ at the wells), central differences in space (|b|·dx < 1 on the grid, so the
    scheme stays monotone) and zero-flux ends (the drift points inwards there). u* on the nodes
    by central differences of log ψ (one-sided at the ends)."""
    x = np.arange(-xb, xb + 0.5 * dx, dx)
    m = x.size
    b = -4.0 * kappa * x * (x * x - 1.0)
    lower = 0.5 / dx**2 - b / (2 * dx)   # coefficient of ψ_{i−1} in Lψ
    upper = 0.5 / dx**2 + b / (2 * dx)   # coefficient of ψ_{i+1}
    diag = -(lower + upper)
    # reflecting ends: the ghost node equals the inner neighbour
    upper[0] += lower[0]
    lower[-1] += upper[-1]
    banded = np.zeros((3, m))
    banded[0, 1:] = -dt * upper[:-1]
    banded[1] = 1.0 - dt * diag
    banded[2, :-1] = -dt * lower[1:]
    n = int(round(1.0 / dt))
    log_psi = np.empty((n + 1, m))
    psi = np.exp(-nu * (x * x - 1.0) ** 2)
    log_psi[n] = np.log(psi)
    for j in range(n - 1, -1, -1):
        psi = solve_banded((1, 1), banded, psi)
        # renormalise each step (log ψ only matters up to a constant) so ψ never under/overflows
        top = psi.max()
        psi = psi / top
        log_psi[j] = np.log(np.maximum(psi, 1e-300))
    return np.gradient(log_psi, dx, axis=1)


@register_process("soc-double-well", "SOC-matching's Double Well: d=10, b=−∇Σκ(x²−1)², g=Σν(x²−1)², u* by 1-D finite differences")
class DoubleWell(SOCProblemProcess):
    """dX = (−∇Ψ(X) + u)dt + dW, Ψ = Σ_i κ_i(x_i² − 1)², g = Σ_i ν_i(x_i² − 1)², X_0 = 0;
    κ_i = ``kappa``, ν_i = ``nu`` on the first ``n_stiff`` coordinates and 1 elsewhere
    (SOC-matching ``double_well``: d = 10, κ = 5, ν = 3 on three coordinates).

    u* per coordinate from :func:`double_well_control_table`, interpolated bilinearly in (x, t);
    states beyond the table's ±2.75 take its end values."""

    XB: ClassVar[float] = 2.75
    DX: ClassVar[float] = 0.002
    DT: ClassVar[float] = 5e-4

    def __init__(self, num_steps: int = 200, dim: int = 10, kappa: float = 5.0, nu: float = 3.0,
                 n_stiff: int = 3) -> None:
        super().__init__(num_steps, dim, torch.zeros(dim))
        if not 0 <= n_stiff <= dim:
            raise SoctuneError(f"n_stiff must be in 0..dim={dim}, got {n_stiff}")
        kap = torch.ones(dim, dtype=torch.float64)
        nus = torch.ones(dim, dtype=torch.float64)
        kap[:n_stiff], nus[:n_stiff] = float(kappa), float(nu)
        self.register_buffer("kappa", kap, persistent=False)
        self.register_buffer("nu", nus, persistent=False)
        self._tables: dict[tuple[float, float], Tensor] = {}

    def base_drift(self, x: Tensor, t: float) -> Tensor:
        return -4.0 * self.kappa.to(x) * x * (x * x - 1.0)

    def terminal_cost(self, x: Tensor) -> Tensor:
        return (self.nu.to(x) * (x * x - 1.0) ** 2).sum(-1)

    def control_table(self, kappa: float, nu: float) -> Tensor:
        """u*(x_i, t_n) of one coordinate type as a tensor [N+1, M] float64 (computed once)."""
        key = (float(kappa), float(nu))
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(double_well_control_table(*key, self.XB, self.DX, self.DT))
        return self._tables[key]

    def optimal_control(self, x: Tensor, t: float) -> Tensor:
        out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        for key in {(float(k), float(n)) for k, n in zip(self.kappa.tolist(), self.nu.tolist())}:
            cols = [i for i in range(self.dim) if (float(self.kappa[i]), float(self.nu[i])) == key]
            row = _interp_time(self.control_table(*key), t).to(x.device)  # [M]
            xs = x[:, cols].double()
            pos = ((xs + self.XB) / self.DX).clamp(0, row.numel() - 1)
            i0 = pos.floor().long().clamp(max=row.numel() - 2)
            w = pos - i0
            out[:, cols] = (1 - w) * row[i0] + w * row[i0 + 1]
        return out


#: benchmark name -> process class
PROBLEMS: dict[str, type[SOCProblemProcess]] = {
    "soc-quadratic-ou-easy": QuadraticOUEasy,
    "soc-quadratic-ou-hard": QuadraticOUHard,
    "soc-linear-ou": LinearOU,
    "soc-double-well": DoubleWell,
}


def get_problem(name: str, **options: Any) -> SOCProblemProcess:
    """Build a benchmark problem by name (one of :data:`PROBLEMS`), with constructor options."""
    if name not in PROBLEMS:
        raise SoctuneError(f"unknown SOC problem '{name}'; choose from {sorted(PROBLEMS)}")
    return PROBLEMS[name](**options)
