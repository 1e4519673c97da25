"""Ground truth for solvers that claim the reward tilt (slow tier).

Base: DESIGN.md §6's two-mode 2-D mixture (modes (±2, 0), variance 0.25, weights ½/½), exact
model (GaussianMixtureDenoiser) plus a learnable correction. Rewards with a closed-form tilt:
linear r = 0.5·x₁ (tilted weights 0.119/0.881) and quadratic r = −¼‖x − (0.5, 1)‖² (tilted weights
0.291/0.709, means pulled towards c, variance 0.25 → 0.222). λ = 1.

The solvers solve the K-step problem, whose exact solution is not the continuous-time tilt: each case
first solves that problem exactly (tests/discrete_optimum.py, dynamic programming per coordinate),
measures how far ITS samples are from the closed form, and allows that on top of the solver
tolerance (K = 25, linear reward: the optimum has weights ≈ 0.145 vs 0.119 and SW ≈ 0.22–0.26 to exact
tilt samples, already above an allowance-free bound).
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch
from torch import Tensor

from discrete_optimum import DiscreteOptimumPolicy, solve_coordinate
from soctune import finetune
from soctune.metrics import sliced_wasserstein
from soctune.models.base import CorrectedDenoiser, Denoiser
from soctune.models.control import ControlGainDenoiser
from soctune.models.gmm import GaussianMixture, GaussianMixtureDenoiser, mixture_weights_by_nearest_mean, two_mode_mixture
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


def make_process(name: str) -> Any:
    return get_process(name, num_steps=K, **PROCESS_OPTIONS[name])


#: −λ r split by coordinate (λ = 1), for the dynamic programme
TERMINAL_COSTS = {"linear": (lambda x: -0.5 * x, None),
                  "quadratic": (lambda x: 0.5 * QUAD_SCALE * (x - QUAD_C[0]) ** 2,
                                lambda x: 0.5 * QUAD_SCALE * (x - QUAD_C[1]) ** 2)}


@torch.no_grad()
def discrete_optimum_error(process_name: str, reward_kind: str) -> dict[str, Any]:
    """The exact K-step optimum's own distance to the closed-form tilt: the report of its samples
    (N_EVAL per set, averaged over 3 sets, as the solvers are evaluated)."""
    process = make_process(process_name)
    base = GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[process_name])
    optima = [None if cost is None else solve_coordinate(process, base, cost, d, lo=-8.0, hi=8.0, n_grid=1001)
              for d, cost in enumerate(TERMINAL_COSTS[reward_kind])]
    model = DiscreteOptimumPolicy(base, process, *optima)
    _, tilt, _ = reward_problem(reward_kind, LAM)
    reps = [mixture_report(rollout(process, model, batch_size=N_EVAL, sample_shape=(2,),
                                   generator=torch.Generator().manual_seed(seed)).x_final, tilt) for seed in (100, 101, 102)]
    return {key: sum(r[key] for r in reps) / len(reps) for key in ("weight_err", "mean_err", "sw", "sw_ref")}


def fmt(rep: dict[str, Any]) -> str:
    w = ", ".join(f"{v:.3f}" for v in rep["weights"].tolist())
    m = "; ".join("(" + ", ".join(f"{u:.2f}" for u in row) + ")" for row in rep["means"].tolist())
    return (f"weights [{w}] (err {rep['weight_err']:.3f}), means {m} (err {rep['mean_err']:.3f}), "
            f"SW {rep['sw']:.3f} (exact-vs-exact {rep['sw_ref']:.3f})")


# ---- the tilt-claiming solvers ------------------------------------------------------------------
#: (solver, process) -> budget only (soctune.finetune keyword arguments: network size, iterations,
#: batch, learning rate of the from-scratch correction network, nabla-db's transitions per trajectory).
#: Every other solver option is the library's default: on these 2-D states adjoint-matching's ``estimator="auto"`` takes the score
#: target (the pathwise adjoint's heavy tail, see below) and both solvers' ``step_weighting="auto"``
#: regress in control units because the model is the library's ControlGainDenoiser.
#: The lr is given with its schedule: these settings (and the figures below) were measured at lr 3e-4
#: constant, before ControlGainDenoiser declared its own training defaults (lr 1e-2, cosine), which
#: would otherwise fill the schedule in under the given lr.
SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    # fm-memoryless with batch 256: quadratic seed 1 SW 0.286 vs bound 0.277, hence 512
    ("adjoint-matching", "fm-memoryless"): {"net": {"hidden": 256, "depth": 3}, "iters": 300, "batch_size": 512,
                                            "lr": 3e-4, "lr_schedule": "constant"},
    ("adjoint-matching", "ddpm"): {"net": {"hidden": 256, "depth": 3}, "iters": 300, "batch_size": 256, "lr": 3e-4,
                                   "lr_schedule": "constant"},
    # half the transitions per trajectory (the default's quarter ends at SW 0.463 against 0.445, linear):
    # the loss's samples along the chain, a budget knob like the batch
    ("nabla-db", "ddpm"): {"net": {"hidden": 256, "depth": 3}, "iters": 300, "batch_size": 256, "lr": 3e-4,
                           "lr_schedule": "constant", "solver_options": {"transitions": 0.5}},
}
#: SW(samples, exact) ≤ 1.5·SW(exact, exact) + SW_MARGIN + the K-step optimum's own SW excess over
#: exact-vs-exact. SW_MARGIN is the solver's share: the passing cases measure up to 0.19 above
#: exact-vs-exact over seeds 0–2 while the optimum's excess is 0.04–0.06 (quadratic); the plateaued
#: runs of KNOWN_GAPS sit 0.3–1.0 above.
SW_MARGIN = 0.15
WEIGHT_TOL, MEAN_TOL = 0.05, 0.15

#: Why adjoint-matching's default on such states is the score target, not the paper's pathwise
#: adjoint (measured with the settings of the time, 4096 samples, seed 0 unless stated).
#:
#: Where the pathwise AM's gap came from (fm-memoryless, linear reward; left-mode weight, closed form 0.119):
#: - the exact optimum of the K = 25 chain (tests/discrete_optimum.py, dynamic programming) has 0.148,
#:   x₁ means −1.81 / 2.08 (ddpm 0.152; quadratic reward: fm 0.315, ddpm 0.318 vs 0.291; K = 50: 0.135):
#:   the discretisation, which no solver of the K-step problem beats;
#: - a noise-free regression of the network on that optimum (same loop, target u*) reaches 0.180 with
#:   2×128 and 0.155 with 3×256: the network and budget;
#: - AM with the pathwise lean adjoint: 0.199 (2×128); 3×256: 0.116 / 0.218 / 0.199 over seeds 0–2;
#:   with estimator="score": 0.198 (2×128), 0.160 (3×256; 600 iterations: 0.166, J −0.388 vs the
#:   optimum's −0.417), 0.173 / 0.166 / 0.162 with batch 512: the estimator.
#: The pathwise target (python benchmarks/adjoint_tails.py) has a Pareto tail at the steps that choose
#: the mode — Hill index 1.1–1.2 (fm, linear), 1.3 (ddpm, quadratic), the top 1% of samples carrying
#: 89–99% of Σ‖target‖²: a derivative through the base chain's watershed is like that of a smoothed
#: step (P(|ã| > y) ∝ 1/y), so its variance is infinite and SGD sees too small a target. Hence batch
#: 256 → 1024 changes nothing (0.205 → 0.202), and STARTED AT THE EXACT TILT the pathwise AM drifts
#: towards less tilt (300 iterations: fm linear 0.092 → 0.156, ddpm linear 0.100 → 0.154, ddpm
#: quadratic 0.272 → 0.367 in 150). Also measured (fm linear, pathwise): variant="basic" 0.171,
#: bootstrap=0.1 0.239, bootstrap 0.5 switched on after 200 plain iterations 0.204 → 0.323.
#: What is left with the score target: seed-to-seed spread (quadratic, seeds 0/1/2: 0.318/0.340/0.333
#: ddpm; fm 0.319/0.347/0.331 with batch 256, 0.329/0.333/0.334 with 512) and, with the linear reward,
#: a left mode at x₁ ≈ −1.65…−1.75 (optimum −1.81).
#: ∇-DB with the paper's reverse target (the flow regressed onto what the current policy implies)
#: plateaued at 0.364 (linear) / 0.424 (quadratic) — 900 iterations 0.360, lr 3e-3 0.347, 3×256 0.411 —
#: and, started at the exact tilt, stayed there even with a wrong λ = 2: the learned flow tracked the
#: policy, which under-fits the low-density watershed where log F̃ jumps. With the exact flow score in
#: its place (grid recursion) the same policy net reaches 0.19; reverse_target="chain" (the flow at x_k
#: regressed onto J_bᵀ × the flow at x_{k+1}) gives 0.24 / 0.41 with the old settings, and with the
#: settings above (γ = 1 through the base's x̂₁, half the transitions, 3×256) passes both rewards.
CASES = [pytest.param(solver, process, reward, id=f"{solver}-{process}-{reward}")
         for solver, process in SETTINGS for reward in ("linear", "quadratic")]


_OPTIMUM_ERRORS: dict[tuple[str, str], dict[str, Any]] = {}


def optimum_error(process_name: str, reward_kind: str) -> dict[str, Any]:
    """Cached :func:`discrete_optimum_error` (≈ 15 s each). Measured (K = 25): fm-memoryless linear —
    weight err 0.024, mean err 0.082, SW 0.222 (exact-vs-exact 0.066); quadratic 0.015, 0.035, 0.098;
    ddpm linear 0.029, 0.082, 0.262; quadratic 0.016, 0.040, 0.117 (exact-vs-exact 0.058)."""
    key = (process_name, reward_kind)
    if key not in _OPTIMUM_ERRORS:
        _OPTIMUM_ERRORS[key] = discrete_optimum_error(process_name, reward_kind)
    return _OPTIMUM_ERRORS[key]


def train(solver: str, process_name: str, reward_kind: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the exact base + control-units correction with ``soctune.finetune`` (settings
    ``SETTINGS[(solver, process_name)]``); report on 4096 samples of the fine-tuned chain
    against the closed-form tilt."""
    settings = dict(SETTINGS[(solver, process_name)])
    process = make_process(process_name)
    reward, tilt, _ = reward_problem(reward_kind, LAM)
    torch.manual_seed(seed)
    base = GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[process_name])
    model = ControlGainDenoiser(base, process, **settings.pop("net"))
    options = {"reward_scale": LAM, **settings.pop("solver_options", {})}
    ft = finetune(model=model, process=process, solver=solver, solver_options=options, reward=reward,
                  seed=seed, **settings)
    x = ft.sample(N_EVAL, seed=100 + seed)
    return ft, mixture_report(x, tilt)


@pytest.mark.parametrize("solver, process_name, reward_kind", CASES)
def test_solver_reaches_the_closed_form_tilt(solver: str, process_name: str, reward_kind: str) -> None:
    """Weights within 0.05 and component means within 0.15 of the closed-form tilt, SW to exact tilt
    samples ≤ 1.5 × exact-vs-exact + SW_MARGIN, each plus the exact K-step optimum's own error.

    Measured with these settings (the library defaults: adjoint-matching takes the score target on
    2-D states, both solvers weigh in control units), seeds 0/1/2 (300 iterations, ≈ 70–120 s each on
    a quiet machine; seed 0 re-measured with the defaults gives the same numbers):
    adjoint-matching, fm-memoryless, linear: weights 0.173/0.166/0.162 (bound 0.193), mean err
    0.120/0.220/0.181 (bound 0.232), SW 0.370/0.323/0.307 (bound ≈ 0.41); quadratic: 0.329/0.333/0.334
    (bound 0.356), mean err 0.041/0.055/0.039, SW 0.206/0.221/0.227 (bound ≈ 0.28);
    adjoint-matching, ddpm, quadratic: 0.318/0.340/0.333, SW 0.162/0.266/0.227 (bound ≈ 0.30), mean
    err 0.069/0.067/0.040; linear: 0.172/0.177/0.180 (exact 0.119, the K-step optimum ≈ 0.148; bound
    0.198), mean err 0.185/0.160/0.174 (bound 0.232), SW 0.364/0.390/0.395 (bound ≈ 0.45);
    nabla-db, ddpm, linear: 0.177/0.182/0.161, mean err 0.163/0.166/0.161, SW 0.388/0.408/0.314;
    quadratic: 0.307/0.319/0.285, mean err 0.073/0.076/0.096, SW 0.108/0.158/0.122 (≈ 100 s each).
    With a quarter of the transitions per trajectory (nabla-db's default 0.25 instead of 0.5) the
    linear case ends at 0.194, SW 0.463 against a bound of 0.445 (seed 0): hence the budget above.
    """
    opt = optimum_error(process_name, reward_kind)
    t0 = time.perf_counter()
    ft, rep = train(solver, process_name, reward_kind)
    print(f"{solver} on {process_name}, {reward_kind}: {fmt(rep)}; {time.perf_counter() - t0:.0f} s; "
          f"K-step optimum: weight err {opt['weight_err']:.3f}, mean err {opt['mean_err']:.3f}, SW {opt['sw']:.3f}")
    assert rep["weight_err"] <= WEIGHT_TOL + opt["weight_err"], fmt(rep)
    assert rep["mean_err"] <= MEAN_TOL + opt["mean_err"], fmt(rep)
    assert rep["sw"] <= 1.5 * rep["sw_ref"] + SW_MARGIN + max(opt["sw"] - opt["sw_ref"], 0.0), fmt(rep)


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
