"""The randomised ground-truth suite (slow tier): soctune.models.gmm_problems' generator and closed forms,
and one trained case through benchmarks/ground_truth.py's code path.

The closed-form checks are cheap and strict (seconds each): the tilt of every cell of the problem grid
against importance-weighted exact base samples, log Z against the Monte Carlo normaliser, the Monte Carlo
J*_K = −log E_base chain[exp(λr)] tending to the continuous −log Z as K grows, and the benchmark's K-step
reference against the dynamic-programming optimum of tests/discrete_optimum.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

from discrete_optimum import solve_x1
from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
from soctune.models.gmm_problems import COMPONENTS, DIMS, KINDS, LAMBDAS, TiltProblem, random_tilt_problem
from soctune.registry import SoctuneError
from soctune.sde import get_process
from soctune.soc import soc_cost, soc_costs, soc_lower_bound, step_controls
from soctune.trajectory import rollout

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # after the installed packages: no shadowing
import common  # noqa: E402
import ground_truth  # noqa: E402

pytestmark = pytest.mark.slow

GRID = range(len(DIMS) * len(KINDS) * len(LAMBDAS))  # problems 0–11: each cell of the grid once


def test_generator_is_seeded_and_covers_the_grid() -> None:
    """Same index, same problem; problems 0–11 are the 12 cells dims × rewards × λ; 2–5 components
    with unequal weights and full, unequal covariances; components separated enough that the nearest
    component of an exact sample is its own for ≥ 99.5% of samples (measured ≥ 99.86% on 0–23), of the
    base and of the tilt (weights by nearest component are then a fair measure)."""
    a, b = random_tilt_problem(5), random_tilt_problem(5)
    assert torch.equal(a.base.means, b.base.means) and torch.equal(a.base.covs, b.base.covs) and torch.equal(a.a, b.a)
    cells = {(p.dim, p.kind, p.lam) for p in map(random_tilt_problem, GRID)}
    assert cells == {(d, k, lam) for d in DIMS for k in KINDS for lam in LAMBDAS}
    for i in range(24):
        p = random_tilt_problem(i)
        m = len(p.base.weights)
        assert COMPONENTS[0] <= m <= COMPONENTS[1]
        assert float(p.base.weights.max() / p.base.weights.min()) > 1.01
        off_diag = p.base.covs - torch.diag_embed(torch.diagonal(p.base.covs, dim1=-2, dim2=-1))
        assert float(off_diag.abs().amax()) > 1e-3, p.name  # full covariances, not diagonal
        assert float((p.base.covs[0] - p.base.covs[1]).abs().amax()) > 1e-3, p.name
        for gmm in (p.base, p.tilt):
            x, label = gmm.sample(20_000, generator=torch.Generator().manual_seed(i))
            agree = float((gmm.responsibilities(x).argmax(-1) == label).double().mean())
            assert agree >= 0.995, (p.name, agree)


@pytest.mark.parametrize("index", list(GRID))
def test_closed_form_tilt_matches_importance_weighted_base_samples(index: int) -> None:
    """With w_i ∝ exp(λ r(x_i)) on 400 000 exact base samples (labels known), the tilt's component
    weights, per-component means and covariances, and log Z = log mean e^{λr} agree with the closed form.

    Measured (seed 1): effective sample sizes 194k–390k; weight errors ≤ 0.0006, mean/covariance
    entries ≤ 0.0061, log Z within 3 s.e. (s.e. 0.0003–0.0016)."""
    p = random_tilt_problem(index)
    n = 400_000
    x, label = p.base.sample(n, generator=torch.Generator().manual_seed(1))
    logw = p.lam * p.log_reward(x)
    w = torch.softmax(logw, 0)
    assert float(1 / w.pow(2).sum()) > 100_000  # the estimate is strict only with many effective samples
    shares = torch.zeros(len(p.base.weights), dtype=torch.float64).index_add_(0, label, w)
    assert float((shares - p.tilt.weights).abs().max()) < 0.003, (shares, p.tilt.weights)
    for m in range(len(p.base.weights)):
        wm = w * (label == m)
        wm = wm / wm.sum()
        mean = wm @ x
        d = x - mean
        cov = torch.einsum("n,ni,nj->ij", wm, d, d)
        assert float((mean - p.tilt.means[m]).norm()) < 0.02, (p.name, m)
        assert float((cov - p.tilt.covs[m]).abs().max()) < 0.02, (p.name, m)
    log_z = float(torch.logsumexp(logw, 0)) - math.log(n)
    se = float(torch.exp(logw - torch.logsumexp(logw, 0)).std() * math.sqrt(n))
    assert abs(log_z - p.log_normaliser()) < 4 * se + 1e-4, (log_z, p.log_normaliser(), se)


def test_log_normaliser_identity_matches_the_linear_closed_form() -> None:
    """TiltProblem.log_normaliser (from p·e^{λr} = Z·p* at one point) equals GaussianMixture's own
    closed-form log_normaliser_linear on every linear problem of the grid."""
    for i in GRID:
        p = random_tilt_problem(i)
        if p.kind == "linear":
            assert p.log_normaliser() == pytest.approx(p.base.log_normaliser_linear(p.a, p.lam), abs=1e-9)


def kstep_gap(index: int, process_name: str, num_steps: int, n: int = 1 << 16) -> tuple[float, float]:
    """(J*_K + log Z, s.e.) of problem ``index`` on ``process_name`` with K = num_steps."""
    p = random_tilt_problem(index)
    process = get_process(process_name, num_steps=num_steps)
    model = GaussianMixtureDenoiser(p.base, process, ground_truth.PREDICTION[process_name])
    j, se = soc_lower_bound(process, model, p.reward(), p.lam, n, torch.Generator().manual_seed(0),
                            sample_shape=(p.dim,))
    return j + p.log_normaliser(), se


@pytest.mark.parametrize("process_name", ["ddpm", "fm-memoryless"])
def test_kstep_optimum_cost_tends_to_minus_log_z(process_name: str) -> None:
    """The Monte Carlo J*_K of the exact base chain converges to the continuous optimum −log Z at rate
    ≈ 1/K. Problem 10 (2-D, quadratic, λ = 2; the strongest discretisation gap of the grid's 2-D cells)
    measured with 2^15 rollouts: J*_K + log Z = −0.114 / −0.049 / −0.017 (ddpm) and −0.104 / −0.040 /
    −0.014 (fm-memoryless) at K = 10 / 25 / 100, s.e. ≈ 0.005, i.e. K·gap ≈ 1.0–1.7. Problem 4 (2-D,
    linear, λ = 1) has no visible gap at any K (|gap| ≤ 0.003, s.e. 0.003)."""
    gaps = {k: kstep_gap(10, process_name, k) for k in (10, 25, 100)}
    (g10, s10), (g25, s25), (g100, s100) = gaps[10], gaps[25], gaps[100]
    assert g10 < g25 - 2 * math.hypot(s10, s25) and g25 < g100 - 2 * math.hypot(s25, s100), gaps
    assert abs(g100) < 0.03, gaps
    for k, (g, s) in gaps.items():
        assert 0.5 < k * abs(g) < 2.5, gaps
    for k in (10, 25):
        g, s = kstep_gap(4, process_name, k)
        assert abs(g) < 4 * s, (k, g, s)


def test_order2_controls_are_the_path_kl_to_the_base_chain() -> None:
    """On order-2 dpmpp-sde the step mean reads the previous x̂₁. For a perturbed
    ControlGainDenoiser (benchmarks/ground_truth.correction_model):
    (a) step_controls' u_k is (m_θ(x_k; x̂₁^θ(x_{k−1})) − m_base(x_k; x̂₁^base(x_{k−1})))/s_k, the base chain
        replayed here by hand along the rollout's states — the step of the KL to the base PATH measure;
    (b) the gains are the true ones: with the SAME state in both means, (m_θ − m_base)/s_k = ±c_φ;
    (c) hence soc_cost is KL − λE[r] and sits above the Donsker–Varadhan bound soc_lower_bound. Measured
        at the scaled-down correction of (c): J 0.028 ± 0.003 against J*_K −0.048 ± 0.003; with the fine-tuned
        x̂₁ in the base mean (the convention before base_states) J read −0.020, i.e. it under-counted."""
    p = random_tilt_problem(0)
    process = get_process("dpmpp-sde", num_steps=ground_truth.K, order=2)
    assert process.multistep
    torch.manual_seed(0)
    model = ground_truth.correction_model(p, "dpmpp-sde", process, hidden=32, depth=2)
    with torch.no_grad():  # the net starts at zero output: give it a non-trivial one
        for param in model.correction.parameters():
            param.add_(0.3 * torch.randn_like(param))
    traj = rollout(process, model, batch_size=64, sample_shape=(p.dim,), generator=torch.Generator().manual_seed(0))
    controls = step_controls(process, model, traj)
    assert len(controls) == process.num_steps
    state = process.init_state()
    for k in range(process.num_steps):
        t = torch.full((64,), process.model_time(k), dtype=torch.float32)
        with torch.no_grad():
            with model.base():
                base_pred = model(traj.xs[k], t)
                base_out = process.step_kernel(traj.xs[k], k, base_pred, state, model.prediction_type)
                same_state = process.step_kernel(traj.xs[k], k, base_pred, traj.states[k], model.prediction_type)
            c_phi = model.correction(traj.xs[k], t, base_pred)
        torch.testing.assert_close(controls[k], (traj.means[k] - base_out.mean) / traj.stds[k], rtol=1e-4, atol=1e-4)
        assert float(c_phi.abs().max()) > 1e-3
        u_same = (traj.means[k] - same_state.mean) / traj.stds[k]
        torch.testing.assert_close(u_same.abs(), c_phi.abs(), rtol=1e-3, atol=3e-4)  # float32 means
        if k > 0:  # the fine-tuned previous x̂₁ differs from the base's: (a) is not (b)
            assert float((controls[k] - u_same).abs().max()) > 1e-3
        state = base_out.state
    with torch.no_grad():  # (c) at a control of the size training produces, where the bound is not trivially met
        model.correction.out.weight.mul_(0.005)
        model.correction.out.bias.mul_(0.005)
    reward = p.reward()
    j, j_se = soc_cost(process, model, reward, p.lam, 4096, torch.Generator().manual_seed(1), sample_shape=(p.dim,))
    j_opt, j_opt_se = soc_lower_bound(process, model, reward, p.lam, 4096, torch.Generator().manual_seed(2),
                                      sample_shape=(p.dim,))
    print(f"J {j:.4f} ± {j_se:.4f}, J*_K {j_opt:.4f} ± {j_opt_se:.4f}")
    assert j > j_opt + 3 * math.hypot(j_se, j_opt_se)


def test_benchmark_table_and_pair_selection() -> None:
    """summary_table counts the share within the bounds per pair; out_of_bounds lists exactly the runs
    outside; an unknown --pairs entry is one SoctuneError line naming the valid pairs."""
    row = {"problem": "p00", "solver": "nabla-db", "process": "ddpm", "seed": 0, "weights": [0.5, 0.5],
           "exact_weights": [0.4, 0.6], "kstep_weights": [0.41, 0.59], "weight_err": 0.1, "sw": 0.5, "sw_bound": 0.3,
           "gap": 0.2, "gap_se": 0.01, "kstep_weight_err": 0.01, "within": False}
    good = dict(row, problem="p01", weight_err=0.01, sw=0.2, gap=0.01, within=True)
    table = ground_truth.summary_table([row, good])
    assert "| nabla-db | ddpm | 25 | – | – | 2 | 1/2 (50%) |" in table and table.rstrip().endswith("| – |")
    listed = ground_truth.out_of_bounds([row, good])
    assert "p00" in listed and "p01" not in listed
    # the weights' share of the gap: KL(0.5/0.5 ‖ 0.41/0.59) = ½ log(0.5/0.41) + ½ log(0.5/0.59) = 0.0165 nats
    assert ground_truth.label_kl(row) == pytest.approx(0.5 * math.log(0.5 / 0.41) + 0.5 * math.log(0.5 / 0.59))
    assert "gap 0.200 ± 0.010, of it ≥ 0.016 the weights'" in listed
    # the diagnosis against the exact-tilt control's reference of the same (problem, process)
    row.update(j=0.1, j_se=0.01)
    ref = {"tilt_model_j": -0.1, "tilt_model_j_se": 0.01, "tilt_model_cut": 0.9, "tilt_model_within": True}
    assert ground_truth.diagnosis(row, ref).startswith("optimisation")
    assert ground_truth.diagnosis(row, dict(ref, tilt_model_j=0.09)).startswith("flat cost")
    assert ground_truth.diagnosis(row, dict(ref, tilt_model_j=0.2)).startswith("beats the reference")
    assert ground_truth.diagnosis(row, dict(ref, tilt_model_within=False)).startswith("discretisation")
    refs = {("p00", "ddpm", 25): ref}
    assert "— optimisation" in ground_truth.out_of_bounds([row, good], refs)
    assert ground_truth.diagnosis_counts([row, good], refs) == {"optimisation": 1}
    assert ground_truth.summary_table([row, good], refs).rstrip().endswith("| +0.200 (1) | – | – |")
    # a row's own tilt-model reference, on its rollout noise, wins: +0.010 ± 0.002 paired is an optimisation
    # shortfall where the same difference unpaired (± 0.014) is within the noise
    paired = dict(ref, tilt_model_j=0.09, tilt_model_dj=0.01, tilt_model_dj_se=0.002)
    assert ground_truth.diagnosis(row, dict(ref, tilt_model_j=0.09)).startswith("flat cost")
    assert ground_truth.diagnosis(dict(row, paired_tilt_model=paired), dict(ref, tilt_model_j=0.09)).startswith(
        "optimisation")
    assert "+0.010 ± 0.002 from the run's (paired s.e." in ground_truth.diagnosis(dict(row, paired_tilt_model=paired), None)
    # likewise its own K-step optimum (2-D): paired, it wins over the --dp file's
    dp = {"dp_j": 0.09, "dp_j_se": 0.01, "dp_within": True, "dp_weights": [0.4, 0.6], "dp_weight_err": 0.0, "dp_sw": 0.1}
    assert ground_truth.diagnosis(row, None, dp).startswith("flat cost")
    own = dict(row, paired_dp=dict(dp, dp_dj=0.01, dp_dj_se=0.002))
    assert ground_truth.diagnosis(own, None, dp).startswith("optimisation")
    assert ground_truth._dp_of(own, {("p00", "ddpm", 25): dp}) is own["paired_dp"]
    # a reference holds for its own K: a run with another step count is a line of its own, without it
    table = ground_truth.summary_table([row, good, dict(row, K=50)], refs)
    assert "| nabla-db | ddpm | 50 | – | – | 1 | 0/1 (0%) |" in table and table.rstrip().endswith("| – | – | – |")
    assert ground_truth.diagnosis_counts([dict(row, K=50)], refs) == {"no tilt-model reference (run --tilt-model)": 1}
    with pytest.raises(SoctuneError, match="SOLVER:PROCESS"):
        ground_truth.parse_pair("draft:ddpm")
    # the budget per problem size (8-D: more iterations), a study's value over it; no silent default size
    assert ground_truth.budget_for(8)["iters"] > ground_truth.budget_for(2)["iters"]
    assert ground_truth.budget_for(8, {"iters": 5}) == dict(ground_truth.BUDGET[8], iters=5)
    with pytest.raises(SoctuneError, match="no budget for 3-D"):
        ground_truth.budget_for(3)
    # a study's solver options, parsed as the CLI's --set parses values; a malformed one is a usage error
    ap = argparse.ArgumentParser()
    assert common.parse_options(ap, ["estimator=score", "bootstrap=0.5"]) == {"estimator": "score", "bootstrap": 0.5}
    with pytest.raises(SystemExit):
        ground_truth.main(["--option", "bootstrap"])


def test_kstep_reference_against_dynamic_programming() -> None:
    """benchmarks/ground_truth.kstep_reference against the exact optimum of the solvers' control class by
    dynamic programming (tests/discrete_optimum.py), on the separable problem where that exists: DESIGN
    §6's two-mode mixture, r = 0.5·x₁, λ = 1, ddpm, K = 25.

    The reference is the tilted PATH measure P·e^{λr}/Z_K: J*_K = −log E_base chain[e^{λr}] and its terminal
    law p_chain·e^{λr}/Z_K. A chain that only shifts the means of the base's Gaussian steps (what every
    solver trains) cannot reach it at finite K — the tilted transitions are not Gaussian with the base's
    variance — so J*_K is a lower bound the solvers' optimum sits above. Measured: J*_K −0.437 ± 0.002 vs
    the DP optimum −0.410 (its policy simulated: −0.405 ± 0.007), left-mode weight 0.127 (tilted path) vs
    0.152 (DP) vs 0.119 (closed form); K = 50: −0.450 vs −0.433. So part of a reported gap J − J*_K (here
    ≈ 0.028 nats) is this restriction, not the solver."""
    problem = TiltProblem(-1, two_mode_mixture(), "linear", 1.0, a=torch.tensor([0.5, 0.0], dtype=torch.float64))
    ref = ground_truth.kstep_reference(problem, "ddpm")
    process = ground_truth.make_process("ddpm")
    optimum = solve_x1(process, ground_truth.base_model(problem, "ddpm", process), lambda x: -0.5 * x,
                       lo=-8.0, hi=8.0, n_grid=1001)
    j_dp = optimum.expected_cost()
    left_dp = float((optimum.simulate(200_000, seed=0) < 0).mean())
    left_tilt, left_exact = ref["kstep_weights"][0], float(problem.tilt.weights[0])
    print(f"J*_K {ref['j_opt']:.4f} ± {ref['j_opt_se']:.4f}, DP {j_dp:.4f}; left-mode weight: tilted path "
          f"{left_tilt:.4f}, DP {left_dp:.4f}, closed form {left_exact:.4f}")
    assert 0.015 < j_dp - ref["j_opt"] < 0.045, (j_dp, ref)
    assert left_exact + 0.004 < left_tilt < left_dp - 0.015, (left_tilt, left_dp, left_exact)


def test_supervised_fit_to_the_exact_tilt_reaches_the_bounds() -> None:
    """benchmarks/ground_truth.supervised_fit: the runs' model class regressed on the exact-tilt control's
    targets reaches the closed-form tilt even at a small budget — problem 4 (fm-memoryless, cut 0.9), a 2×64
    net, 60 iterations of 128: weight err 0.022–0.023 and SW 0.139–0.193 against the bound 0.271 (seeds 0–2;
    the untrained base is far out: the tilt moves the weights 0.13/0.21/0.23/0.19/0.23 → 0.07/0.37/0.05/0.17/0.33)."""
    fit = ground_truth.supervised_fit(random_tilt_problem(4), "fm-memoryless", 0.9,
                                      {"iters": 60, "batch_size": 128, "hidden": 64, "depth": 2})
    assert fit["within"] and fit["weight_err"] < 0.04, fit
    with pytest.raises(SoctuneError, match="Markov"):
        ground_truth.supervised_fit(random_tilt_problem(4), "dpmpp-sde-order2", 0.9, {"iters": 1})


#: the trained case: problem 4 (2-D, five components, linear reward, λ = 1; the tilt moves the weights
#: 0.13/0.21/0.23/0.19/0.23 → 0.07/0.37/0.05/0.17/0.33, so the untrained base is far outside the bounds)
TRAINED_PROBLEM, TRAINED_SOLVER, TRAINED_PROCESS = 4, "adjoint-matching", "fm-memoryless"
#: the largest cost gap J − J*_K measured over seeds 0–2 (0.043) plus 3 s.e. (s.e. ≈ 0.010)
TRAINED_GAP = 0.075


def test_trained_case_through_the_benchmark() -> None:
    """adjoint-matching on fm-memoryless, problem 4, seed 0, with the library defaults and the benchmark's
    budget, run by benchmarks/ground_truth.run_case exactly as the suite runs it: within the bounds
    (weights ±0.05, SW ≤ 1.5× exact-vs-exact + 0.15) and the cost gap J − J*_K within what seeds 0–2
    measured plus 3 s.e.

    Measured, seeds 0/1/2 (≈ 2 min each), with ControlGainDenoiser's training defaults (lr 0.01, cosine):
    weights 0.10/0.34/0.06/0.16/0.34, 0.09/0.34/0.07/0.17/0.33, 0.09/0.35/0.07/0.16/0.32 (exact
    0.07/0.37/0.05/0.17/0.33), weight error 0.028/0.028/0.020, SW 0.199/0.168/0.166 against a bound of 0.271,
    gap 0.043/0.026/0.042 ± 0.010 (at the earlier lr 0.0003 constant: weight error 0.045/0.041/0.036, gap
    0.057/0.042/0.062) — still above issue #17's 0.03 target on this problem, the hardest of problems 0–4.
    """
    row = ground_truth.run_case(random_tilt_problem(TRAINED_PROBLEM), TRAINED_SOLVER, TRAINED_PROCESS, seed=0)
    print(f"weights {row['weights']} (exact {row['exact_weights']}), err {row['weight_err']:.3f}, SW {row['sw']:.3f} "
          f"(bound {row['sw_bound']:.3f}), gap {row['gap']:.3f} ± {row['gap_se']:.3f}, {row['train_s']:.0f} s")
    assert not row["base_within"]  # the case tests something: the base chain is outside the bounds
    assert row["within"], row
    assert row["gap"] <= TRAINED_GAP, row


def test_tilt_model_is_an_achievable_control_at_the_tilt() -> None:
    """benchmarks/ground_truth.TiltModel: the closed-form tilt's exact denoiser before the cut, the base's
    after; ``base()`` is the base everywhere (its control cost along a base rollout is 0). On problem 0
    (D = 2, 5 components, linear, λ = 0.5) with fm-memoryless the reference it reports meets the bounds
    and its J sits above the Donsker–Varadhan bound J*_K (it is a control of the K-step chain)."""
    p = random_tilt_problem(0)
    process = ground_truth.make_process("fm-memoryless")
    model = ground_truth.TiltModel(p, "fm-memoryless", process, cut=0.9)
    x = torch.randn(6, p.dim)
    for t in (0.5, 0.95):
        tt = torch.full((6,), t)
        with model.base():
            base = model(x, tt)
        tilted = model(x, tt)
        assert torch.equal(base, model.base_model(x, tt))
        assert torch.equal(tilted, model.tilt_model(x, tt) if t < 0.9 else base)
    ref = ground_truth.tilt_model_reference(p, "fm-memoryless")
    j_opt, j_opt_se = soc_lower_bound(process, model, p.reward(), p.lam, 1 << 14, torch.Generator().manual_seed(3),
                                      sample_shape=(p.dim,))
    print(ref, j_opt, j_opt_se)
    assert ref["tilt_model_within"] and ref["tilt_model_cut"] in ground_truth.TILT_MODEL_CUTS
    assert ref["tilt_model_j"] > j_opt - 3 * math.hypot(ref["tilt_model_j_se"], j_opt_se)
    # against a run's own costs on the same seed the difference is paired: the best cut's own costs give 0 ± 0
    best = ground_truth.TiltModel(p, "fm-memoryless", process, cut=ref["tilt_model_cut"])
    costs = soc_costs(process, best, p.reward(), p.lam, ground_truth.N_COST, torch.Generator().manual_seed(11),
                      sample_shape=(p.dim,))
    paired = ground_truth.tilt_model_reference(p, "fm-memoryless", against=costs)
    assert paired["tilt_model_dj"] == 0.0 and paired["tilt_model_dj_se"] == 0.0
    assert paired["tilt_model_j"] == ref["tilt_model_j"] == float(costs.mean())
