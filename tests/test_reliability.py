"""Reliability: exact resume after SIGKILL, numerical guards, corrupt checkpoints, a full disk,
and one-line errors for bad input.

Exact resume: a `soctune finetune` subprocess is SIGKILLed after a checkpoint appears (it is
then inside a later iteration), resumed with --resume, and its final state (LoRA, the solver's
auxiliary networks such as ∇-DB's flow head, Adam moments, RNG) and metrics.jsonl are compared
with an uninterrupted run of the same config: both are deterministic on the CPU at one thread,
so they agree to float equality (the metrics lines compare with ==); the issue's bound on the
weights is max |Δw| ≤ 1e-6.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from soctune.registry import SoctuneError
from helpers import needs_assets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()


ITERS = 4
TINY = ["--iters", str(ITERS), "--batch-size", "4", "--num-steps", "4", "--set", "eval.n_samples=4",
        "--set", "eval.grid=4", "--checkpoint-every", "1", "--seed", "0", "--quiet"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _soctune() -> list[str]:
    exe = shutil.which("soctune")
    return [exe] if exe else [sys.executable, "-m", "soctune_cli.app"]


def _metrics(out: Path) -> list[dict]:
    """metrics.jsonl records without the wall time."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in recs]


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the final checkpoint (trainable weights, solver networks, Adam moments) and
    of the saved LoRA file, by a flat key."""
    from safetensors.torch import load_file

    from soctune.io import load_state

    ck = load_state(out / "checkpoints" / f"ckpt-{ITERS:06d}.safetensors")
    flat = {f"trainable/{k}": v for k, v in ck["trainable"].items()}
    flat.update({f"solver/{k}": v for k, v in ck["solver"].items()})
    for pid, st in ck["optimizer"]["state"].items():
        flat.update({f"adam/{pid}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    flat["generator"] = ck["generator"].float()
    flat.update({f"lora/{k}": v for k, v in load_file(out / "lora" / "pytorch_lora_weights.safetensors").items()})
    return flat


def _kill_resume_matches_uninterrupted(tmp_path: Path, solver: str) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ["finetune", "--solver", solver, *TINY]
    # the uninterrupted reference in this process (saves a start-up; one thread like the subprocesses)
    torch.set_num_threads(1)
    res = runner.invoke(_app(), [*args, "--out", str(ref)])
    assert res.exit_code == 0, (res.output, res.exception)

    # SIGKILL as soon as the 2nd checkpoint exists: the run is then inside iteration 2 (or
    # writing the metrics line/checkpoint of it)
    proc = subprocess.Popen([*_soctune(), *args, "--out", str(run)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = run / "checkpoints" / "ckpt-000002.safetensors"
    t0 = time.monotonic()
    while not target.exists() and proc.poll() is None and time.monotonic() - t0 < 600:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "summary.json").exists()
    res = subprocess.run([*_soctune(), *args, "--out", str(run), "--resume"], env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]

    a, b = _final_state(ref), _final_state(run)
    assert a.keys() == b.keys()
    if solver == "nabla-db":  # the flow head g_φ is part of the state
        assert any(k.startswith("solver/flow.") for k in a)
    dmax = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert dmax <= 1e-6, dmax
    ma, mb = _metrics(ref), _metrics(run)
    assert [m["iteration"] for m in mb] == list(range(ITERS))  # none duplicated, none lost
    assert ma == mb


@pytest.mark.slow
@needs_assets
def test_sigkill_and_resume_equals_uninterrupted_adjoint_matching(tmp_path):
    _kill_resume_matches_uninterrupted(tmp_path, "adjoint-matching")


@pytest.mark.slow
@needs_assets
def test_sigkill_and_resume_equals_uninterrupted_nabla_db(tmp_path):
    _kill_resume_matches_uninterrupted(tmp_path, "nabla-db")


@needs_assets
@pytest.mark.parametrize("solver", ["adjoint-matching", "nabla-db", "ddpo"])
def test_checkpoint_holds_everything_for_exact_resume(tmp_path, solver):
    """Library level (the default tier's fast version of the SIGKILL test): 3 iterations in one
    go equal 1 iteration, a checkpoint file, a freshly built run loading it, and 2 more — weights,
    the solver's state (∇-DB's flow head), its extra state (DDPO's stat tracker), Adam and the
    metrics history (bitwise in practice; asserted ≤ 1e-6)."""
    from soctune import Trainer
    from soctune.io import load_state, save_state
    from soctune.run import build, train_config

    torch.set_num_threads(1)
    cfg = _cfg(iters=3) | {"reward": "digit:3", "solver": {"name": solver}}

    def fresh() -> Trainer:
        torch.manual_seed(cfg["train"]["seed"])
        b = build(cfg)
        return Trainer(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape),
                         train_config(cfg))

    ref = fresh()
    ref.train()
    first = fresh()
    first.train_iteration()
    save_state(tmp_path / "ck.safetensors", first.state_dict())
    resumed = fresh()
    resumed.load_state_dict(load_state(tmp_path / "ck.safetensors"))
    resumed.train()
    a, b = ref.state_dict(), resumed.state_dict()
    if solver == "nabla-db":
        assert any(k.startswith("flow.") for k in a["solver"])
    if solver == "ddpo":
        assert a["solver_extra"]["stat_tracker"] and a["solver_extra"] == b["solver_extra"]
    for part in ("trainable", "solver"):
        for k in a[part]:
            assert float((a[part][k] - b[part][k]).abs().max()) <= 1e-6, (part, k)
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.allclose(v, b["optimizer"]["state"][pid][k], atol=1e-6, rtol=0), (pid, k)
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    strip = lambda h: [{k: v for k, v in m.items() if k != "time"} for m in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


# ------------------------------------------------------------------------------- fault injection
def _cfg(**train) -> dict:
    from soctune import config as cfgmod

    sets = {"process": {"name": "fm-memoryless", "num_steps": 4}, "solver": {"name": "adjoint-matching"},
            "reward": "faulty_reward:NaNDigitReward",
            "train": {"batch_size": 2, "iters": 4, "checkpoint_every": 1, **train},
            "eval": {"n_samples": 2, "grid": 2}}
    return cfgmod.validate(cfgmod.merge(cfgmod.defaults(), sets))


@pytest.fixture
def nan_switch():
    from faulty_reward import NaNDigitReward

    NaNDigitReward.active = False
    yield NaNDigitReward
    NaNDigitReward.active = False


@needs_assets
def test_nan_reward_skips_update_counts_and_logs(nan_switch):
    """NaN reward at iteration k = 1: that update is skipped (weights and Adam state unchanged),
    counted and reported; training goes on."""
    from soctune import Trainer
    from soctune.run import build, train_config

    torch.set_num_threads(1)
    cfg = _cfg(max_nonfinite=3)
    b = build(cfg)
    ft = Trainer(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape), train_config(cfg))
    m0 = ft.train_iteration()
    assert m0["updates"] == 1 and "skipped_nonfinite" not in m0
    before = {n: p.detach().clone() for n, p in ft._named_trainable()}
    adam_steps = [float(s["step"]) for s in ft.optimizer.state.values()]
    nan_switch.active = True
    m1 = ft.train_iteration()
    nan_switch.active = False
    assert m1["skipped_nonfinite"] == 1 and m1["updates"] == 0 and m1["nonfinite_total"] == 1
    assert ft.last_nonfinite == "reward"
    for n, p in ft._named_trainable():
        assert torch.equal(p, before[n])
    assert [float(s["step"]) for s in ft.optimizer.state.values()] == adam_steps
    m2 = ft.train_iteration()
    assert m2["updates"] == 1 and ft.nonfinite_in_row == 0 and m2["nonfinite_total"] == 1


@needs_assets
def test_nan_rewards_in_a_row_stop_with_checkpoint_and_message(tmp_path, nan_switch):
    """NaN from iteration 1 on with max_nonfinite = 2: the run stops in iteration 2 with a saved
    checkpoint and a message naming the reward scale and the learning rate."""
    from soctune.trainer import NonFiniteError
    from soctune.io import load_state
    from soctune.run import finetune_config as finetune_run

    torch.set_num_threads(1)
    events: list[tuple[str, dict]] = []

    def on_event(kind: str, p: dict) -> None:
        events.append((kind, p))
        if kind == "iteration" and p["step"] == 1:
            nan_switch.active = True

    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as ei:
        finetune_run(_cfg(max_nonfinite=2), out, on_event=on_event)
    msg = str(ei.value)
    assert "\n" not in msg and "reward scale" in msg and "learning rate" in msg and "--resume" in msg
    assert "ckpt-000002.safetensors" in msg
    assert [m["iteration"] for m in _metrics(out)] == [0, 1]  # iteration 1 skipped and logged, 2 stopped
    warnings = [p["message"] for k, p in events if k == "warning"]
    assert any("non-finite reward, update skipped" in w for w in warnings), warnings
    ck = load_state(out / "checkpoints" / "ckpt-000002.safetensors")
    assert ck["step"] == 2 and ck["nonfinite"]["in_row"] == 2


@needs_assets
def test_truncated_checkpoint_is_reported_and_previous_used(tmp_path):
    from soctune.run import finetune_config as finetune_run

    torch.set_num_threads(1)
    out = tmp_path / "run"
    finetune_run(_cfg(iters=3) | {"reward": "digit:3"}, out)
    newest = out / "checkpoints" / "ckpt-000003.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    events: list[tuple[str, dict]] = []
    finetune_run(_cfg(iters=4) | {"reward": "digit:3"}, out, resume=True, on_event=lambda k, p: events.append((k, p)))
    warnings = [p["message"] for k, p in events if k == "warning"]
    assert any("ckpt-000003.safetensors" in w and "corrupt or truncated" in w for w in warnings), warnings
    start = next(p for k, p in events if k == "start")
    assert start["resumed_from"] == 2
    assert [m["iteration"] for m in _metrics(out)] == [0, 1, 2, 3]


@needs_assets
def test_disk_full_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while writing the 2nd checkpoint (after half of it reached the disk): one-line
    error, no file taken for a checkpoint, the previous one intact and the one a resume uses."""
    import soctune.io as sio
    from soctune.io import load_state
    from soctune.run import RunDir
    from soctune.run import finetune_config as finetune_run

    torch.set_num_threads(1)
    real = sio._write_file
    full = {"on": False}

    def write(fd: int, data: bytes) -> None:
        if not full["on"]:
            return real(fd, data)
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sio, "_write_file", write)
    out = tmp_path / "run"

    def on_event(kind: str, p: dict) -> None:
        if kind == "iteration" and p["step"] == 2:
            full["on"] = True

    with pytest.raises(SoctuneError) as ei:
        finetune_run(_cfg(iters=4) | {"reward": "digit:3"}, out, on_event=on_event)
    msg = str(ei.value)
    assert "\n" not in msg and "No space left on device" in msg and "ckpt-000002.safetensors" in msg
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["ckpt-000001.safetensors"], files  # no temporary, no partial ckpt-000002
    assert RunDir(out).checkpoints() == [out / "checkpoints" / "ckpt-000001.safetensors"]
    ck = load_state(out / "checkpoints" / "ckpt-000001.safetensors")
    assert ck["step"] == 1


# ------------------------------------------------------------------------------- bad input
def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return ["finetune", "--iters", "1", "--batch-size", "2", "--num-steps", "3", "--set", "eval.n_samples=2",
            *extra, "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("args, needle", [
    (["--reward", "nope"], "unknown reward 'nope'"),
    (["--reward", "digit:12"], "digit reward needs a class K in 0..9"),
    (["--set", "train.bogus=1"], "unknown key(s) ['bogus'] in 'train'"),
    (["--set", "train.batch_size=2.5"], "train.batch_size must be a int"),
    (["--set", "train.grad_clip=-1"], "train.grad_clip=-1.0 is out of range"),
    (["--set", "train.checkpoint_every=-2"], "train.checkpoint_every=-2 is out of range"),
    (["--set", "solver.lambda=-1"], "reward_scale (λ) must be > 0"),
    (["--checkpoint-every", "-1"], "train.checkpoint_every=-1 is out of range"),
    (["--max-nonfinite", "0"], "train.max_nonfinite=0 is out of range"),
    (["--reward-scale", "nan"], "reward_scale"),
    (["--lr", "nan"], "train.lr=nan is out of range"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--set", "process.noise_scale=0", "--solver", "nabla-db"], "needs a stochastic process"),
])
def test_more_bad_input_is_one_line(tmp_path, args, needle):
    res = runner.invoke(_app(), _tiny(tmp_path, *args))
    assert isinstance(res.exception, SoctuneError), (res.output, res.exception)
    msg = str(res.exception)
    assert needle in msg and "\n" not in msg, msg


@needs_assets
def test_cli_nan_reward_stops_with_one_line(tmp_path):
    res = runner.invoke(_app(), _tiny(tmp_path, "--reward", "faulty_reward:NaNDigitReward:always",
                                      "--max-nonfinite", "2", "--iters", "3"))
    assert isinstance(res.exception, SoctuneError), (res.output, res.exception)
    msg = str(res.exception)
    assert "\n" not in msg and "non-finite reward" in msg and "ckpt-000001.safetensors" in msg


def _app():
    from soctune_cli.app import app

    return app


# ------------------------------------------------------------------------------- placement and trackers
@pytest.mark.parametrize("args, needle", [
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a GPU"),
    (["--precision", "fp8"], "train.precision='fp8' is out of range; expected: fp32, bf16 or fp16"),
    (["--device", "tpu"], "train.device='tpu' is out of range; expected: auto"),
    (["--log", "mlflow"], "train.log='mlflow' is out of range; expected: experiment tracker: none, tensorboard or wandb"),
    (["--grad-accum", "3"], "divisible by processes × grad_accum = 1 × 3"),
])
def test_placement_and_tracker_errors_are_one_line(tmp_path, args, needle):
    res = runner.invoke(_app(), _tiny(tmp_path, *args))
    assert isinstance(res.exception, SoctuneError), (res.output, res.exception)
    msg = str(res.exception)
    assert needle in msg and "\n" not in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path):
    for device in ("cuda", "cuda:1"):
        res = runner.invoke(_app(), _tiny(tmp_path, "--device", device))
        assert isinstance(res.exception, SoctuneError), (res.output, res.exception)
        msg = str(res.exception)
        assert "no CUDA device is visible" in msg and "--device cpu" in msg and "\n" not in msg, msg


class _Payload:
    """Unpickling this runs ``open(marker, "w")`` — what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@needs_assets
@pytest.mark.parametrize("name", ["ckpt-000003.pt", "ckpt-000003.safetensors"])
def test_pickled_checkpoint_is_refused_unread(tmp_path, name):
    """A checkpoint that carries a pickle — the pre-safetensors ``.pt`` format, or a pickle under
    a checkpoint name — is never unpickled: a ``.pt`` is refused with one line (exit ≠ 0), a
    pickle posing as ``.safetensors`` is reported and an older checkpoint is used."""
    import pickle

    from soctune.run import finetune_config

    torch.set_num_threads(1)
    out = tmp_path / "run"
    marker = tmp_path / "pwned"
    cfg2 = _cfg(iters=2) | {"reward": "digit:3"}
    finetune_config(cfg2, out)
    (out / "checkpoints" / name).write_bytes(pickle.dumps(_Payload(marker)))
    events: list[tuple[str, dict]] = []
    if name.endswith(".pt"):
        for old in (out / "checkpoints").glob("*.safetensors"):
            old.unlink()
        res = runner.invoke(_app(), ["finetune", "--config", str(out / "config.yaml"), "--out", str(out), "--resume",
                                     "--quiet"])
        assert isinstance(res.exception, SoctuneError), (res.output, res.exception)
        msg = str(res.exception)
        assert "ckpt-000003.pt is a pickled checkpoint" in msg and "never unpickles" in msg and "\n" not in msg, msg
    else:
        finetune_config(_cfg(iters=3) | {"reward": "digit:3"}, out, resume=True,
                        on_event=lambda k, p: events.append((k, p)))
        warnings = [p["message"] for k, p in events if k == "warning"]
        assert any("ckpt-000003.safetensors" in w and "pickle" in w for w in warnings), warnings
        assert next(p for k, p in events if k == "start")["resumed_from"] == 2
    assert not marker.exists()
