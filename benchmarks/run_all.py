"""One command for the whole benchmark suite: quality (2-D mixture + digits), iteration cost and
peak memory, the OpenMP settings on a shared machine, fp32 vs bf16, the SD1.5-scale networks;
then benchmarks/RESULTS.md and the PNG plots.

    python benchmarks/run_all.py            # full: ≈ 1.5 h on 2 cores at one thread (scale ≈ 40 min)
    python benchmarks/run_all.py --only scale report   # one stage, then the report
    python benchmarks/run_all.py --quick    # smoke version: ≈ 5 min, tiny budgets, one seed
    python benchmarks/run_all.py --only report     # re-render RESULTS.md from results/*.jsonl

Each stage runs in its own subprocess with OMP_NUM_THREADS=1 (the threads stage removes it for the
commands it measures: the OpenMP settings are what it compares) and appends to results/*.jsonl;
a stage's previous results are cleared first unless --keep is given (then finished rows are
skipped, so an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("gmm", "digits", "pairs", "time", "memory", "threads", "precision", "scale", "report")


def plan(quick: bool) -> dict[str, list[str]]:
    if quick:
        return {
            "gmm": ["quality.py", "--problem", "gmm", "--seeds", "0", "--iters", "10", "--batch", "32",
                    "--n-eval", "512", "--n-base", "1024"],
            "digits": ["quality.py", "--problem", "digits", "--seeds", "0", "--iters", "2", "--batch", "8",
                       "--steps", "10", "--n-eval", "64", "--n-base", "256"],
            "pairs": ["pairs.py", "--processes", "fm-memoryless", "--solvers", "draft"],
            "time": ["cost.py", "--mode", "time", "--steps", "10", "--batch", "8", "--repeats", "2"],
            "memory": ["cost.py", "--mode", "memory-all", "--batch", "8", "--k-list", "10", "100"],
            "threads": ["threads.py", "--iters", "1", "--repeats", "3", "--settings", "cli-default", "active",
                        "--timeout", "120"],
            "precision": ["precision.py", "--iters", "1", "--problems", "digits-am"],
            "scale": ["scale.py", "--latent", "8", "--steps", "4", "--methods", "DRaFT-1", "--precisions", "fp32",
                      "--ckpt-modes", "on", "--k-list", "--repeats", "1"],
        }
    return {
        "gmm": ["quality.py", "--problem", "gmm", "--seeds", "0", "1", "2", "--iters", "50", "--batch", "64",
                "--steps", "20", "--n-eval", "2048", "--n-base", "4096", "--extra-budget"],
        "digits": ["quality.py", "--problem", "digits", "--seeds", "0", "1", "--iters", "24", "--batch", "16",
                   "--steps", "10", "--n-eval", "256", "--n-base", "2048"],
        # every process × solver with nothing but the defaults, as a newcomer runs it (≈ 45 min)
        "pairs": ["pairs.py"],
        "time": ["cost.py", "--mode", "time", "--steps", "25", "--batch", "16", "--repeats", "4"],
        "memory": ["cost.py", "--mode", "memory-all", "--batch", "16", "--k-list", "10", "25", "50", "100"],
        # every OpenMP setting idle and next to a busy neighbour, 2 iterations each (≈ 5–10 min:
        # spinning settings with a busy neighbour are the slow part, capped by --timeout)
        "threads": ["threads.py", "--iters", "4", "--repeats", "5", "--timeout", "150", "--settings", "cli-default",
                    "runtime-default", "active", "passive", "threads-1", "spin-1e3", "spin-1e4"],
        "precision": ["precision.py", "--iters", "3"],
        # SD1.5's real networks (random weights) at 16×16 latents: ≈ 40 min on 2 cores
        "scale": ["scale.py", "--arch", "sd15", "--latent", "16", "--batch", "1", "--steps", "10", "--k-list", "10",
                  "50", "--k-latent", "8", "--repeats", "1"],
    }


RESULT_FILES = {"gmm": ["quality_gmm.jsonl"], "digits": ["quality_digits.jsonl"], "pairs": ["pairs.jsonl"],
                "time": ["cost_time.jsonl"],
                "memory": ["cost_memory.jsonl"], "threads": ["threads.jsonl"],
                "precision": ["precision.jsonl"], "scale": ["scale.jsonl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets (≈ 5 min): checks the pipeline, numbers are not meaningful")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    ap.add_argument("--keep", action="store_true", help="keep earlier results and skip finished rows")
    args = ap.parse_args()
    stages = args.only or list(STAGES)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    commands = plan(args.quick)
    t_all = time.perf_counter()
    for stage in stages:
        if stage == "report":
            continue
        if not args.keep:
            for name in RESULT_FILES[stage]:
                (HERE / "results" / name).unlink(missing_ok=True)
        t = time.perf_counter()
        print(f"== {stage}: {' '.join(commands[stage])}", flush=True)
        rc = subprocess.run([sys.executable, *commands[stage]], cwd=HERE, env=env).returncode
        print(f"== {stage} finished in {time.perf_counter() - t:.0f}s (exit {rc})", flush=True)
    subprocess.run([sys.executable, "report.py"], cwd=HERE, env=env, check=True)
    print(f"total {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
