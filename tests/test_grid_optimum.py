"""benchmarks/grid_optimum.py: the K-step mean-shift optimum of a 2-D problem by dynamic programming on a grid.

Two independent checks of the DP: on DESIGN §6's separable problem it must agree with the 1-D DP of
tests/discrete_optimum.py (a different discretisation: 1-D grid, Gauss–Hermite expectations, a search
over u), and on a non-separable random mixture its policy, run as a model through the library's own
rollout and soc_cost, must pay the J that the DP's value function promises. Then the benchmark's use of it:
the diagnosis of an out-of-bounds run against the K-step optimum.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from discrete_optimum import solve_x1
from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
from soctune.models.gmm_problems import random_tilt_problem
from soctune.registry import SoctuneError
from soctune.sde import get_process
from soctune.soc import soc_cost

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # after the installed packages: no shadowing
import ground_truth  # noqa: E402
from grid_optimum import GridPolicy, solve_grid  # noqa: E402

PREDICTION = {"ddpm": "epsilon", "fm-memoryless": "velocity"}
K = 10
N_GRID = 161  # spacing 0.0875 on [−7, 7]: about a second per solve


def _start(process: object, n: int = 1 << 16) -> torch.Tensor:
    return process.prior((n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("process_name", sorted(PREDICTION))
def test_agrees_with_the_one_dimensional_dp_on_a_separable_problem(process_name: str) -> None:
    """DESIGN §6's two-mode mixture, r = ½x₁, λ = 1, K = 10: x₂ carries no reward, so the 2-D optimum's
    E[V_0] is the 1-D DP's J*. Measured (161 points per axis): ddpm −0.3564 vs −0.3578, fm-memoryless
    −0.3629 vs −0.3647 (121 points: 0.0020 / 0.0033 apart; 241: 0.0006 / 0.0009 — the grid's error,
    shrinking with the spacing); bound 0.004."""
    process = get_process(process_name, num_steps=K)
    base = GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[process_name])
    one_d = solve_x1(process, base, lambda x: -0.5 * x).expected_cost()
    two_d = solve_grid(process, base, lambda x: -0.5 * x[:, 0].double(), n=N_GRID).expected_cost(_start(process))
    assert abs(two_d - one_d) < 0.004, (two_d, one_d)


@pytest.mark.parametrize("process_name", sorted(PREDICTION))
def test_policy_pays_the_value_on_a_random_mixture(process_name: str) -> None:
    """Problem 22 (2-D, four components, quadratic reward, λ = 2; not separable), K = 10: the DP policy
    driving the chain (GridPolicy through rollout and soc_cost, 2¹⁴ rollouts) pays E[V_0] of the DP.
    Measured, rollout seeds 0–2: z = +0.41 / −0.72 / +0.30 (ddpm), +0.65 / −0.49 / −0.52 (fm-memoryless);
    bound 4 s.e. A policy that is not the optimum (no control at all: the base) pays more."""
    p = random_tilt_problem(22)
    process = get_process(process_name, num_steps=K)
    base = GaussianMixtureDenoiser(p.base, process, PREDICTION[process_name])
    reward = p.reward()
    optimum = solve_grid(process, base, lambda x: -p.lam * reward(x, None).double(), n=N_GRID)
    value = optimum.expected_cost(_start(process))
    policy = GridPolicy(base, process, optimum)
    j, se = soc_cost(process, policy, reward, p.lam, 1 << 14, torch.Generator().manual_seed(0), sample_shape=(2,))
    assert abs(j - value) < 4 * se, (j, value, se)
    with policy.base():
        j_base, se_base = soc_cost(process, policy, reward, p.lam, 1 << 14, torch.Generator().manual_seed(0),
                                   sample_shape=(2,))
    assert j_base > value + 4 * se_base, (j_base, value)


def test_diagnosis_prefers_the_k_step_optimum() -> None:
    """An out-of-bounds run is 'discretisation' when the K-step optimum misses the bounds too, else
    'optimisation' / 'flat cost' by its J against the optimum's; the table counts runs and optima
    within on the problems that have the DP and names the schedule each pair ran with; a re-measured
    row supersedes; an 8-D problem or a multistep chain is refused."""
    row = {"problem": "p00", "solver": "nabla-db", "process": "ddpm", "seed": 0, "K": 25, "weights": [0.5, 0.5],
           "exact_weights": [0.4, 0.6], "kstep_weights": [0.41, 0.59], "weight_err": 0.1, "sw": 0.5, "sw_bound": 0.3,
           "gap": 0.2, "gap_se": 0.01, "kstep_weight_err": 0.01, "within": False, "j": 0.1, "j_se": 0.01}
    dp = {"dp_j": -0.1, "dp_j_se": 0.01, "dp_within": True, "dp_weights": [0.42, 0.58], "dp_weight_err": 0.02,
          "dp_sw": 0.2}
    assert ground_truth.diagnosis(row, None, dp).startswith("optimisation")
    assert ground_truth.diagnosis(row, None, dict(dp, dp_j=0.09)).startswith("flat cost")
    assert ground_truth.diagnosis(row, None, dict(dp, dp_within=False)).startswith("discretisation")
    dps = {("p00", "ddpm", 25): dict(dp, dp_within=False)}
    assert "— discretisation" in ground_truth.out_of_bounds([row], {}, dps)
    assert ground_truth.diagnosis_counts([row], {}, dps) == {"discretisation": 1}
    assert ground_truth.summary_table([row], None, dps).rstrip().endswith("| 0/1 / 0/1 | +0.200 |")
    # the table names each pair's recorded schedule; a re-measured row supersedes the earlier one
    # and the iterations per problem size
    rerun = dict(row, within=True, train_config={"lr": 0.01, "lr_schedule": "cosine"}, dim=2, budget={"iters": 300})
    assert ground_truth.latest([row, rerun]) == [rerun]
    assert "| nabla-db | ddpm | 25 | 0.01 cosine | 2-D 300 | 1 | 1/1 (100%) |" in ground_truth.summary_table([rerun])
    eight = [dict(rerun, problem=f"p0{i}", dim=8, budget={"iters": n}) for i, n in ((1, 300), (3, 1200))]
    assert "| 2-D 300, 8-D 300/1200 | 3 |" in ground_truth.summary_table([rerun, *eight])
    # a row of another K has no reference
    assert ground_truth.summary_table([dict(row, K=50)], None, dps).rstrip().endswith("| – | – |")
    with pytest.raises(SoctuneError, match="2-D"):
        ground_truth.grid_reference(random_tilt_problem(1), "ddpm")
    with pytest.raises(SoctuneError, match="multistep"):
        ground_truth.grid_reference(random_tilt_problem(0), "dpmpp-sde-order2")
