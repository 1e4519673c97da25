"""fp32 vs bf16 on the CPU: wall time per training iteration and peak extra memory of an
iteration, for the digits defaults (fm-memoryless + adjoint-matching, ddpm + nabla-db, their
shipped presets) and the tiny Stable-Diffusion-style pipeline the tests build (latent UNet with
cross-attention, VAE decode inside the reward).

Each (problem, precision) runs in a fresh process: one warm-up iteration, then ``--iters``
timed ones (median s/iter); peak extra resident memory of one iteration over the memory after
the warm-up (RSS sampled every 0.5 ms, freed heap returned to the OS first). Appends to
results/precision.jsonl.

    OMP_NUM_THREADS=1 python benchmarks/precision.py            # all problems, fp32 and bf16
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, PeakRSS, append_jsonl

PROBLEMS = ("digits-am", "digits-ndb", "tiny-sd-am")
OUT = RESULTS / "precision.jsonl"


def _trainer(problem: str, precision: str, batch: int):
    import torch

    from soctune import Trainer
    from soctune.config import resolve
    from soctune.run import build, train_config
    from soctune.trainer import make_accelerator

    if problem.startswith("digits"):
        pair = {"digits-am": ("fm-memoryless", "adjoint-matching"), "digits-ndb": ("ddpm", "nabla-db")}[problem]
        cfg = resolve(None, {"process.name": pair[0], "solver.name": pair[1], "train.batch_size": batch or None,
                             "train.precision": precision, "train.device": "cpu"})
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from test_diffusers_models import PROMPTS, build_sd

        folder = build_sd(Path(tempfile.mkdtemp()) / "sd")
        cfg = resolve({"model": {"path": str(folder), "prompts": PROMPTS, "lora_rank": 4},
                       "process": {"name": "ddpm", "num_steps": 10, "scheduler_config": {"timestep_spacing": "trailing"}},
                       "solver": {"name": "adjoint-matching", "num_loss_steps": 4}, "reward": "brightness"},
                      {"train.batch_size": batch, "train.precision": precision, "train.device": "cpu"})
    acc = make_accelerator("cpu", precision)
    torch.manual_seed(0)
    b = build(cfg, acc.device)
    tc = train_config(cfg)
    return cfg, Trainer(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape), tc,
                        cond_sampler=b.cond_sampler, accelerator=acc)


def one(problem: str, precision: str, iters: int, batch: int) -> None:
    cfg, trainer = _trainer(problem, precision, batch)
    batch = cfg["train"]["batch_size"]
    trainer.train_iteration()  # warm-up
    times = []
    libc = ctypes.CDLL("libc.so.6")
    for _ in range(iters):
        libc.malloc_trim(0)
        with PeakRSS() as rss:
            t = time.perf_counter()
            trainer.train_iteration()
            times.append(time.perf_counter() - t)
    row = {"problem": problem, "precision": precision, "batch": batch, "steps": cfg["process"]["num_steps"],
           "process": cfg["process"]["name"], "solver": cfg["solver"]["name"], "iters": iters,
           "s_per_iter": statistics.median(times), "peak_extra_mb": rss.delta_mb,
           "threads": os.environ.get("OMP_NUM_THREADS", "")}
    print(json.dumps(row))
    append_jsonl(OUT, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="0 = the preset's (digits) / 4 (tiny SD)")
    ap.add_argument("--one", nargs=2, metavar=("PROBLEM", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], args.one[1], args.iters, args.batch or (4 if args.one[0] == "tiny-sd-am" else 0))
        return
    for problem in args.problems:
        for precision in args.precisions:  # a fresh process each: peak memory and allocator state
            subprocess.run([sys.executable, __file__, "--one", problem, precision, "--iters", str(args.iters),
                            "--batch", str(args.batch)], check=True)


if __name__ == "__main__":
    main()
