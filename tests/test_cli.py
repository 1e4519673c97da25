"""The `soctune` command: typer's CliRunner for the commands, one real subprocess of the
installed console script for the one-line error contract."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from soctune.registry import SoctuneError
from soctune_cli.app import app
from helpers import needs_assets

runner = CliRunner()


def test_list_shows_every_registry():
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    for name in ("ddpm", "dpmpp-sde", "fm-memoryless", "euler-maruyama", "adjoint-matching", "nabla-db", "draft",
                 "ddpo", "db", "digit", "linear", "quadratic"):
        assert name in res.output


def test_finetune_help_names_every_option():
    res = runner.invoke(app, ["finetune", "--help"])
    assert res.exit_code == 0
    for opt in ("--process", "--solver", "--model", "--reward", "--reward-scale", "--iters", "--num-steps",
                "--batch-size", "--lr", "--seed", "--config", "--set", "--out", "--resume"):
        assert opt in res.output


@pytest.mark.parametrize("args, needle", [
    (["--process", "nope"], "unknown process 'nope'; choose one of: ddpm"),
    (["--solver", "nope"], "unknown solver 'nope'; choose one of: adjoint-matching"),
    (["--set", "solver.bogus=1"], "unknown option(s) ['bogus'] for solver 'adjoint-matching'; valid:"),
    (["--set", "train.iters=-3"], "train.iters=-3 is out of range"),
    (["--set", "train.lr=abc"], "train.lr must be a float"),
    (["--set", "nosection=1"], "needs a section"),
    (["--process", "euler-maruyama"], "has no shipped default model; pass --model"),
])
def test_bad_input_is_a_soctune_error(tmp_path, args, needle):
    res = runner.invoke(app, ["finetune", *args, "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, SoctuneError), res.output
    msg = str(res.exception)
    assert needle in msg and "\n" not in msg


def test_installed_command_prints_one_line_error(tmp_path):
    exe = shutil.which("soctune") or f"{sys.executable} -m soctune_cli.app"
    proc = subprocess.run([*exe.split(), "finetune", "--solver", "nope", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("error: unknown solver 'nope'") and "nabla-db" in err
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1


@needs_assets
def test_finetune_writes_the_run_folder_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--process", "fm-memoryless", "--solver", "adjoint-matching", "--iters", "2",
            "--batch-size", "8", "--num-steps", "8", "--set", "eval.n_samples=16", "--set", "train.checkpoint_every=1",
            "--out", str(out), "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    for f in ("config.yaml", "metrics.jsonl", "samples_before.png", "samples_after.png", "reward.png",
              "summary.json", "lora/pytorch_lora_weights.safetensors"):
        assert (out / f).exists(), f
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["iteration"] for ln in lines] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert {"before", "after", "prior_preservation_frechet"} <= set(summary)
    # a second run into the same folder needs --resume; with it, more iterations continue the run
    res = runner.invoke(app, args)
    assert isinstance(res.exception, SoctuneError)
    res = runner.invoke(app, [*args[:6], "3", *args[7:], "--resume"])
    assert res.exit_code == 0, (res.output, res.exception)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["iteration"] for ln in lines] == [0, 1, 2]
    # the resolved config reproduces the run's settings
    res = runner.invoke(app, ["sample", "--process", "fm-memoryless", "--lora", str(out / "lora"), "--n", "8",
                              "--num-steps", "8", "--out", str(tmp_path / "s"), "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    x = np.load(tmp_path / "s" / "samples.npz")["x"]
    assert x.shape == (8, 1, 8, 8) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    report = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert sum(report["class_counts"]) == 8 and abs(sum(report["class_shares"]) - 1) < 1e-9
    assert len(report["class_spread_pixels"]) == 10 and "digit classes (independent classifier)" not in res.output


@needs_assets
def test_sample_ode_and_sde(tmp_path):
    for ns in ("0", "1"):
        res = runner.invoke(app, ["sample", "--process", "fm-memoryless", "--noise-scale", ns, "--n", "4",
                                  "--num-steps", "8", "--out", str(tmp_path / ns), "--quiet"])
        assert res.exit_code == 0, (res.output, res.exception)
        assert (tmp_path / ns / "grid.png").exists()


def test_sample_defaults_come_from_the_loras_run(tmp_path):
    from soctune_cli.app import _run_defaults

    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {path: digits-ddpm}\nprocess: {name: ddpm, num_steps: 25}\n")
    assert _run_defaults([(str(run / "lora"), 1.0)], None, None, None) == ("digits-ddpm", "ddpm", 25)
    assert _run_defaults([(str(run / "lora"), 1.0)], None, "fm-memoryless", 10) == ("digits-ddpm", "fm-memoryless", 10)
    assert _run_defaults([], None, None, None) == (None, "fm-memoryless", 50)
