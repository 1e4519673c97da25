"""How much of adjoint-matching's score target is noise, per step, with and without its control variates.

    python benchmarks/score_baseline.py --problem 20 --process fm-memoryless     # ≈ 3 min at one thread
    python benchmarks/score_baseline.py --problem 9 --process fm-memoryless

On one of benchmarks/ground_truth.py's random mixtures, rolled out under a near-optimal control of the
K-step chain (2-D: the grid DP's optimum, grid_optimum.py; 8-D: the exact-tilt control, ground_truth.
TiltModel), per stochastic step k: the control's mean square E‖u_k‖² (what the regression must find)
against the second moment of the score target −(C_{k+1} − b)ξ_k (soctune.solvers.adjoint_matching,
``AdjointMatching.score_pass``): plain (``cost_to_go="quadratic"``, ``baseline="mean"``), with either
control variate alone (``cost_to_go="log-ratio"``; ``baseline="state"``) and with both (the default).
Averaged over ``--batches`` batches of the training batch size. All four targets have the same
conditional mean, so the ratio of two second moments is the batch-size factor between them at that step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import ground_truth as gt  # noqa: E402
from grid_optimum import GridPolicy, solve_grid  # noqa: E402
from soctune.models.gmm_problems import random_tilt_problem  # noqa: E402
from soctune.solvers.adjoint_matching import AdjointMatching  # noqa: E402
from soctune.solvers.base import FinetuneContext  # noqa: E402
from soctune.trajectory import rollout  # noqa: E402


#: name -> (cost_to_go, baseline) of AdjointMatching
VARIANTS = {"plain": ("quadratic", "mean"), "log-ratio": ("log-ratio", "mean"), "state": ("quadratic", "state"),
            "both": ("log-ratio", "state")}


@torch.no_grad()
def target_moments(problem_index: int, process_name: str, batches: int = 8,
                   batch_size: int | None = None) -> list[dict[str, float]]:
    """One row per stochastic step: step, E‖u_k‖² of the reference control, and E‖target‖² of each of
    :data:`VARIANTS` (batch means, averaged over ``batches`` rollouts of ``batch_size``, by default the
    benchmark's for the problem's size)."""
    p = random_tilt_problem(problem_index)
    batch_size = batch_size or gt.budget_for(p.dim)["batch_size"]
    process = gt.make_process(process_name)
    base, reward = gt.base_model(p, process_name, process), p.reward()
    if p.dim == 2:
        model = GridPolicy(base, process, solve_grid(process, base, lambda x: -p.lam * reward(x, None).double(),
                                                     n=gt.GRID_N))
    else:
        model = gt.TiltModel(p, process_name, process, cut=0.9)
    solvers = {name: AdjointMatching(reward_scale=p.lam, estimator="score", cost_to_go=c, baseline=b)
               for name, (c, b) in VARIANTS.items()}
    sums: dict[int, dict[str, float]] = {}
    for rep in range(batches):
        gen = torch.Generator().manual_seed(rep)
        ctx = FinetuneContext(process=process, model=model, reward=reward, sample_shape=(p.dim,),
                              batch_size=batch_size, generator=gen)
        traj = rollout(process, model, batch_size=batch_size, sample_shape=(p.dim,), generator=gen)
        passes = {b: s.score_pass(ctx, traj) for b, s in solvers.items()}
        base_means = passes["plain"].base_means
        for k in traj.stochastic_steps():
            s = traj.stds[k]
            row = sums.setdefault(k, dict.fromkeys(("u2", *VARIANTS), 0.0))
            # u_k from the rollout's recorded mean, as the solver's own step costs take it
            row["u2"] += float(((traj.means[k] - base_means[k]) / s).pow(2).sum(1).mean()) / batches
            for b, sweep in passes.items():
                row[b] += float((s * sweep.adjoints[k + 1]).pow(2).sum(1).mean()) / batches
    return [{"step": k, **v} for k, v in sorted(sums.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", type=int, default=20)
    ap.add_argument("--process", default="fm-memoryless", choices=sorted(gt.PROCESS_SPECS))
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = target_moments(args.problem, args.process, args.batches)
    print(f"problem {args.problem}, {args.process}: E‖u‖² and E‖target‖² per stochastic step")
    print("| step | E‖u‖² | E‖target‖²: plain | log-ratio cost-to-go | state baseline | both (default) | plain / both |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['u2']:.3f} | " + " | ".join(f"{r[v]:.3f}" for v in VARIANTS)
              + f" | {r['plain'] / r['both']:.1f} |")
    print(json.dumps({"problem": args.problem, "process": args.process, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
