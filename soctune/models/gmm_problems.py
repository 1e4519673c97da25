"""Random reward-tilt problems with a closed-form answer: a seeded generator of Gaussian-mixture bases
and rewards whose tilt p*(x) ∝ p(x)·exp(λ r(x)) is again a Gaussian mixture.

Problem ``i`` of the fixed list (:func:`random_tilt_problem`) is drawn from ``torch.Generator`` seed
``SEED_BASE + i`` and cycles through the grid of dimensions × reward kinds × reward scales
(:data:`DIMS`, :data:`KINDS`, :data:`LAMBDAS`: 12 combinations, so problems 0–11 cover each once and
0–23 twice, with different mixtures). Each base has 2–5 components with unequal weights and full
covariances Σ_m = Q_m diag(e_m) Q_mᵀ (Q_m a random rotation, e_m log-uniform in :data:`EIG_RANGE`),
placed so that every pair of components is separated along the line joining their means (see
:func:`random_mixture`) while the reward still moves mass between them.

Rewards (both closed-form tilts of :class:`~soctune.models.gmm.GaussianMixture`):

* linear r(x) = aᵀx, ‖a‖ in :data:`LINEAR_NORM`: each component shifts by λΣ_m a, log-weights by
  λaᵀμ_m + λ²aᵀΣ_m a/2;
* quadratic r(x) = −½(x − c)ᵀA(x − c), A = Q diag(e) Qᵀ a random SPD matrix (e in :data:`QUAD_EIG`),
  c at distance :data:`QUAD_CENTRE` from the origin: Σ'_m = (Σ_m⁻¹ + λA)⁻¹ (any symmetric PSD A
  keeps the tilt a mixture).

The optimal SOC cost of the continuous-time problem is −log Z, Z = E_p[exp(λ r)]
(:meth:`TiltProblem.log_normaliser`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..registry import SoctuneError
from ..rewards.base import LinearReward, QuadraticReward, Reward
from .gmm import GaussianMixture

#: the grid the fixed problem list cycles through (problem i: DIMS[i % 2], KINDS[(i // 2) % 2],
#: LAMBDAS[(i // 4) % 3])
DIMS = (2, 8)
KINDS = ("linear", "quadratic")
LAMBDAS = (0.5, 1.0, 2.0)
SEED_BASE = 17_000
#: components per mixture (inclusive)
COMPONENTS = (2, 5)
#: mixture weights ∝ U(1, WEIGHT_RATIO): the largest at most this many times the smallest
WEIGHT_RATIO = 4.0
#: eigenvalues of each component covariance (standard deviations 0.2–0.6 along the principal axes)
EIG_RANGE = (0.04, 0.36)
#: distance of each mean from the origin (data of about unit scale, as the processes' schedules assume)
MEAN_RADIUS = (1.0, 3.0)
#: two components m, n are separated when ‖μ_m − μ_n‖ ≥ SEPARATION · (s_m + s_n), s the standard
#: deviation of each along the line joining the means (≈ 0.1% of either's mass across the midpoint)
SEPARATION = 3.0
#: ‖a‖ of the linear reward; eigenvalues of A and ‖c‖ of the quadratic one
LINEAR_NORM = (0.25, 0.5)
QUAD_EIG = (0.1, 0.5)
QUAD_CENTRE = (0.5, 2.0)
#: attempts at placing the means before a fresh set of covariances is drawn
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class TiltProblem:
    """One random problem: the base mixture, the reward r and its scale λ.

    ``a`` [D] for ``kind == "linear"``; ``A`` [D, D] (SPD) and ``c`` [D] for ``"quadratic"`` (float64).
    """

    index: int
    base: GaussianMixture
    kind: str
    lam: float
    a: Tensor | None = None
    A: Tensor | None = None
    c: Tensor | None = None
    tilt: GaussianMixture = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "linear":
            tilt = self.base.tilt_linear(self.a, self.lam)
        elif self.kind == "quadratic":
            tilt = self.base.tilt_quadratic(self.A, self.c, self.lam)
        else:
            raise SoctuneError(f"TiltProblem: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "tilt", tilt)

    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def name(self) -> str:
        """e.g. ``p03-d8-m4-quadratic-lam0.5``."""
        return f"p{self.index:02d}-d{self.dim}-m{len(self.base.weights)}-{self.kind}-lam{self.lam:g}"

    def reward(self) -> Reward:
        """The reward as a soctune reward module: r(x [B, D]) -> [B] (float32)."""
        if self.kind == "linear":
            return LinearReward(self.a.float())
        return QuadraticReward(c=self.c.float(), A=self.A.float())

    def log_reward(self, x: Tensor) -> Tensor:
        """r(x) in float64 for x [n, D] -> [n] (the references are computed in float64)."""
        x = x.double()
        if self.kind == "linear":
            return x @ self.a
        d = x - self.c
        return -0.5 * torch.einsum("ni,ij,nj->n", d, self.A, d)

    def log_normaliser(self) -> float:
        """log Z = log E_p[exp(λ r)] in closed form, so −log Z is the optimal continuous-time SOC cost.

        From the identity p(x)·e^{λr(x)} = Z·p*(x) at any x, evaluated at the tilt's heaviest mean
        (a point of high density for both sides): log Z = log p(x) + λ r(x) − log p*(x). It holds for
        both reward kinds and needs only the closed-form tilt."""
        x = self.tilt.means[self.tilt.weights.argmax()][None]
        return float(self.base.log_prob(x) + self.lam * self.log_reward(x) - self.tilt.log_prob(x))


def random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix [D, D] (float64): QR of a Gaussian matrix with the signs of
    R's diagonal folded into Q (without that fold, QR's sign convention biases the distribution)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _uniform(lo: float, hi: float, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(size, generator=generator, dtype=torch.float64)


def _log_uniform(lo: float, hi: float, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.exp(_uniform(math.log(lo), math.log(hi), size, generator))


def random_spd(dim: int, eig_range: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Q diag(e) Qᵀ [D, D] with Q Haar-random and e log-uniform in ``eig_range`` (float64)."""
    q = random_rotation(dim, generator)
    e = _log_uniform(*eig_range, (dim,), generator)
    return (q * e[None, :]) @ q.T


def _random_direction(dim: int, generator: torch.Generator) -> Tensor:
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    return v / v.norm()


def _separated(mu: Tensor, cov_mu: Tensor, means: list[Tensor], covs: list[Tensor]) -> bool:
    """‖μ − μ_n‖ ≥ SEPARATION·(s + s_n) for every placed component n, s = √(eᵀΣe) along e = the unit
    vector between the means."""
    for mu_n, cov_n in zip(means, covs):
        diff = mu - mu_n
        dist = float(diff.norm())
        e = diff / dist
        spread = math.sqrt(float(e @ cov_mu @ e)) + math.sqrt(float(e @ cov_n @ e))
        if dist < SEPARATION * spread:
            return False
    return True


def random_mixture(dim: int, num_components: int, generator: torch.Generator) -> GaussianMixture:
    """A mixture of ``num_components`` Gaussians in ``dim`` dimensions: weights ∝ U(1, WEIGHT_RATIO),
    covariances :func:`random_spd` with :data:`EIG_RANGE`, means at radius U(:data:`MEAN_RADIUS`) in a
    uniform direction, redrawn until every pair is separated (:data:`SEPARATION`)."""
    if dim < 1 or num_components < 1:
        raise SoctuneError(f"random_mixture needs dim ≥ 1 and num_components ≥ 1, got {dim} and {num_components}")
    weights = _uniform(1.0, WEIGHT_RATIO, (num_components,), generator)
    while True:
        covs = [random_spd(dim, EIG_RANGE, generator) for _ in range(num_components)]
        means: list[Tensor] = []
        for _ in range(_PLACEMENT_TRIES):
            mu = _random_direction(dim, generator) * float(_uniform(*MEAN_RADIUS, (1,), generator))
            if _separated(mu, covs[len(means)], means, covs[:len(means)]):
                means.append(mu)
                if len(means) == num_components:
                    return GaussianMixture(weights, torch.stack(means), torch.stack(covs))


def random_tilt_problem(index: int) -> TiltProblem:
    """Problem ``index`` (≥ 0) of the fixed list: the grid cell of :data:`DIMS` × :data:`KINDS` ×
    :data:`LAMBDAS` given by the index, everything else drawn from seed ``SEED_BASE + index``."""
    if index < 0:
        raise SoctuneError(f"problem index must be ≥ 0, got {index}")
    dim = DIMS[index % len(DIMS)]
    kind = KINDS[(index // len(DIMS)) % len(KINDS)]
    lam = LAMBDAS[(index // (len(DIMS) * len(KINDS))) % len(LAMBDAS)]
    gen = torch.Generator().manual_seed(SEED_BASE + index)
    m = int(torch.randint(COMPONENTS[0], COMPONENTS[1] + 1, (1,), generator=gen))
    base = random_mixture(dim, m, gen)
    if kind == "linear":
        a = _random_direction(dim, gen) * float(_uniform(*LINEAR_NORM, (1,), gen))
        return TiltProblem(index, base, kind, lam, a=a)
    A = random_spd(dim, QUAD_EIG, gen)
    c = _random_direction(dim, gen) * float(_uniform(*QUAD_CENTRE, (1,), gen))
    return TiltProblem(index, base, kind, lam, A=A, c=c)
