"""Gradient-free DB baselines (dag-db, residual-db): finite losses, no reward gradients, balance at the base."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from soctune import TrainConfig, Trainer
from soctune.models.base import CorrectedDenoiser, ZeroDenoiser
from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
from soctune.registry import SoctuneError
from soctune.rewards.base import LinearReward
from soctune.sde import get_process, list_processes
from soctune.solvers import get_solver
from soctune.solvers.base import FinetuneContext
from soctune.solvers.nabla_db import make_gamma
from soctune.trajectory import rollout

PROCESSES = [("ddpm", "epsilon"), ("fm-memoryless", "velocity")]
if "dpmpp-sde" in dict(list_processes()):
    PROCESSES.append(("dpmpp-sde", "epsilon"))


class NoGradReward:
    """r(x) = 0.5·x₁ that fails the test if anyone asks for its gradient."""

    def __init__(self) -> None:
        self.calls = 0
        self.linear = LinearReward([0.5, 0.0])

    def __call__(self, x: Tensor, cond=None) -> Tensor:
        if x.requires_grad:
            raise AssertionError("db requested a reward gradient")
        self.calls += 1
        return self.linear(x)


def _model(process, pred_type: str) -> CorrectedDenoiser:
    return CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, pred_type), dim=2, hidden=32, depth=2)


@pytest.mark.parametrize("variant", ["residual-db", "dag-db"])
@pytest.mark.parametrize("process_name,pred_type", PROCESSES)
def test_two_iterations_finite_without_reward_gradients(variant: str, process_name: str, pred_type: str) -> None:
    torch.manual_seed(0)
    process = get_process(process_name, num_steps=10)
    reward = NoGradReward()
    solver = get_solver("db", variant=variant, transitions=4, inner_steps=2)
    ft = Trainer(process, _model(process, pred_type), solver, reward, (2,), TrainConfig(iters=2, batch_size=16, lr=1e-2))
    hist = ft.train()
    assert reward.calls > 0
    for h in hist:
        assert h["updates"] == 2.0
        for key in ("loss", "loss_db", "loss_anchor", "reward_mean", "reward_std"):
            assert math.isfinite(h[key]), (key, h)
        # residual-db evaluates the base means: it logs the SOC cost; dag-db (no base, not the tilt) does not
        assert ("soc_cost" in h) == (variant == "residual-db"), h
    # the scalar flow network is a trained sub-module
    assert any(float(p.detach().abs().max()) > 0 for p in solver.flow.net.out.parameters())


def test_residual_db_is_balanced_at_the_base_without_lookahead() -> None:
    """Model = base, f_φ = 0, γ = 0: log F̃ = 0 and log P_θ = log P_base, so δ_k = 0 on every
    non-terminal transition; the last one carries −λ r(Φ(x_T))."""
    process = get_process("ddpm", num_steps=8)
    model = _model(process, "epsilon")
    reward = NoGradReward()
    solver = get_solver("db", variant="residual-db", gamma="zero")
    ctx = FinetuneContext(process=process, model=model, reward=reward, sample_shape=(2,), batch_size=8,
                          generator=torch.Generator().manual_seed(0))
    solver.setup(ctx)
    solver._gamma_fn = make_gamma(process, "zero")
    traj = rollout(process, model, batch_size=8, sample_shape=(2,), generator=torch.Generator().manual_seed(1))
    idx = torch.arange(8)
    T = traj.stochastic_steps()[-1] + 1
    for k in range(T - 1):
        assert float(solver.residual(ctx, traj, k, T, None, idx).detach().abs().max()) == 0.0
    last = solver.residual(ctx, traj, T - 1, T, None, idx).detach()
    with torch.no_grad(), model.base():
        x_final = process.split(traj.xs[T], float(traj.ts[T]), model(traj.xs[T], torch.full((8,), float(traj.ts[T]))),
                                "epsilon")[0]
    torch.testing.assert_close(last, -reward(x_final), rtol=1e-5, atol=1e-5)


def test_dag_db_needs_a_gaussian_path_process() -> None:
    process = get_process("euler-maruyama", num_steps=5)
    model = CorrectedDenoiser(ZeroDenoiser(), dim=2, hidden=8, depth=1)
    with pytest.raises(SoctuneError, match="residual-db"):
        Trainer(process, model, get_solver("db", variant="dag-db"), NoGradReward(), (2,), TrainConfig(iters=1))


def test_bad_variant_raises() -> None:
    with pytest.raises(SoctuneError):
        get_solver("db", variant="tb")
