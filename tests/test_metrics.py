"""Every metric of soctune.metrics / soctune.evaluation against a case with a known answer.

Tolerances come from the spread measured over seeds 0–19 (stated next to each assertion);
all sample sizes are chosen so the whole file runs in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from soctune.evaluation import feature_extractor, gmm_tilt_fidelity, tilt_fidelity
from soctune.metrics import (diversity, feature_frechet_distance, frechet_distance, mean_and_stderr,
                             per_condition_frechet, rejection_sample_tilt, sliced_wasserstein, target_fidelity)
from soctune.models.gmm import GaussianMixture, mixture_weights_by_nearest_mean, two_mode_mixture
from soctune.registry import SoctuneError
from soctune.rewards.base import QuadraticReward


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- Fréchet
def test_frechet_distance_of_commuting_gaussians_is_the_closed_form() -> None:
    # diagonal covariances commute: FD = ‖μ₁ − μ₂‖² + Σ_i (√a_i − √b_i)² = (1 + 4) + (1 + 1) = 7
    fd = frechet_distance(torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0])),
                          torch.tensor([1.0, 2.0]), torch.diag(torch.tensor([4.0, 1.0])))
    assert fd == pytest.approx(7.0, abs=1e-9)
    assert frechet_distance(torch.ones(3), torch.eye(3), torch.ones(3), torch.eye(3)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_of_non_commuting_gaussians_matches_scipy_sqrtm() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = _gen(0)
    a, b = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(4, dtype=torch.float64)
    m1, m2 = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    cross = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real  # tr((Σ₁Σ₂)^½) = tr((Σ₁^½Σ₂Σ₁^½)^½)
    expected = float((m1 - m2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * float(cross.trace()))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_feature_frechet_distance_converges_to_the_gaussian_closed_form() -> None:
    # N((0,0,0), diag(1,1,1)) vs N((1,0,0), diag(4,1,1)): FD = 1 + (1 − 2)² = 2.
    # Measured over seeds 0–19 with n = 20 000 per set: 1.998 ± 0.046 (std; range 1.91–2.08); tolerance 0.23 (5σ).
    g = _gen(0)
    f1 = torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    f2 = torch.randn(20_000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 1.0]) + torch.tensor([1.0, 0, 0])
    assert feature_frechet_distance(f1, f2) == pytest.approx(2.0, abs=0.23)


def test_per_condition_frechet_averages_the_per_condition_distances() -> None:
    # Within a condition the fine-tuned features are the base ones shifted by δ_c, so each
    # per-condition FD is exactly ‖δ_c‖² (same covariance): 1 and 4, average 2.5. Condition 2
    # exists only in the fine-tuned set and is ignored.
    g = _gen(1)
    base = torch.randn(300, 2, generator=g, dtype=torch.float64)
    c_base = torch.arange(300) % 2
    shift = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    ft = torch.cat([base + shift[c_base], torch.randn(50, 2, generator=g, dtype=torch.float64)])
    c_ft = torch.cat([c_base, torch.full((50,), 2)])
    assert per_condition_frechet(ft, c_ft, base, c_base) == pytest.approx(2.5, abs=1e-9)
    # pooled over conditions the distance is a different number: averaging per condition matters
    assert abs(feature_frechet_distance(ft[:300], base) - 2.5) > 0.5
    assert math.isnan(per_condition_frechet(ft, torch.full((350,), 7), base, c_base))


# ---------------------------------------------------------------------------------- diversity
def test_diversity_of_identical_samples_is_zero() -> None:
    assert diversity(torch.ones(10, 5)) == 0.0
    assert diversity(torch.ones(1, 5)) == 0.0


def test_diversity_of_a_unit_square_is_its_mean_pairwise_distance() -> None:
    # 4 sides of length 1 and 2 diagonals of length √2 over the 6 distinct pairs
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert diversity(square) == pytest.approx((4 + 2 * math.sqrt(2)) / 6, abs=1e-12)
    assert diversity(3 * square) == pytest.approx(3 * (4 + 2 * math.sqrt(2)) / 6, abs=1e-12)


def test_diversity_of_a_standard_gaussian_is_root_pi() -> None:
    # X − Y ~ N(0, 2I₂) for independent standard normals, so E‖X − Y‖ = √2·√(π/2) = √π ≈ 1.7725.
    # Measured over seeds 0–19 with n = 2000: 1.770 ± 0.023 (std; range 1.72–1.82); tolerance 0.12 (5σ).
    x = torch.randn(2000, 2, generator=_gen(2))
    assert diversity(x) == pytest.approx(math.sqrt(math.pi), abs=0.12)


# ---------------------------------------------------------------------------------- mean ± s.e.
def test_mean_and_stderr_of_known_values() -> None:
    mean, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # s = √(5/3), n = 4
    m1, se1 = mean_and_stderr(torch.tensor([3.0]))
    assert m1 == 3.0 and math.isnan(se1)


def test_stderr_gives_nominal_coverage() -> None:
    # 400 sets of 50 standard normals: the 95% interval mean ± 1.96·s.e. should cover 0 in ≈ 95%
    # (binomial std 1.1%; the t-correction at n = 50 lowers it to ≈ 94.4%); measured 0.948–0.960 over
    # seeds 0–4; tolerance [0.91, 0.98].
    x = torch.randn(400, 50, generator=_gen(3), dtype=torch.float64)
    covered = sum(abs(m) < 1.96 * se for m, se in (mean_and_stderr(row) for row in x))
    assert 0.91 <= covered / 400 <= 0.98


# ---------------------------------------------------------------------------------- exact tilt
@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_rejection_sampling_gives_the_closed_form_tilt_of_a_gaussian(lam: float) -> None:
    # base N(0, 1), r(x) = −½(x − c)² ≤ 0: p* ∝ exp(−x²/2 − λ(x − c)²/2) = N(λc/(1+λ), 1/(1+λ)),
    # acceptance rate E[e^{λr}] = Z = (1+λ)^{−½} exp(−λc²/(2(1+λ))).
    # Measured over seeds 0–19 (n = 200 000 base samples, c = 1.5): std of the accepted mean 0.0026 (λ=1) /
    # 0.0025 (λ=2.5), of the variance 0.0023 / 0.0021, of the acceptance rate 0.0007 / 0.0009;
    # tolerances are ≥ 5σ of the larger.
    c = 1.5
    x = torch.randn(200_000, 1, generator=_gen(4), dtype=torch.float64)
    r = -0.5 * (x[:, 0] - c) ** 2
    acc = rejection_sample_tilt(x, r, lam, r_max=0.0, generator=_gen(5))
    z = (1 + lam) ** -0.5 * math.exp(-lam * c * c / (2 * (1 + lam)))
    assert acc.shape[0] / x.shape[0] == pytest.approx(z, abs=0.005)
    assert float(acc.mean()) == pytest.approx(lam * c / (1 + lam), abs=0.013)
    assert float(acc.var()) == pytest.approx(1 / (1 + lam), abs=0.012)


def test_rejection_sampling_gives_the_closed_form_tilt_of_a_mixture() -> None:
    # DESIGN §6 two-mode mixture tilted by r = −¼‖x − (0.5, 1)‖², λ = 1: exact weights 0.291/0.709 and
    # means from GaussianMixture.tilt_quadratic. Measured over seeds 0–19 (n = 100 000 base samples,
    # ≈ 30 400 accepted): std of the weight 0.0031 (mean 0.2913 vs exact 0.2913), largest mode-mean
    # error 0.0064 ± 0.0025 (max 0.012); tolerances 0.016 (5σ) / 0.035.
    base = two_mode_mixture()
    reward = QuadraticReward(c=(0.5, 1.0), scale=0.5)
    target = base.tilt_quadratic(0.5 * torch.eye(2), torch.tensor([0.5, 1.0]), 1.0)
    x, _ = base.sample(100_000, generator=_gen(6))
    acc = rejection_sample_tilt(x, reward(x.float()).double(), 1.0, r_max=0.0, generator=_gen(7))
    w = mixture_weights_by_nearest_mean(acc, target)
    assert torch.allclose(w, target.weights, atol=0.016)
    comp = target.responsibilities(acc).argmax(-1)
    means = torch.stack([acc[comp == m].mean(0) for m in range(2)])
    assert torch.allclose(means, target.means, atol=0.035)


def test_rejection_sampling_refuses_a_reward_above_its_bound() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        rejection_sample_tilt(torch.zeros(3, 2), torch.tensor([0.0, 0.5, -1.0]), 1.0, r_max=0.0)


# ---------------------------------------------------------------------------------- fidelity
def test_sliced_wasserstein_of_shifted_gaussians_is_the_closed_form() -> None:
    # x ~ N(μ, I), y ~ N(0, I) in D dims: every projection is a shift by θᵀμ, so
    # SW₂² = E_θ(θᵀμ)² = ‖μ‖²/D; μ = (1, 0), D = 2 gives 1/√2 ≈ 0.7071, also for unequal sizes.
    # Measured over seeds 0–19 (n = 4000 / 3000, 512 directions): 0.711 ± 0.021 (std); tolerance 0.1 (≈ 4.5σ).
    g = _gen(8)
    x = torch.randn(4000, 2, generator=g) + torch.tensor([1.0, 0.0])
    y = torch.randn(3000, 2, generator=g)
    assert sliced_wasserstein(x, y, n_proj=512, generator=g) == pytest.approx(1 / math.sqrt(2), abs=0.1)
    same = sliced_wasserstein(x[:2000], x[2000:], n_proj=64, generator=g)
    assert same < 0.1
    # equal sizes: identical sets are at distance 0
    assert sliced_wasserstein(y, y, generator=g) == pytest.approx(0.0, abs=1e-12)


def test_target_fidelity_standard_error_matches_the_spread_over_independent_sample_sets() -> None:
    # x ~ N((0.5, 0), I) (n = 400) against exact target samples N(0, I) (m = 300). Over 24 fresh pairs
    # of sets, the bootstrap s.e. must match the actual standard deviation of the distance.
    # Measured over 5 repetitions of this whole experiment: std over sets 0.046–0.070, mean reported
    # s.e. 0.050–0.054, ratio 0.74–1.15; mean distance 0.337–0.390; tolerance: ratio in [0.6, 1.6].
    g = _gen(9)
    dists, ses = [], []
    for i in range(24):
        x = torch.randn(400, 2, generator=g) + torch.tensor([0.5, 0.0])
        ref = torch.randn(300, 2, generator=g)
        d, se = target_fidelity(x, ref, n_boot=20, n_proj=64, generator=_gen(100 + i))
        dists.append(d)
        ses.append(se)
    spread = float(torch.tensor(dists).std())
    assert 0.6 <= (sum(ses) / len(ses)) / spread <= 1.6
    assert abs(sum(dists) / len(dists) - 0.5 / math.sqrt(2)) < 0.05  # true SW₂ = 0.354


def test_tilt_fidelity_of_exact_samples_beats_the_base() -> None:
    # Base N(0, I₂) with r = −½‖x − (1.5, 0)‖²: the tilt is N((0.75, 0), ½I). Exact tilt samples are
    # far closer (SW 0.041–0.066 over seeds 0–9, the sampling floor) than the base samples (0.57–0.63).
    g = _gen(10)
    base = torch.randn(6000, 2, generator=g)
    rewards = -0.5 * (base - torch.tensor([1.5, 0.0])).pow(2).sum(1)
    exact = torch.randn(800, 2, generator=g) * math.sqrt(0.5) + torch.tensor([0.75, 0.0])
    out = tilt_fidelity(exact, base, rewards, lam=1.0, r_max=0.0, generator=_gen(11), n_boot=10)
    assert out["target_samples"] > 1000  # Z = ½·e^{−0.5625} ≈ 0.285 of 6000
    assert out["sw_to_target"] < 0.15 < 0.4 < out["sw_base_to_target"]
    assert 0 < out["sw_to_target_se"] < 0.1 and 0 < out["sw_base_to_target_se"] < 0.1


def test_gmm_tilt_fidelity_separates_exact_samples_from_the_base() -> None:
    # Exact tilt samples sit at the sampling floor and recover the weights (err 0.003–0.024 over seeds
    # 0–9; SW 0.05–0.17 against a floor of 0.04–0.22, n = 1000); base samples are off in the weights by
    # |0.5 − 0.709| = 0.21 (measured 0.19–0.24) and at SW 0.83–1.03.
    base = two_mode_mixture()
    target = base.tilt_quadratic(0.5 * torch.eye(2), torch.tensor([0.5, 1.0]), 1.0)
    exact, _ = target.sample(1000, generator=_gen(12))
    xb, _ = base.sample(1000, generator=_gen(13))
    fe, fb = gmm_tilt_fidelity(exact, target, n_boot=5), gmm_tilt_fidelity(xb, target, n_boot=5)
    assert fe["weight_err"] < 0.04 and fb["weight_err"] > 0.15
    assert fe["sw_to_target"] < 2 * fe["sw_exact_floor"] + 0.05
    assert fb["sw_to_target"] > 3 * fe["sw_to_target"]


def test_feature_extractors() -> None:
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert feature_extractor("pixels")(x).shape == (4, 64)
    assert feature_extractor("classifier")(x).shape == (4, 128)
    with pytest.raises(SoctuneError, match="unknown feature extractor"):
        feature_extractor("nope")


def test_gaussian_mixture_module_helpers_are_consistent() -> None:
    # the mixture used as ground truth: its sample weights match its weights (sanity for the above)
    gm = GaussianMixture.isotropic([0.3, 0.7], [[-3.0, 0.0], [3.0, 0.0]], 0.25)
    x, _ = gm.sample(20_000, generator=_gen(14))
    assert torch.allclose(mixture_weights_by_nearest_mean(x, gm), gm.weights, atol=0.02)
