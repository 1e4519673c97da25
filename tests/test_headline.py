"""The two headline commands, exactly as the README gives them (slow tier, ~4–5 min each on 2 cores).

Each fine-tunes the shipped digits model on reward log p(3 | x) with its preset, then
`soctune sample --lora` draws 256 samples which the independent pixel classifier (not the reward's
CNN) sorts into digits. Acceptance (issue #6): ≥ 60% threes, and the pixel spread among the
threes ≥ 70% of the base model's (same command without the LoRA, same seed).

Measured (seed 0, 2 cores): adjoint-matching on fm-memoryless 96.9% threes in the finetune
evaluation; nabla-db on ddpm (chain flow target) 99.6% threes (255/256) from `soctune sample`, spread
3.53 vs base 3.43 (the paper's flow target: 70%, spread 4.11 vs 3.99).
Spread ratio from `soctune sample` in the latest runs: AM 0.81 (3.23 vs 3.97), ∇-DB 1.03, so the 0.7
bound has a 0.1 margin on AM; the share margin is 36–40 points.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import needs_assets

pytestmark = [pytest.mark.slow, needs_assets]


def _soctune(*args: str) -> None:
    exe = shutil.which("soctune")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "soctune_cli.app", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _report(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("process, solver", [("fm-memoryless", "adjoint-matching"), ("ddpm", "nabla-db")])
def test_headline_command_turns_the_model_into_a_three_generator(tmp_path: Path, process: str, solver: str) -> None:
    run = tmp_path / "run"
    _soctune("finetune", "--process", process, "--solver", solver, "--reward", "digit:3", "--out", str(run), "--quiet")
    _soctune("sample", "--lora", str(run / "lora"), "--n", "256", "--out", str(tmp_path / "after"), "--quiet")
    _soctune("sample", "--process", process, "--num-steps", "25", "--n", "256", "--out", str(tmp_path / "before"),
             "--quiet")
    after, before = _report(tmp_path / "after"), _report(tmp_path / "before")
    share = after["class_shares"][3]
    assert share >= 0.6, after["class_counts"]
    assert before["class_shares"][3] < 0.2, before["class_counts"]  # the base model is not already a 3-generator
    assert after["class_spread_pixels"][3] >= 0.7 * before["class_spread_pixels"][3], (after, before)
