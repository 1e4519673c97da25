"""Gaussian mixtures as exact "pretrained models", and their closed-form reward tilts.

A mixture p₁ = Σ_m w_m N(μ_m, Σ_m) pushed through a Gaussian path x_t = α_t x₁ + β_t ε stays a
mixture, p_t = Σ_m w_m N(α_t μ_m, α_t² Σ_m + β_t² I), so E[x₁ | x_t] — and hence the exact
ε-, v-, x₀- or velocity prediction — is known at every t. Tilting p₁ by exp(λ r) for a linear
or concave quadratic r gives another Gaussian mixture in closed form. Together they give
ground truth for every process and solver test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..registry import SoctuneError
from .base import Denoiser


@dataclass
class GaussianMixture:
    """p(x) = Σ_m w_m N(x; μ_m, Σ_m): weights [M] (normalised to sum 1), means [M, D] and
    per-component covariances covs [M, D, D] (symmetric positive definite), stored in float64
    for exact references. :meth:`isotropic` and :meth:`diagonal` build the covariances from
    variances; bad shapes, negative weights or a covariance that is not SPD raise a one-line
    :class:`SoctuneError` naming the component."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    def __post_init__(self) -> None:
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        mu = torch.as_tensor(self.means, dtype=torch.float64)
        cov = torch.as_tensor(self.covs, dtype=torch.float64)
        if mu.ndim != 2:
            raise SoctuneError(f"GaussianMixture: means must be [M, D], got shape {tuple(mu.shape)}")
        m, d = mu.shape
        if w.shape != (m,):
            raise SoctuneError(f"GaussianMixture: weights must be [M] = [{m}] (one per mean), got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise SoctuneError(f"GaussianMixture: weights must be finite, ≥ 0 and not all 0, got {w.tolist()}")
        if cov.shape != (m, d, d):
            raise SoctuneError(f"GaussianMixture: covs must be [M, D, D] = [{m}, {d}, {d}], got shape "
                               f"{tuple(cov.shape)}; for variances use GaussianMixture.isotropic or .diagonal")
        self.weights, self.means, self.covs = w / w.sum(), mu, _check_spd(cov)

    @classmethod
    def isotropic(cls, weights: Any, means: Any, var: Any) -> "GaussianMixture":
        """Σ_m = var_m·I from one variance (a number) or one per component ([M])."""
        means = torch.as_tensor(means, dtype=torch.float64)
        m, d = means.shape
        v = torch.as_tensor(var, dtype=torch.float64).reshape(-1)
        if v.numel() not in (1, m):
            raise SoctuneError(f"GaussianMixture.isotropic: var must be a number or one per component [{m}], "
                               f"got {v.numel()} values")
        return cls(weights, means, v.expand(m)[:, None, None] * torch.eye(d, dtype=torch.float64))

    @classmethod
    def diagonal(cls, weights: Any, means: Any, variances: Any) -> "GaussianMixture":
        """Σ_m = diag(variances_m) from per-component, per-axis variances [M, D]."""
        means = torch.as_tensor(means, dtype=torch.float64)
        v = torch.as_tensor(variances, dtype=torch.float64)
        if v.shape != means.shape:
            raise SoctuneError(f"GaussianMixture.diagonal: variances must be [M, D] = {list(means.shape)}, "
                               f"got shape {tuple(v.shape)}")
        return cls(weights, means, torch.diag_embed(v))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x [n, D] float64, component labels [n])."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)
        return x, comp

    def marginal(self, a: float, b: float) -> "GaussianMixture":
        """Law of a·x₁ + b·ε."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, a * self.means, a * a * self.covs + b * b * eye)

    def component_log_probs(self, x: Tensor) -> Tensor:
        """log w_m + log N(x; μ_m, Σ_m): [n, D] -> [n, M]."""
        dist = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covs)
        return dist.log_prob(x.to(torch.float64)[:, None, :]) + self.weights.log()

    def log_prob(self, x: Tensor) -> Tensor:
        """[n, D] -> [n]."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities [n, M]."""
        return torch.softmax(self.component_log_probs(x), dim=-1)

    def posterior_mean(self, x: Tensor, a: float, b: float) -> Tensor:
        """E[x₁ | a·x₁ + b·ε = x], [n, D] -> [n, D] (float64)."""
        x = x.to(torch.float64)
        marg = self.marginal(a, b)
        r = marg.responsibilities(x)  # [n, M]
        # E[x₁ | x, m] = μ_m + a Σ_m C_m⁻¹ (x − a μ_m)
        diff = x[:, None, :] - a * self.means[None]  # [n, M, D]
        sol = torch.linalg.solve(marg.covs[None].expand(x.shape[0], -1, -1, -1), diff[..., None])[..., 0]
        cond_mean = self.means[None] + a * torch.einsum("mij,nmj->nmi", self.covs, sol)
        return torch.einsum("nm,nmd->nd", r, cond_mean)

    def tilt_linear(self, a: Tensor, lam: float) -> "GaussianMixture":
        """p(x)·exp(λ aᵀx) / Z: μ_m + λΣ_m a, Σ_m, w_m ∝ w_m exp(λ aᵀμ_m + λ² aᵀΣ_m a / 2)."""
        a = torch.as_tensor(a, dtype=torch.float64)
        sa = torch.einsum("mij,j->mi", self.covs, a)
        logw = self.weights.log() + lam * self.means @ a + 0.5 * lam**2 * (sa @ a)
        return GaussianMixture(torch.softmax(logw, 0), self.means + lam * sa, self.covs.clone())

    def tilt_quadratic(self, A: Tensor, c: Tensor, lam: float) -> "GaussianMixture":
        """p(x)·exp(−λ/2 (x−c)ᵀA(x−c)) / Z for symmetric PSD A:
        Σ'_m = (Σ_m⁻¹ + λA)⁻¹, μ'_m = Σ'_m(Σ_m⁻¹μ_m + λAc),
        log w'_m = log w_m + ½log|Σ'_m|/|Σ_m| − ½(μ_mᵀΣ_m⁻¹μ_m + λcᵀAc − μ'_mᵀΣ'_m⁻¹μ'_m)."""
        A = torch.as_tensor(A, dtype=torch.float64)
        c = torch.as_tensor(c, dtype=torch.float64)
        prec = torch.linalg.inv(self.covs)
        new_prec = prec + lam * A
        new_cov = torch.linalg.inv(new_prec)
        h = torch.einsum("mij,mj->mi", prec, self.means) + lam * (A @ c)
        new_mean = torch.einsum("mij,mj->mi", new_cov, h)
        quad = (torch.einsum("mi,mi->m", self.means, torch.einsum("mij,mj->mi", prec, self.means))
                + lam * c @ A @ c - torch.einsum("mi,mi->m", new_mean, h))
        logw = self.weights.log() + 0.5 * (torch.logdet(new_cov) - torch.logdet(self.covs)) - 0.5 * quad
        return GaussianMixture(torch.softmax(logw, 0), new_mean, 0.5 * (new_cov + new_cov.transpose(-1, -2)))

    def log_normaliser_linear(self, a: Tensor, lam: float) -> float:
        """log E_p[exp(λ aᵀx)] (so −log Z is the optimal SOC cost of the linear tilt)."""
        a = torch.as_tensor(a, dtype=torch.float64)
        sa = torch.einsum("mij,j->mi", self.covs, a)
        return float(torch.logsumexp(self.weights.log() + lam * self.means @ a + 0.5 * lam**2 * (sa @ a), 0))


def _check_spd(covs: Tensor) -> Tensor:
    """covs [M, D, D] symmetrised, or a one-line error naming the first component that is not
    symmetric (beyond rounding) or not positive definite (its Cholesky factorisation fails)."""
    asym = (covs - covs.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    scale = covs.abs().amax(dim=(-1, -2)).clamp(min=1e-300)
    for i in range(covs.shape[0]):
        if not bool(torch.isfinite(covs[i]).all()) or float(asym[i]) > 1e-6 * float(scale[i]):
            raise SoctuneError(f"GaussianMixture: covariance of component {i} is not a finite symmetric matrix: "
                               f"{covs[i].tolist()}")
    sym = 0.5 * (covs + covs.transpose(-1, -2))
    _, info = torch.linalg.cholesky_ex(sym)
    bad = torch.nonzero(info).flatten()
    if bad.numel():
        i = int(bad[0])
        raise SoctuneError(f"GaussianMixture: covariance of component {i} is not positive definite "
                           f"(eigenvalues {torch.linalg.eigvalsh(sym[i]).tolist()})")
    return sym


class GaussianMixtureDenoiser(Denoiser):
    """The exact model of a Gaussian-mixture data distribution on a process's schedule.

    ``forward(x [B, D], t [B]) -> [B, D]`` in ``prediction_type`` (epsilon, v_prediction,
    sample or velocity). ``process`` is any :class:`~soctune.sde.GaussianPathProcess` (its
    ``schedule`` gives α_t, β_t). Computed in float64 and returned in x's dtype.
    """

    def __init__(self, gmm: GaussianMixture, process: Any, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.gmm = gmm
        self.sample_shape = (gmm.dim,)  # the state is the mixture's point: wrappers and finetune read it
        self.schedule = process.schedule
        self.prediction_type = prediction_type

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """x [B, D], t [B] (or one time for the batch) -> prediction [B, D]: each row at its own
        time (rows are grouped by distinct times, one posterior-mean evaluation per group)."""
        b = x.shape[0]
        tt = torch.as_tensor(t).detach().to(torch.float64).reshape(-1).cpu()
        if tt.numel() == 1:
            tt = tt.expand(b)
        elif tt.numel() != b:
            raise SoctuneError(f"GaussianMixtureDenoiser: t must hold one time or one per row [{b}], got {tt.numel()}")
        x64 = x.to(torch.float64)
        times = torch.unique(tt)
        if times.numel() == 1:
            return self._predict(x64, times[0]).to(x.dtype)
        out = torch.empty_like(x64)
        for tv in times:
            rows = (tt == tv).to(x.device)
            out = out.index_put((rows,), self._predict(x64[rows], tv))  # out of place: keeps the graph to x
        return out.to(x.dtype)

    def _predict(self, x64: Tensor, tt: Tensor) -> Tensor:
        """The prediction [n, D] (float64) at one time tt (a 0-d float64 tensor) from E[x₁ | x_t]."""
        a, b = float(self.schedule.alpha(tt)), float(self.schedule.beta(tt))
        x1 = self.gmm.posterior_mean(x64, a, b)
        if self.prediction_type == "sample":
            return x1
        eps = (x64 - a * x1) / b
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return a * eps - b * x1
        return float(self.schedule.d_alpha(tt)) * x1 + float(self.schedule.d_beta(tt)) * eps  # velocity


def two_mode_mixture() -> GaussianMixture:
    """DESIGN.md §6's reference: modes (±2, 0), variance 0.25, weights ½/½."""
    return GaussianMixture.isotropic([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], 0.25)


def mixture_weights_by_nearest_mean(x: Tensor, gmm: GaussianMixture) -> Tensor:
    """Share of samples [n, D] assigned (max responsibility) to each component: [M]."""
    comp = gmm.responsibilities(x).argmax(-1)
    return torch.bincount(comp, minlength=len(gmm.weights)).double() / x.shape[0]
