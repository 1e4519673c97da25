"""Adjoint Matching recovers the closed-form optimal control of a user-defined SOC problem.

The problem lives in one user file (tests/user_linear_soc.py, library API only): the linear SDE
dX = (−θX + σu)dt + σdW, X_0 ~ N(0, 0.5² I), terminal reward r(x) = −½‖x − b‖², λ = 2. Its optimal
control is affine in x and known exactly for the Euler chain that is trained (a backward Riccati
recursion), so the learned control can be compared pointwise along the visited states.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from soctune import finetune
from soctune.models.base import CorrectedDenoiser, ZeroDenoiser
from soctune.sde import get_process
from soctune.trajectory import rollout
from user_linear_soc import (LinearSOCProcess, QuadraticTarget, optimal_control_continuous,
                             optimal_control_discrete, optimal_cost)

LAM = 2.0
B_TARGET = (1.0, -0.5)


def test_registered_by_name() -> None:
    assert isinstance(get_process("user-linear-soc", num_steps=5), LinearSOCProcess)


def test_closed_forms_agree() -> None:
    """The Euler chain's exact optimal control tends to the SDE's u*(t, x); at K = 20 their relative L2
    gap on N(0, 1) states is 3.4 %, and it shrinks ~ 1/K (K = 200: < 0.5 %)."""
    target = QuadraticTarget(B_TARGET)
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for K, tol in ((20, 0.06), (200, 0.006)):
        proc = LinearSOCProcess(num_steps=K)
        num = den = 0.0
        for k in range(K):
            ud = optimal_control_discrete(proc, target, LAM, k, x)
            uc = optimal_control_continuous(proc, target, LAM, float(proc.ts[k]), x)
            num += float((ud - uc).pow(2).sum(1).mean())
            den += float(uc.pow(2).sum(1).mean())
        assert (num / den) ** 0.5 < tol, (K, (num / den) ** 0.5)


def test_adjoint_matching_recovers_the_optimal_control() -> None:
    """100 iterations (batch 256, lr 1e-2, correction MLP 2×32) through ``soctune.finetune`` with the
    solver's defaults (on these 2-D states adjoint-matching's ``estimator="auto"`` takes the score
    target).

    Measured over seeds 0–4: relative L2 error of the learned control against the exact discrete
    optimum along fine-tuned paths 0.167 / 0.212 / 0.207 / 0.154 / 0.213 (the zero control: 1); SOC cost
    of the last 20 iterations within 0.007–0.031 of J*. The pathwise adjoint (``estimator="pathwise"``)
    does better on this unimodal problem: 0.065–0.112 at batch 64 (the trade-off is in
    soctune/solvers/adjoint_matching.py).
    """
    process = LinearSOCProcess(num_steps=20)
    target = QuadraticTarget(B_TARGET)
    torch.manual_seed(0)
    model = CorrectedDenoiser(ZeroDenoiser(), 2, hidden=32, depth=2, time_features=8)
    with warnings.catch_warnings():
        # X_0 is random, so the chain is not memoryless: AM still solves the SOC problem (the control
        # is what is tested here), and says that its samples are not the reward tilt
        warnings.simplefilter("ignore", UserWarning)
        ft = finetune(model=model, process=process, solver="adjoint-matching",
                      solver_options={"reward_scale": LAM}, reward=target, sample_shape=(2,),
                      iters=100, batch_size=256, lr=1e-2, seed=0)
    with torch.no_grad():
        traj = rollout(process, model, batch_size=2048, sample_shape=(2,), generator=torch.Generator().manual_seed(99))
        err = zero = 0.0
        for k in range(process.num_steps):
            x = traj.xs[k]
            u = model(x, torch.full((x.shape[0],), process.model_time(k))).double()
            u_star = optimal_control_discrete(process, target, LAM, k, x)
            err += float((u - u_star).pow(2).sum(1).mean())
            zero += float(u_star.pow(2).sum(1).mean())  # the error of the zero-control baseline
    rel_l2 = (err / zero) ** 0.5
    print(f"relative L2 error of the learned control: {rel_l2:.4f} "
          f"(RMS {(err / process.num_steps) ** 0.5:.4f}; zero control {(zero / process.num_steps) ** 0.5:.4f})")
    assert rel_l2 < 0.27, rel_l2
    j = sum(h["soc_cost"] for h in ft.metrics[-20:]) / 20
    # the 20-iteration mean of λr has sd ≈ 0.02 at batch 256
    assert j == pytest.approx(optimal_cost(process, target, LAM), abs=0.15)
