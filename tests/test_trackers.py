"""Experiment trackers through accelerate (``--log tensorboard|wandb``); metrics.jsonl is
always written. wandb runs offline unless the user sets WANDB_MODE (this machine, like many
clusters' compute nodes, has no route to a tracking server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_model_for
from soctune import finetune
from soctune.rewards.base import LinearReward
from soctune.sde import get_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _run(out: Path, log: str):
    proc = get_process("fm-memoryless", num_steps=4)
    return finetune(model=tiny_model_for(proc), process=proc, solver="adjoint-matching",
                    reward=LinearReward([1.0, 0.0]), sample_shape=(2,), iters=2, batch_size=8, device="cpu",
                    out=out, log=log, checkpoint_every=1)


def test_tensorboard_writes_event_files_with_the_metrics(tmp_path):
    pytest.importorskip("tensorboardX")
    torch.set_num_threads(1)
    run = _run(tmp_path / "run", "tensorboard")
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in (tmp_path / "run").rglob("*"))
    blob = b"".join(p.read_bytes() for p in events)
    assert b"reward_mean" in blob and b"loss" in blob
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [0, 1] and len(run.metrics) == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        ["ckpt-000001.safetensors", "ckpt-000002.safetensors"]


def test_wandb_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    _run(tmp_path / "run", "wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert list(runs[0].glob("*.wandb"))


def test_a_tracker_needs_an_output_folder():
    from soctune.registry import SoctuneError

    proc = get_process("fm-memoryless", num_steps=4)
    with pytest.raises(SoctuneError, match="writes under the output folder"):
        finetune(model=tiny_model_for(proc), process=proc, solver="adjoint-matching",
                 reward=LinearReward([1.0, 0.0]), sample_shape=(2,), iters=1, batch_size=8, log="tensorboard")


def test_resume_from_the_python_entry_point(tmp_path):
    """``soctune.finetune(..., out=, resume=True)`` continues a run exactly like the CLI: 2
    iterations then 2 more equal 4 in one go."""
    torch.set_num_threads(1)
    proc = get_process("fm-memoryless", num_steps=4)

    def go(out: Path, iters: int, resume: bool = False):
        torch.manual_seed(0)
        return finetune(model=tiny_model_for(proc), process=proc, solver="adjoint-matching",
                        reward=LinearReward([1.0, 0.0]), sample_shape=(2,), iters=iters, batch_size=8, device="cpu",
                        out=out, resume=resume, checkpoint_every=1)

    ref = go(tmp_path / "ref", 4)
    go(tmp_path / "run", 2)
    run = go(tmp_path / "run", 4, resume=True)
    for (n, a), (_, b) in zip(ref.trainer._named_trainable(), run.trainer._named_trainable()):
        assert torch.equal(a, b), n
    strip = lambda h: [{k: v for k, v in m.items() if k != "time"} for m in h]  # noqa: E731
    assert strip(ref.metrics) == strip(run.metrics)
    folder = run.save_lora(tmp_path / "adapter")
    assert (folder / "adapter.safetensors").is_file()
