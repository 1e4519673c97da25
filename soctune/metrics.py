"""Evaluation metrics: reward, diversity, prior preservation, distance to an exact target.

All functions take plain tensors so they serve ``finetune``'s summary, ``soctune evaluate``
and the benchmarks alike.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error s/√n of values [n]."""
    v = values.detach().double().flatten()
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se


def diversity(features: Tensor) -> float:
    """Mean pairwise Euclidean distance between feature vectors [n, D] (n ≥ 2), over the
    n(n−1)/2 distinct pairs. Identical samples give 0."""
    f = features.detach().double().flatten(1)
    n = f.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^{½} Σ₂ Σ₁^{½})^{½}) between two Gaussians (the FID formula),
    computed through symmetric square roots so it stays real and ≥ 0."""
    mu1, mu2, cov1, cov2 = (t.detach().double() for t in (mu1, mu2, cov1, cov2))
    s1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(s1 @ cov2 @ s1)
    val = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * torch.trace(cross)
    return max(float(val), 0.0)


def feature_frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n1, D], [n2, D]."""
    f1, f2 = f1.detach().double().flatten(1), f2.detach().double().flatten(1)
    return frechet_distance(f1.mean(0), torch.cov(f1.T).reshape(f1.shape[1], -1),
                            f2.mean(0), torch.cov(f2.T).reshape(f2.shape[1], -1))


def per_condition_frechet(f1: Tensor, c1: Tensor, f2: Tensor, c2: Tensor) -> float:
    """Prior preservation as the papers' per-prompt FID: the Fréchet distance between
    fine-tuned features f1 [n1, D] and base features f2 [n2, D] computed per condition label
    (c1 [n1], c2 [n2]) and averaged over the conditions present in both."""
    vals = []
    for c in torch.unique(c1):
        a, b = f1[c1 == c], f2[c2 == c]
        if a.shape[0] > 1 and b.shape[0] > 1:
            vals.append(feature_frechet_distance(a, b))
    return float(sum(vals) / len(vals)) if vals else float("nan")


def rejection_sample_tilt(base_samples: Tensor, rewards: Tensor, lam: float, r_max: float,
                          generator: torch.Generator | None = None) -> Tensor:
    """Exact samples of p* ∝ p_base·exp(λr) from base samples [n, *S] with rewards [n] ≤ r_max:
    accept each with probability exp(λ(r − r_max)). Returns the accepted samples [m, *S]."""
    if float(rewards.max()) > r_max + 1e-6:
        raise ValueError(f"reward {float(rewards.max()):.4g} exceeds the stated bound r_max={r_max}")
    p = torch.exp(lam * (rewards.double() - r_max)).clamp(max=1.0)
    u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
    return base_samples[u < p]


def sliced_wasserstein(x: Tensor, y: Tensor, n_proj: int = 256, generator: torch.Generator | None = None,
                       n_quantiles: int | None = None) -> float:
    """Sliced 2-Wasserstein distance between two sample sets x [n, D] and y [m, D] (n ≠ m allowed).

    SW₂(x, y)² = E_θ ∫₀¹ (F⁻¹_{θᵀx}(q) − F⁻¹_{θᵀy}(q))² dq over random unit directions θ; the
    quantile functions are the linear-interpolation empirical quantiles on the midpoint grid
    q_i = (i + ½)/Q, Q = max(n, m) (for n = m this is exactly sorting both projections).
    """
    x, y = x.detach().double().flatten(1), y.detach().double().flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    theta = torch.randn(x.shape[1], n_proj, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values  # [n, P], [m, P]
    if px.shape[0] != py.shape[0] or n_quantiles is not None:
        q_n = n_quantiles or max(px.shape[0], py.shape[0])
        px, py = _quantiles(px, q_n), _quantiles(py, q_n)
    return math.sqrt(float(((px - py) ** 2).mean()))


def _quantiles(sorted_vals: Tensor, q_n: int) -> Tensor:
    """Empirical quantiles [Q, P] at q_i = (i + ½)/Q of sorted columns [n, P] (linear interpolation
    between order statistics placed at (j + ½)/n)."""
    n = sorted_vals.shape[0]
    pos = ((torch.arange(q_n, dtype=torch.float64) + 0.5) / q_n * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo)[:, None]
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac


def target_fidelity(samples: Tensor, reference: Tensor, n_boot: int = 20, n_proj: int = 128,
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """Distance of samples [n, D] to exact target samples [m, D]: the sliced 2-Wasserstein distance
    on the full sets, with its bootstrap standard error (the standard deviation of the distance over
    ``n_boot`` resamplings with replacement of both sets, each with fresh directions). The same
    projection directions are used for the point estimate of every call with the same generator
    seed, so rows of a table are comparable. Returns (distance, standard error)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    dist = sliced_wasserstein(samples, reference, n_proj, torch.Generator().manual_seed(seed))
    if n_boot < 2:
        return dist, float("nan")
    vals = []
    for _ in range(n_boot):
        ia = torch.randint(samples.shape[0], (samples.shape[0],), generator=gen)
        ir = torch.randint(reference.shape[0], (reference.shape[0],), generator=gen)
        vals.append(sliced_wasserstein(samples[ia], reference[ir], n_proj, gen))
    return dist, float(torch.tensor(vals, dtype=torch.float64).std(unbiased=True))


def tilt_is_target(solver_name: str, solver_options: Mapping[str, Any], process: Any) -> bool:
    """Whether a run's solver samples p* ∝ p_base·e^{λr}, the tilt that "distance to the exact tilt"
    measures against (else that distance is a reference, not the method's target).

    True when the solver minimises the chain's SOC cost (:attr:`~soctune.solvers.base.Solver.claims_tilt`:
    adjoint-matching; nabla-db and residual-db with η = 1 — not DRaFT or DDPO, which maximise the
    reward, nor η ≠ 1 (p_base^η·e^{λr}) or dag-db (e^{λr} alone)) and the process is memoryless
    (``process.memoryless``: X_0 independent of X_1; otherwise the initial-value bias moves the
    optimum of the path problem away from the terminal tilt).

    Args:
        solver_name: the registered solver name (or plug-in path) of the run's config.
        solver_options: the run's solver options (missing ones take the class's defaults).
        process: the run's :class:`~soctune.sde.base.Process` (anything with ``memoryless``).
    """
    from .solvers.base import get_solver  # lazy: the metrics stay importable alone

    return get_solver(solver_name, **dict(solver_options)).claims_tilt and bool(process.memoryless)
