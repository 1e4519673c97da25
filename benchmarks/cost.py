"""Cost benchmark on the shipped digits UNet (ancestral DDPM, LoRA r = 8).

``--mode time``: wall time of one fine-tuning iteration of every method as a ratio to one no-grad
rollout of the same process and batch. Measured side by side in one process: each repeat times,
for every method in turn, a rollout and then an iteration (interleaved, so load changes on a
shared machine hit both alike); the ratio is median(iteration) / median(rollout of that method's
repeats). Appends to results/cost_time.jsonl.

``--mode memory --steps K``: one fresh process per K (``--mode memory-all`` starts them); for each
method in turn, the peak extra resident memory of one iteration over the process's memory after
one no-grad rollout, with freed heap returned to the OS (``malloc_trim``) before each measurement;
RSS sampled every 0.5 ms. Appends to results/cost_memory.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from common import (COST_ONLY, LAM, METHODS, RESULTS, PeakRSS, append_jsonl, digits_problem, maxrss_mb,
                    method_by_label, quiet, sample)

MEMORY_METHODS = ["AM-lean", "AM-lean 10 loss steps", "nabla-DB 10%", "DRaFT-1", "DRaFT full (ckpt)"]


def _finetuner(problem: Any, label: str, batch: int, seed: int = 0) -> Any:
    from soctune import TrainConfig, Trainer
    from soctune.solvers import get_solver

    m = method_by_label(label)
    model = problem.make_model(seed)
    solver = get_solver(m.solver, reward_scale=LAM, **m.options)
    return Trainer(problem.process, model, solver, problem.reward, problem.sample_shape,
                     TrainConfig(iters=10**6, batch_size=batch, lr=m.lr, seed=seed))


def time_mode(args: argparse.Namespace) -> None:
    problem = digits_problem(args.steps)
    labels = [m.label for m in [*METHODS, *COST_ONLY]]
    fts = {}
    for label in labels:
        fts[label] = _finetuner(problem, label, args.batch)
        fts[label].train_iteration()  # warm-up: lazy init, allocator
    roll: dict[str, list[float]] = {lb: [] for lb in labels}
    it: dict[str, list[float]] = {lb: [] for lb in labels}
    for rep in range(args.repeats):
        for label in labels:
            ft = fts[label]
            t = time.perf_counter()
            sample(problem, ft.model, args.batch, seed=rep, base=False)
            roll[label].append(time.perf_counter() - t)
            t = time.perf_counter()
            ft.train_iteration()
            it[label].append(time.perf_counter() - t)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    all_roll = statistics.median([v for vs in roll.values() for v in vs])
    for label in labels:
        r_med, i_med = statistics.median(roll[label]), statistics.median(it[label])
        append_jsonl(RESULTS / "cost_time.jsonl", {
            "method": label, "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
            "rollout_median": r_med, "iteration_median": i_med, "ratio": i_med / r_med,
            "ratio_to_overall_rollout": i_med / all_roll, "iteration_all": it[label], "rollout_all": roll[label]})
        print(f"{label:18s} rollout {r_med:.3f}s iteration {i_med:.3f}s ratio {i_med / r_med:.2f}", flush=True)


def _trim() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so the next measurement's
    baseline is not inflated nor its peak hidden by memory the allocator kept."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: measurements stay valid per process, just less isolated
        pass


def memory_mode(args: argparse.Namespace) -> None:
    problem = digits_problem(args.steps)
    labels = args.methods or MEMORY_METHODS
    warm = _finetuner(problem, "DRaFT-1", args.batch)
    warm.train_iteration()  # first-iteration lazy initialisation outside every measurement
    del warm
    for label in labels:
        ft = _finetuner(problem, label, args.batch)
        sample(problem, ft.model, args.batch, seed=0, base=False)  # the rollout's own working set
        _trim()
        with PeakRSS() as roll_mem:
            sample(problem, ft.model, args.batch, seed=1, base=False)
        _trim()
        with PeakRSS() as mem:
            t = time.perf_counter()
            ft.train_iteration()
            dt = time.perf_counter() - t
        append_jsonl(RESULTS / "cost_memory.jsonl", {
            "method": label, "steps": args.steps, "batch": args.batch, "peak_delta_mb": mem.delta_mb,
            "rollout_delta_mb": roll_mem.delta_mb, "maxrss_mb": maxrss_mb(), "iteration_seconds": dt})
        print(f"{label:22s} K={args.steps:3d} peak +{mem.delta_mb:.1f} MB (rollout +{roll_mem.delta_mb:.1f} MB, "
              f"{dt:.1f}s)", flush=True)
        del ft
        _trim()


def memory_all(args: argparse.Namespace) -> None:
    """One fresh process per K (methods measured one after another inside it). glibc serves
    allocations ≥ 32 KB by mmap in these processes (``MALLOC_MMAP_THRESHOLD_``), so freed tensors
    leave the resident set at once and RSS tracks live memory instead of heap the allocator kept
    (with the default threshold, fragmentation added ≈ 1 MB per step to full DRaFT at batch 16)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MALLOC_MMAP_THRESHOLD_="32768")
    for steps in args.k_list:
        subprocess.run([sys.executable, __file__, "--mode", "memory", "--steps", str(steps), "--batch", str(args.batch)],
                       check=False, env=env, cwd=os.path.dirname(__file__))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("time", "memory", "memory-all"), required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="+", help="memory mode: labels to measure (default: the K-scaling set)")
    ap.add_argument("--k-list", type=int, nargs="+", default=[10, 25, 50, 100])
    args = ap.parse_args(argv)
    quiet()
    torch.manual_seed(0)
    {"time": time_mode, "memory": memory_mode, "memory-all": memory_all}[args.mode](args)


if __name__ == "__main__":
    main()
