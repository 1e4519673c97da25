"""Quality benchmark: every method on one problem over several seeds with the same budget of
scored trajectories; appends one JSON line per (method, seed) to results/quality_<problem>.jsonl
(rows already present are skipped, so an interrupted run continues).

    python benchmarks/quality.py --problem gmm --seeds 0 1 2 --iters 60 --batch 64
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import (EXTRA_BUDGET, LAM, METHODS, PLAIN_WEIGHTS, RESULTS, CountingReward, append_jsonl, digits_problem, gmm_problem,
                    metrics_of, quiet, read_jsonl, reference, sample)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problem", choices=("gmm", "digits"), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25, help="process steps K")
    ap.add_argument("--n-eval", type=int, default=2048)
    ap.add_argument("--n-base", type=int, default=8192, help="base samples for the reference sets")
    ap.add_argument("--extra-budget", action="store_true", help="also run AM/∇-DB with plain per-step weights (all seeds) and the gradient-free baselines with ×5 budget (seed 0)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    quiet()
    from soctune import TrainConfig, Trainer
    from soctune.solvers import get_solver

    problem = gmm_problem(args.steps) if args.problem == "gmm" else digits_problem(args.steps)
    out = RESULTS / f"quality_{args.problem}{args.tag}.jsonl"
    done = {(r["method"], r["seed"]) for r in read_jsonl(out) if "method" in r}

    t0 = time.perf_counter()
    ref = reference(problem, args.n_base)
    ref_time = time.perf_counter() - t0
    meta = {"kind": "meta", "problem": args.problem, "iters": args.iters, "batch": args.batch, "steps": args.steps,
            "n_eval": args.n_eval, "n_base": args.n_base, "budget": args.iters * args.batch, "ref_seconds": ref_time}
    rows_ref: list[dict[str, Any]] = []
    if ("base", -1) not in done:
        base_x = ref["base_x"][: args.n_eval]
        rows_ref.append({"method": "base", "seed": -1, **metrics_of(problem, base_x, ref)})
        if problem.name == "gmm":
            rows_ref.append({"method": "exact target", "seed": -1, **metrics_of(problem, ref["target_x"][: args.n_eval], ref)})
        else:
            meta["acceptance"] = ref["acceptance"]
            meta["n_reference"] = int(len(ref["ref_idx"]))
            rows_ref.append({"method": "exact target", "seed": -1, "n": int(len(ref["target_idx"])),
                             **metrics_of(problem, ref["base_x"][ref["target_idx"]], ref)})
        for r in [meta, *rows_ref]:
            append_jsonl(out, {"problem": args.problem, **r})

    plan = [(m, s) for s in args.seeds for m in METHODS]
    if args.extra_budget:
        plan += [(m, s) for s in args.seeds for m in PLAIN_WEIGHTS]
        plan += [(m, args.seeds[0]) for m in EXTRA_BUDGET]
    for method, seed in plan:
        if (method.label, seed) in done:
            continue
        model = problem.make_model(seed)
        reward = CountingReward(problem.reward)
        solver = get_solver(method.solver, reward_scale=LAM, **method.options)
        iters = args.iters * method.budget_mult
        cfg = TrainConfig(iters=iters, batch_size=args.batch, lr=method.lr, seed=seed)
        row: dict[str, Any] = {"problem": args.problem, "method": method.label, "family": method.family, "seed": seed,
                               "iters": iters, "batch": args.batch, "budget": iters * args.batch}
        t = time.perf_counter()
        try:
            ft = Trainer(problem.process, model, solver, reward, problem.sample_shape, cfg)
            ft.train()
            row["train_seconds"] = time.perf_counter() - t
            row["reward_evals"] = reward.rows
            row["nonfinite_skips"] = sum(int(h.get("skipped_nonfinite", 0)) for h in ft.history)
            x = sample(problem, model, args.n_eval, seed=10_000 + seed, base=False)
            row.update(metrics_of(problem, x, ref))
        except Exception as exc:  # noqa: BLE001 — a failing method is a result too; record it and go on
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            row["train_seconds"] = time.perf_counter() - t
        append_jsonl(out, row)
        print(f"[{args.problem}] {method.label:18s} seed {seed}: "
              + (row.get("error") or f"reward {row['reward']:.3f} div {row['diversity']:.3f} fid {row['fidelity']:.3f} "
                                     f"({row['train_seconds']:.0f}s)"), flush=True)


if __name__ == "__main__":
    main()
