"""GPU checks (marked ``gpu``: skipped where torch sees no CUDA device; run on a GPU machine by
benchmarks/gpu_check.sh, which also prints their table).

* every solver × process pair on the shipped digits models, 2 iterations on CUDA in bf16 and
  in fp16 (accelerate's gradient scaler): finite losses, LoRA and Adam state float32, every
  tensor on the GPU, one optimiser step per update;
* a 2-GPU data-parallel run (``accelerate launch --multi_gpu``, nccl) equals one process
  (skipped with fewer than 2 GPUs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import needs_assets

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

PROCESSES = ["ddpm", "dpmpp-sde", "fm-memoryless"]
SOLVERS = {"adjoint-matching": {}, "nabla-db": {}, "draft": {"k": 1}, "ddpo": {"inner_epochs": 2, "minibatches": 2},
           "db": {}}
#: where benchmarks/gpu_check.sh collects one JSON line per pair
REPORT = os.environ.get("SOCTUNE_GPU_REPORT")


def _report(row: dict) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps(row) + "\n")


@needs_assets
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_pair_trains_on_cuda(solver: str, process: str, precision: str) -> None:
    import time

    from soctune import TrainConfig, Trainer
    from soctune.config import defaults, merge, validate
    from soctune.registry import SoctuneError
    from soctune.run import build
    from soctune.trainer import make_accelerator

    cfg = validate(merge(defaults(), {"process": {"name": process, "num_steps": 10},
                                      "solver": {"name": solver, **SOLVERS[solver]},
                                      "train": {"device": "cuda", "precision": precision}}))
    acc = make_accelerator("cuda", precision)
    torch.manual_seed(0)
    try:
        b = build(cfg, acc.device)
        tc = TrainConfig(iters=2, batch_size=16, device="cuda", precision=precision)
        trainer = Trainer(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape), tc,
                          accelerator=acc)
    except SoctuneError as exc:  # a pair the solver refuses (same refusals as on the CPU)
        _report({"solver": solver, "process": process, "precision": precision, "refused": str(exc)})
        pytest.skip(f"refused: {exc}")
    steps = {"n": 0}
    trainer.optimizer.optimizer.register_step_post_hook(lambda *a: steps.__setitem__("n", steps["n"] + 1))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    history = trainer.train()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    updates = sum(h["updates"] for h in history)
    overflow = sum(h.get("skipped_overflow", 0.0) for h in history)
    assert all(math.isfinite(h["loss"]) for h in history), history
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in trainer.parameters())
    for st in trainer.optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                assert v.device.type == "cuda" and v.dtype == torch.float32, k
    # fp16: a step the scaler skips on overflow is a real call that did not update
    assert steps["n"] == updates - overflow, (steps, updates, overflow)
    x = trainer.sample(8)
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    _report({"solver": solver, "process": process, "precision": precision, "s_per_iter": wall / len(history),
             "updates": updates, "fp16_overflow_skips": overflow, "reward_first": history[0].get("reward_mean"),
             "reward_last": history[-1].get("reward_mean"),
             "peak_mb": torch.cuda.max_memory_allocated() / 2**20})


def _launch(args: list[str], out: Path, nproc: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    exe = shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate's launcher is not installed")
    cmd = [exe, "launch", "--num_processes", str(nproc), *extra, "-m", "soctune_cli.app", "finetune", *args,
           "--out", str(out), "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@needs_assets
def test_two_gpus_data_parallel_equals_one(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    args = ["--process", "fm-memoryless", "--solver", "adjoint-matching", "--iters", "1", "--batch-size", "8",
            "--num-steps", "6", "--device", "cuda", "--set", "eval.n_samples=8"]
    one = _launch(args, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(args, tmp_path / "two", 2, ["--multi_gpu"])
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "reward_mean", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-5), key
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2

