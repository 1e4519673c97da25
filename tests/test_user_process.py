"""A user-defined process (tests/user_ou.py: an Ornstein–Uhlenbeck SDE in one file) works
everywhere a built-in does: registry by name and by import path, rollouts, the conformance
suite (picked up automatically), and the right law."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

import test_process_conformance
from helpers import conformance_process_names
from soctune.models.base import Denoiser, ZeroDenoiser
from soctune.registry import SoctuneError
from soctune.sde import PROCESSES, get_process, list_processes
from soctune.trajectory import rollout
from user_ou import OUProcess


def test_registered_by_name_and_import_path() -> None:
    assert "user-ou" in [name for name, _ in list_processes()]
    assert PROCESSES.get("user-ou") is OUProcess and OUProcess.registered_name == "user-ou"
    by_name = get_process("user-ou", num_steps=10, theta=2.0)
    by_path = get_process("user_ou:OUProcess", num_steps=10, theta=2.0)
    assert type(by_name) is OUProcess and type(by_path) is OUProcess
    assert by_path.theta == 2.0 and by_path.num_steps == 10
    with pytest.raises(SoctuneError, match="bad options"):
        get_process("user-ou", thetaa=1.0)
    with pytest.raises(SoctuneError):
        get_process("user_ou:NoSuchProcess")


def test_picked_up_by_conformance_suite() -> None:
    """No test edits needed: the conformance suite's parametrisation includes the plug-in."""
    assert "user-ou" in conformance_process_names()
    assert ("user-ou", {}) in test_process_conformance.CASES


class ConstantControl(Denoiser):
    prediction_type = "control"

    def __init__(self, u: float) -> None:
        super().__init__()
        self.u = u

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return torch.full_like(x, self.u)


def test_marginals_match_closed_form() -> None:
    """X_t ~ N(μ + (m₀−μ)e^{−θt}, s₀²e^{−2θt} + σ²(1−e^{−2θt})/(2θ)) at t = 0.5 and 1.

    K = 200 Euler steps, 2 × 10 000 samples (pooled over 2 independent coordinates). Measured
    over seeds 0–4: |Δmean| ≤ 0.006, |Δvar| ≤ 0.0051 (MC sd ≈ 0.004 / 0.003, Euler bias ~0.002).
    """
    K = 200
    process = get_process("user_ou:OUProcess", num_steps=K)
    traj = rollout(process, ZeroDenoiser(), batch_size=10_000, sample_shape=(2,),
                   generator=torch.Generator().manual_seed(0))
    for k, t in ((K // 2, 0.5), (K, 1.0)):
        assert float(traj.ts[k]) == pytest.approx(t)
        mean, var = process.marginal(t)
        x = traj.xs[k].double().flatten()
        assert abs(float(x.mean()) - mean) < 0.015, (t, float(x.mean()), mean)
        assert abs(float(x.var()) - var) < 0.015, (t, float(x.var()), var)


def test_control_enters_the_drift() -> None:
    """b_θ = θ(μ − x) + σu: a constant control u shifts E X_1 by σu(1 − e^{−θ})/θ exactly
    (same noise, linear dynamics: the shift is deterministic up to Euler's O(1/K) error;
    measured max |Δ| 4.7e-4 at K = 200)."""
    K, u = 200, 0.7
    process = OUProcess(num_steps=K)
    base = rollout(process, ZeroDenoiser(), batch_size=256, sample_shape=(1,),
                   generator=torch.Generator().manual_seed(1))
    ctrl = rollout(process, ConstantControl(u), x_init=base.xs[0], noises=base.noises)
    shift = process.sigma * u * (1 - math.exp(-process.theta)) / process.theta
    torch.testing.assert_close(ctrl.xs[-1] - base.xs[-1], torch.full_like(base.xs[-1], shift), rtol=0, atol=2e-3)
