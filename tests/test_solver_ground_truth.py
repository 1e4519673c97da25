"""Ground truth for solvers that claim the reward tilt (slow tier).

Base: DESIGN.md §6's two-mode 2-D mixture (modes (±2, 0), variance 0.25, weights ½/½), exact
model (GaussianMixtureDenoiser) plus a learnable correction. Rewards with a closed-form tilt:
linear r = 0.5·x₁ (tilted weights 0.119/0.881) and quadratic r = −¼‖x − (0.5, 1)‖² (tilted weights
0.291/0.709, means pulled towards c, variance 0.25 → 0.222). λ = 1.

Each case first measures the BASE chain's own error against the exact base (finite K: DDPM's
fixed-small variance shrinks the modes) and allows it on top of the solver tolerance.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import pytest
import torch
from torch import Tensor

from soctune.finetune import finetune
from soctune.models.base import CorrectedDenoiser, Denoiser
from soctune.models.gmm import (GaussianMixture, GaussianMixtureDenoiser, mixture_weights_by_nearest_mean,
                                sliced_wasserstein, two_mode_mixture)
from soctune.rewards.base import LinearReward, QuadraticReward
from soctune.sde import get_process
from soctune.trajectory import model_step, rollout

pytestmark = pytest.mark.slow

N_EVAL = 4096
QUAD_C = (0.5, 1.0)
QUAD_SCALE = 0.5


def quadratic_log_normaliser(gmm: GaussianMixture, A: Tensor, c: Tensor, lam: float) -> float:
    """log E_p[exp(−λ/2 (x−c)ᵀA(x−c))] in closed form (the logsumexp of tilt_quadratic's weights)."""
    A, c = A.double(), c.double()
    prec = torch.linalg.inv(gmm.covs)
    new_cov = torch.linalg.inv(prec + lam * A)
    h = torch.einsum("mij,mj->mi", prec, gmm.means) + lam * (A @ c)
    new_mean = torch.einsum("mij,mj->mi", new_cov, h)
    quad = (torch.einsum("mi,mi->m", gmm.means, torch.einsum("mij,mj->mi", prec, gmm.means))
            + lam * c @ A @ c - torch.einsum("mi,mi->m", new_mean, h))
    logw = gmm.weights.log() + 0.5 * (torch.logdet(new_cov) - torch.logdet(gmm.covs)) - 0.5 * quad
    return float(torch.logsumexp(logw, 0))


def reward_problem(kind: str, lam: float = 1.0) -> tuple[Any, GaussianMixture, float]:
    """(reward, exact tilted mixture, log Z)."""
    g = two_mode_mixture()
    if kind == "linear":
        a = torch.tensor([0.5, 0.0])
        return LinearReward(a), g.tilt_linear(a, lam), g.log_normaliser_linear(a, lam)
    c = torch.tensor(QUAD_C)
    A = QUAD_SCALE * torch.eye(2)
    return QuadraticReward(c=c, scale=QUAD_SCALE), g.tilt_quadratic(A, c, lam), quadratic_log_normaliser(g, A, c, lam)


def mixture_report(x: Tensor, target: GaussianMixture) -> dict[str, Any]:
    """Weights (nearest-mean assignment on the target), per-component means, and the sliced
    Wasserstein distance to exact target samples next to that of a second exact sample set."""
    x = x.double()
    w = mixture_weights_by_nearest_mean(x, target)
    comp = target.responsibilities(x).argmax(-1)
    means = torch.stack([x[comp == m].mean(0) for m in range(len(target.weights))])
    gen = torch.Generator().manual_seed(1234)
    ref, _ = target.sample(x.shape[0], generator=gen)
    sw = sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(5))
    # a stable yardstick: the mean SW between independent exact sets (single pairs scatter ±40%)
    sw_ref = sum(sliced_wasserstein(target.sample(x.shape[0], generator=gen)[0], ref,
                                    generator=torch.Generator().manual_seed(5)) for _ in range(4)) / 4
    return {"weights": w, "weight_err": float((w - target.weights).abs().max()), "means": means,
            "mean_err": float((means - target.means).norm(dim=-1).max()), "sw": sw, "sw_ref": sw_ref}


@torch.no_grad()
def soc_cost(process: Any, model: Denoiser, reward: Any, lam: float, n: int, seed: int) -> tuple[float, float]:
    """J = E[Σ_k ½‖(m_θ − m_base)/s_k‖² − λ r(x_K)] over stochastic steps, and its standard error."""
    traj = rollout(process, model, batch_size=n, sample_shape=(2,), generator=torch.Generator().manual_seed(seed))
    cost = torch.zeros(n, dtype=torch.float64)
    for k in traj.stochastic_steps():
        with model.base():
            m_base = model_step(process, model, traj.xs[k], k, None, traj.states[k]).mean
        cost += 0.5 * ((traj.means[k] - m_base) / traj.stds[k]).double().pow(2).sum(1)
    total = cost - lam * reward(traj.x_final).double()
    return float(total.mean()), float(total.std() / math.sqrt(n))


PREDICTION = {"ddpm": "epsilon", "fm-memoryless": "velocity"}
LAM = 1.0
K = 25  # the base chains reproduce the mixture's weights to ≤ 0.015 at K = 25 (measured below)
PROCESS_OPTIONS: dict[str, dict[str, Any]] = {"ddpm": {}, "fm-memoryless": {}}


class ControlGainDenoiser(CorrectedDenoiser):
    """The exact base plus a correction expressed in CONTROL units:
    pred_θ(x, t_k) = pred_base(x, t_k) + g_k·c_φ(x, t_k, pred_base),  g_k = s_k / |∂m_k/∂pred|.

    Why: the step's control is u_k = (m_θ − m_base)/s_k = (c_k/s_k)·δpred, and on fm-memoryless
    (velocity model, K = 25) g_k runs from 23 at t = 0 to 0.02 at the last stochastic step, so a plain
    additive correction must output values three decades apart along the chain; with the gain c_φ is
    the control itself. g = 0 on the deterministic last step keeps the base's final jump, as the
    tilted path measure does (a plain correction shifts it by whatever it generalises to from the
    neighbouring times). On the VP ε-model (ddpm) g_k stays in 0.07 … 1.4, so it changes little there.
    Measured effect (AM, fm-memoryless, linear reward, seed 0, 300 iterations): weights 0.199/0.801
    with the gain (lr 3e-4) vs 0.222/0.778 plain (lr 1e-3) and 0.232 plain without gradient clipping.
    """

    def __init__(self, base_model: Denoiser, process: Any, dim: int = 2, **net_options: Any) -> None:
        super().__init__(base_model, dim, base_features=True, **net_options)
        x = torch.zeros(1, dim)
        gains = []
        for k in range(process.num_steps):
            m0 = process.step_kernel(x, k, torch.zeros_like(x), process.init_state(), self.prediction_type)
            m1 = process.step_kernel(x, k, torch.ones_like(x), process.init_state(), self.prediction_type)
            c = float((m1.mean - m0.mean).abs().mean())
            gains.append(float(m0.std) / c if c > 0 else 0.0)
        self.register_buffer("times", process.ts[:-1].clone().double(), persistent=False)
        self.register_buffer("gains", torch.tensor(gains, dtype=torch.float64), persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self.base_model(x, t, cond)
        if not self._adapt:
            return out
        k = int(torch.argmin((self.times - float(t.reshape(-1)[0])).abs()))  # the grid step being taken
        flat = x.reshape(x.shape[0], -1)
        corr = self.correction(flat, t, out.reshape(x.shape[0], -1)).reshape(x.shape)
        return out + float(self.gains[k]) * corr


def make_process(name: str) -> Any:
    return get_process(name, num_steps=K, **PROCESS_OPTIONS[name])


@torch.no_grad()
def base_chain_error(process_name: str, seed: int = 7) -> dict[str, Any]:
    """The base chain's own error at K steps against the exact base mixture (same report)."""
    process = make_process(process_name)
    model = GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[process_name])
    x = rollout(process, model, batch_size=N_EVAL, sample_shape=(2,), generator=torch.Generator().manual_seed(seed)).x_final
    return mixture_report(x, two_mode_mixture())


def fmt(rep: dict[str, Any]) -> str:
    w = ", ".join(f"{v:.3f}" for v in rep["weights"].tolist())
    m = "; ".join("(" + ", ".join(f"{u:.2f}" for u in row) + ")" for row in rep["means"].tolist())
    return (f"weights [{w}] (err {rep['weight_err']:.3f}), means {m} (err {rep['mean_err']:.3f}), "
            f"SW {rep['sw']:.3f} (exact-vs-exact {rep['sw_ref']:.3f})")


# ---- the tilt-claiming solvers ------------------------------------------------------------------
#: (solver, process) -> solver options and training settings (soctune.finetune keyword arguments)
SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("adjoint-matching", "fm-memoryless"): {"solver_options": {}, "control_gain": True, "iters": 300,
                                            "batch_size": 256, "lr": 3e-4, "grad_clip": 0.0},
    ("adjoint-matching", "ddpm"): {"solver_options": {}, "control_gain": True, "iters": 300, "batch_size": 256,
                                   "lr": 3e-4, "grad_clip": 0.0},
    # step_weighting="variance" puts the forward ∇-DB term in control units; the default ("none")
    # lets the smallest-noise steps dominate and moves the weights only to 0.48/0.52 in 300 iterations
    ("nabla-db", "ddpm"): {"solver_options": {"step_weighting": "variance"}, "control_gain": False, "iters": 300,
                           "batch_size": 256, "lr": 1e-3},
}
#: SW(samples, exact) ≤ 1.5·SW(exact, exact) + SW_MARGIN + the base chain's own SW excess. Margin:
#: the passing case measures 0.068 / 0.196 / 0.122 over seeds 0–2 (exact-vs-exact 0.058, so its bound
#: is 0.237); the exact tilted denoiser run through the K = 25 chains lands at 0.14–0.20 (its own
#: discretisation error); the plateaued runs of KNOWN_GAPS at ≥ 0.3.
SW_MARGIN = 0.15
WEIGHT_TOL, MEAN_TOL = 0.05, 0.15

#: Cases that do not reach the tolerances yet (xfail, not strict: an XPASS means a solver improved and
#: the entry can go). Measured with exactly these settings, 4096 samples, seed 0 unless stated.
#:
#: Why AM plateaus (python benchmarks/adjoint_tails.py): on the chain driven by the EXACT tilted model,
#: AM's regression target −s_k ã_{k+1} has a Pareto-like tail at the steps where the mode is chosen —
#: Hill tail index 1.1–1.2 (fm-memoryless, linear) and 1.3 (ddpm, quadratic) on steps 0–15, the top 1%
#: of samples carrying 89–99% of Σ‖target‖² (max ‖target‖² ≈ 2·10⁴ against a mean control² ≈ 0.1).
#: The pathwise derivative through the base chain's watershed behaves like the derivative of a smoothed
#: step (P(|ã| > y) ∝ 1/y): the mean exists, the variance does not, and a sample mean over any
#: affordable batch misses the part carried by rarer paths, so the regression sees a too-small target
#: at mid-chain (batch means 0.18–0.21 vs the tilted control's 0.26 at t ≈ 0.25, fm linear). Hence:
#: batch 256 → 1024 changes nothing (0.205 → 0.202), and STARTED AT THE EXACT TILT, AM drifts away
#: towards less tilt (300 iterations: fm linear 0.092 → 0.156, ddpm linear 0.100 → 0.154, ddpm
#: quadratic 0.272 → 0.367 in 150). Also measured (fm linear, from the base): variant="basic" 0.171
#: (mean err 0.219, mass left between the modes), bootstrap=0.1 0.239, bootstrap 0.5 switched on after
#: 200 plain iterations 0.204 → 0.323 (the bootstrapped target inherits the too-small control).
#: ∇-DB (no adjoint products) started at the exact tilt stays there (150 iterations: linear 0.103,
#: quadratic 0.282) but so it does with a wrong λ = 2 (0.100; exact 0.018): it moves mass across the
#: watershed very slowly in either direction, and from the base it plateaus (900 iterations: 0.360).
KNOWN_GAPS: dict[tuple[str, str, str], str] = {
    ("adjoint-matching", "fm-memoryless", "linear"):
        "weights 0.199/0.801 (exact 0.119/0.881; seed 1: 0.246/0.754), mean err 0.157 (seed 1: 0.140), "
        "SW 0.475 (seed 1: 0.655) vs bound 0.25; 600 iterations: 0.204/0.796, no better; "
        "SOC cost J = −0.33 vs −log Z = −0.465: the plateau of DESIGN.md §6 (mass is not moved across the watershed between the modes)",
    ("adjoint-matching", "ddpm", "linear"):
        "weights 0.203/0.797, mean err 0.140, SW 0.501 vs bound 0.27; J = −0.345 vs −0.465 (same plateau)",
    ("adjoint-matching", "ddpm", "quadratic"):
        "weights 0.351/0.649 (exact 0.291/0.709, err 0.060 vs 0.052 allowed), mean err 0.058, SW 0.315 vs "
        "bound 0.26; J = 1.180 vs −log Z = 1.189",
    ("nabla-db", "ddpm", "linear"):
        "weights 0.364/0.636, mean err 0.055, SW 1.06; J = −0.20 vs −0.465 (transitions=1.0: 0.336/0.664, "
        "3.5× slower; default step_weighting: 0.484/0.516; 900 iterations 0.360; lr 3e-3 0.347; the digits "
        "preset's prediction weighting, γ = 1, lr 1e-2: 0.408)",
    ("nabla-db", "ddpm", "quadratic"):
        "weights 0.424/0.576 (exact 0.291/0.709), mean err 0.090, SW 0.588; J = 1.228 vs 1.189",
}


def _case(solver: str, process: str, reward: str) -> Any:
    gap = KNOWN_GAPS.get((solver, process, reward))
    # the gaps cost ~2 min each and are known: they run only on request (SOCTUNE_RUN_GAPS=1)
    run_gaps = os.environ.get("SOCTUNE_RUN_GAPS") == "1"
    marks = [pytest.mark.xfail(reason=f"not yet at the tolerance: {gap}", strict=False, run=run_gaps)] if gap else []
    return pytest.param(solver, process, reward, id=f"{solver}-{process}-{reward}", marks=marks)


CASES = [_case(solver, process, reward) for (solver, process) in SETTINGS for reward in ("linear", "quadratic")]


@pytest.fixture(scope="module")
def base_errors() -> dict[str, dict[str, Any]]:
    """Measured once per process (K = 25, 4096 samples): ddpm weights 0.498/0.502 (err 0.002), means
    (±1.95, 0.01) (err 0.057: fixed-small variance shrinks the modes), SW 0.139 vs 0.115 exact-vs-exact;
    fm-memoryless weights 0.515/0.485 (err 0.015), mean err 0.039, SW 0.094."""
    return {name: base_chain_error(name) for name in PROCESS_OPTIONS}


def train(solver: str, process_name: str, reward_kind: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the exact base + control-units correction with ``soctune.finetune``; report on
    4096 samples of the fine-tuned chain against the closed-form tilt."""
    settings = dict(SETTINGS[(solver, process_name)])
    options = {"reward_scale": LAM, **settings.pop("solver_options")}
    process = make_process(process_name)
    reward, tilt, _ = reward_problem(reward_kind, LAM)
    torch.manual_seed(seed)
    base = GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[process_name])
    if settings.pop("control_gain"):
        model: CorrectedDenoiser = ControlGainDenoiser(base, process, hidden=128, depth=2)
    else:
        model = CorrectedDenoiser(base, 2, base_features=True, hidden=128, depth=2)
    ft = finetune(model=model, process=process, solver=solver, solver_options=options, reward=reward,
                  sample_shape=(2,), seed=seed, **settings)
    x = ft.sample(N_EVAL, seed=100 + seed)
    return ft, mixture_report(x, tilt)


@pytest.mark.parametrize("solver, process_name, reward_kind", CASES)
def test_solver_reaches_the_closed_form_tilt(solver: str, process_name: str, reward_kind: str,
                                             base_errors: dict[str, dict[str, Any]]) -> None:
    """Weights within 0.05 and component means within 0.15 of the closed-form tilt, SW to exact tilt
    samples ≤ 1.5 × exact-vs-exact + SW_MARGIN, each plus the base chain's own error at K = 25.

    Passing case, measured (300 iterations, ~85 s): adjoint-matching on fm-memoryless with the
    quadratic reward — seed 0: weights 0.300/0.700 (exact 0.291/0.709, err 0.009), means (−1.68, 0.07)
    and (1.88, 0.09) (err 0.061), SW 0.068 vs exact-vs-exact 0.058, J = 1.202 vs −log Z = 1.189;
    seeds 0/1/2: weight err 0.008/0.035/0.019, mean err 0.061/0.057/0.059, SW 0.068/0.196/0.122
    (bounds 0.065, 0.189, 0.237).
    The other cases are KNOWN_GAPS (xfail) with their numbers.
    """
    base = base_errors[process_name]
    t0 = time.perf_counter()
    ft, rep = train(solver, process_name, reward_kind)
    print(f"{solver} on {process_name}, {reward_kind}: {fmt(rep)}; {time.perf_counter() - t0:.0f} s")
    sw_base_excess = max(base["sw"] - base["sw_ref"], 0.0)
    assert rep["weight_err"] <= WEIGHT_TOL + base["weight_err"], fmt(rep)
    assert rep["mean_err"] <= MEAN_TOL + base["mean_err"], fmt(rep)
    assert rep["sw"] <= 1.5 * rep["sw_ref"] + SW_MARGIN + sw_base_excess, fmt(rep)


# ---- DRaFT-1 is mode seeking on the same quadratic reward ---------------------------------------
def run_draft1(seed: int) -> tuple[float, float, float, float]:
    """(mean reward, spread tr Cov) of DRaFT-1 samples and of the exact tilt, quadratic reward."""
    process = get_process("ddpm", num_steps=10, scheduler_config={"timestep_spacing": "trailing", "clip_sample": False})
    reward, tilt, _ = reward_problem("quadratic", LAM)
    x_tilt, _ = tilt.sample(200_000, generator=torch.Generator().manual_seed(0))
    tilt_reward, tilt_spread = float(reward(x_tilt.float()).mean()), float(x_tilt.var(0).sum())
    torch.manual_seed(seed)
    model = CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, "epsilon"), 2, hidden=64, depth=2)
    ft = finetune(model=model, process=process, solver="draft", solver_options={"k": 1, "reward_scale": LAM},
                  reward=reward, sample_shape=(2,), iters=150, batch_size=128, lr=1e-3, seed=seed)
    x = ft.sample(N_EVAL, seed=1000 + seed)
    return float(reward(x).mean()), float(x.double().var(0).sum()), tilt_reward, tilt_spread


def test_draft1_is_mode_seeking_on_the_quadratic_reward() -> None:
    """DRaFT-1 at λ = 1 maximises the reward instead of sampling the tilt: higher mean reward than the
    exact tilt and a smaller spread (tests/test_draft_mode_seeking.py shows the same for another
    quadratic; this is the reward of the ground-truth cases above). Settings as there: ancestral DDPM,
    K = 10, "trailing" spacing (the last step starts at noise level 0.33, so one differentiated step
    has leverage), 150 iterations of batch 128 (~10 s).

    Measured over seeds 0–2: mean reward −0.013 / −0.016 / −0.015 against the tilt's −0.983, spread
    tr Cov 0.054 / 0.065 / 0.059 against the tilt's 3.053 — collapsed onto the reward's maximiser c."""
    r, spread, tilt_reward, tilt_spread = run_draft1(seed=0)
    print(f"DRaFT-1: mean reward {r:.3f} (tilt {tilt_reward:.3f}), spread {spread:.3f} (tilt {tilt_spread:.3f})")
    assert r > tilt_reward + DRAFT_REWARD_GAP
    assert spread < DRAFT_SPREAD_RATIO * tilt_spread


DRAFT_REWARD_GAP = 0.5  # measured gap ≈ 0.97
DRAFT_SPREAD_RATIO = 0.1  # measured ratio ≈ 0.02
