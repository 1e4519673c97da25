"""Data-parallel training (soctune.trainer on accelerate, soctune.distributed): 2 gloo processes
with global batch B take the same update as 1 process with batch B, and the LoRA rank 0 saves loads into the base model.

Why the comparison can be (nearly) exact: every rank draws the prior and step noise of the
whole global batch from one identically seeded generator and keeps its rows, so the 2-rank run
rolls out exactly the 1-rank run's trajectories, and every other random choice (the loss steps
of Adjoint Matching) is drawn identically on all ranks. The loss is a mean over samples, so the
average of the two ranks' gradients is the 1-rank gradient up to float32 summation order
(measured: max |Δg| = 1.1e-6 · max |g|; we allow 1e-5). AdamW's first step is
lr·g/(|g| + ε), which hides gradient differences, so the gradient itself is compared through
Adam's first moment (exp_avg = (1 − β₁)·g after one step) as well as the weights.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import needs_assets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


B = 4  # global batch
CFG_SETS = {"process": {"name": "fm-memoryless", "num_steps": 4},
            "solver": {"name": "adjoint-matching"},
            "train": {"batch_size": B, "iters": 1, "lr": 1e-3, "seed": 3}}


def _cfg() -> dict:
    from soctune import config as cfgmod

    return cfgmod.validate(cfgmod.merge(cfgmod.defaults(), CFG_SETS))


def _one_iteration(out: Path, grad_accum: int = 1) -> dict:
    """Build the digits run, take one training iteration; return weights before/after, Adam's
    first moments and metrics (keys: trainable names). Under a multi-process launch (the
    environment of ``_worker``) accelerate joins the gloo group when the trainer is made."""
    from soctune import Trainer
    from soctune.run import build, train_config
    from soctune.trainer import make_accelerator

    cfg = _cfg()
    acc = make_accelerator("cpu", "fp32")
    torch.manual_seed(cfg["train"]["seed"])
    b = build(cfg, acc.device)
    tc = train_config(cfg)
    tc.grad_accum = grad_accum
    ft = Trainer(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape), tc, accelerator=acc)
    named = ft._named_trainable()
    before = {n: p.detach().clone() for n, p in named}
    metrics = ft.train_iteration()
    after = {n: p.detach().clone() for n, p in named}
    state = ft.optimizer.state
    moments = {n: state[p]["exp_avg"].clone() for n, p in named if p in state}
    if ft.is_main:
        b.loaded.save_lora(out / "lora")
    return {"before": before, "after": after, "exp_avg": moments, "metrics": metrics}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    res = _one_iteration(Path(out))
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_must_split_evenly_over_processes_and_micro_batches():
    from soctune import Trainer
    from soctune.config import TrainConfig
    from soctune.models.base import CorrectedDenoiser, ZeroDenoiser
    from soctune.registry import SoctuneError
    from soctune.rewards.base import LinearReward
    from soctune.sde import get_process

    proc = get_process("euler-maruyama", num_steps=3)
    with pytest.raises(SoctuneError, match="divisible by processes × grad_accum = 1 × 3"):
        Trainer(proc, CorrectedDenoiser(ZeroDenoiser(), dim=2), _am(), LinearReward([1.0, 0.0]),
                (2,), TrainConfig(batch_size=8, grad_accum=3, device="cpu"))


def _am():
    from soctune.solvers import get_solver

    return get_solver("adjoint-matching")


@needs_assets
def test_gradient_accumulation_takes_the_one_batch_update(tmp_path):
    """grad_accum = 2 rolls out the same trajectories in two micro-batches (each draws the
    global batch's noise and keeps its rows, the same way processes do) and sums their
    gradients: the update equals one batch's to float32 summation order (the same bounds as
    the 2-process test below)."""
    torch.set_num_threads(1)
    one = _one_iteration(tmp_path / "one")
    two = _one_iteration(tmp_path / "two", grad_accum=2)
    g1 = torch.cat([v.flatten() for v in one["exp_avg"].values()])
    g2 = torch.cat([two["exp_avg"][n].flatten() for n in one["exp_avg"]])
    assert g1.abs().max() > 0
    assert (g2 - g1).abs().max() <= 1e-5 * g1.abs().max(), float((g2 - g1).abs().max() / g1.abs().max())
    for key in ("loss", "reward_mean", "grad_norm"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key


def test_sharded_rollout_reproduces_the_global_batch_rows():
    """rollout inside batch_shard(start, stop, B) returns rows [start, stop) of the B-sample rollout."""
    from soctune.distributed import batch_shard
    from soctune.models.base import CorrectedDenoiser, ZeroDenoiser
    from soctune.sde import get_process
    from soctune.trajectory import rollout

    proc = get_process("euler-maruyama", num_steps=5)
    model = CorrectedDenoiser(ZeroDenoiser(), dim=2)
    full = rollout(proc, model, batch_size=6, sample_shape=(2,), generator=torch.Generator().manual_seed(0))
    parts = []
    for start in (0, 3):
        with batch_shard(start, start + 3, 6):
            parts.append(rollout(proc, model, batch_size=3, sample_shape=(2,),
                                 generator=torch.Generator().manual_seed(0)).xs)
    assert torch.equal(torch.cat(parts, dim=1), full.xs)


@pytest.mark.slow  # ~30 s alone, ~65 s on the loaded 2-core machine (two spawned interpreters)
@needs_assets
def test_two_gloo_ranks_match_one_process_and_save_a_loadable_lora(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    single = _one_iteration(tmp_path / "single")
    dp_dir = tmp_path / "dp"
    dp_dir.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(dp_dir)), nprocs=2, join=True)
    r0, r1 = (torch.load(dp_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # identical init on every rank, and the ranks end identical (averaged gradients)
    for n in single["before"]:
        assert torch.equal(r0["before"][n], single["before"][n])
        assert torch.equal(r0["after"][n], r1["after"][n])
    g1 = torch.cat([v.flatten() for v in single["exp_avg"].values()])
    g2 = torch.cat([r0["exp_avg"][n].flatten() for n in single["exp_avg"]])
    assert g1.abs().max() > 0
    assert (g2 - g1).abs().max() <= 1e-5 * g1.abs().max(), float((g2 - g1).abs().max() / g1.abs().max())
    # AdamW's first step is w −= lr·g/(|g| + ε): its sensitivity to g is lr·ε/(|g| + ε)², up to
    # lr/ε = 1e5 at g ≈ 0, so summation noise δg ~ 1e-10 on near-zero gradient entries moves w by
    # ~1e-5 (measured: 1.8e-5 overall). Where |g| > 1e-6 the sensitivity is ≤ lr·ε/|g|² = 10 and
    # the update agrees to ≤ 1e-6 (measured 7e-8); overall it is bounded by lr·max|δg|/ε (1.8e-2).
    lr, eps = CFG_SETS["train"]["lr"], 1e-8
    g_single = {n: v / 0.1 for n, v in single["exp_avg"].items()}  # exp_avg = (1 − β₁)·g
    dg_max = float((g2 - g1).abs().max()) / 0.1
    upd = max(float((single["after"][n] - single["before"][n]).abs().max()) for n in single["after"])
    assert upd > 1e-4  # a real update happened (≈ lr)
    for n in single["after"]:
        dw = (r0["after"][n] - single["after"][n]).abs()
        big = g_single[n].abs() > 1e-6 if n in g_single else torch.zeros_like(dw, dtype=torch.bool)
        assert (float(dw[big].max()) if bool(big.any()) else 0.0) <= 1e-6, n
        assert float(dw.max()) <= lr * dg_max / eps + 1e-7, n
    # metrics of the global batch: loss and reward mean as the single process's
    # (reward_std is not compared: Adjoint Matching logs the unbiased std of the batch, while the
    # ranks' stds are combined as population stds)
    for key in ("loss", "reward_mean", "grad_norm"):
        assert r0["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-6), key

    # the saved LoRA has no wrapper prefix and loads into the base digits model through soctune
    from safetensors import safe_open

    from soctune.models.diffusers_model import load_model

    with safe_open(str(dp_dir / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("module.") or ".module." in k for k in keys)
    loaded = load_model("digits-flow", lora_rank=0)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        y_base = loaded.model(x, t, None)
        loaded.load_lora(dp_dir / "lora")
        y_lora = loaded.model(x, t, None)
    # the update moves outputs by ~1e-3 (lr 1e-3 on the zero-initialised LoRA B matrices)
    assert (y_lora - y_base).abs().max() > 1e-5


@pytest.mark.slow
@needs_assets
def test_torchrun_cli_two_ranks(tmp_path):
    """`torchrun --nproc-per-node 2 --no-python soctune finetune` trains, rank 0 writes one run."""
    import json

    exe = shutil.which("soctune")
    torchrun = shutil.which("torchrun")
    if exe is None or torchrun is None:
        pytest.skip("soctune / torchrun console scripts not installed")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "--no-python", exe, "finetune",
           "--iters", "2", "--batch-size", "4", "--num-steps", "4", "--set", "eval.n_samples=4",
           "--checkpoint-every", "1", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert proc.stdout.count("wrote") == 1  # only rank 0 reports
    # resume under torchrun: rank 0 reads the checkpoint, broadcasts it, one more iteration
    cmd[cmd.index("--iters") + 1] = "3"
    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [0, 1, 2]
