"""DDPO (soctune.solvers.ddpo): finite PPO losses, on-policy ratios of exactly 1, per-condition
advantage normalisation, deterministic processes rejected."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from soctune import TrainConfig, Trainer, finetune
from soctune.models.base import CorrectedDenoiser
from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
from soctune.registry import SoctuneError
from soctune.rewards import LinearReward
from soctune.sde import get_process, list_processes
from soctune.solvers import get_solver
from soctune.solvers.ddpo import DDPOSolver, PerConditionStatTracker

PREDICTION = {"ddpm": "epsilon", "fm-memoryless": "velocity", "dpmpp-sde": "epsilon"}
PROCESSES = [name for name in PREDICTION if name in dict(list_processes())]


def _gmm_model(process: Any, name: str, seed: int = 0) -> CorrectedDenoiser:
    torch.manual_seed(seed)
    return CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[name]), 2,
                             hidden=32, depth=2)


@pytest.mark.parametrize("name", PROCESSES)
def test_ddpo_trains_finitely(name: str) -> None:
    proc = get_process(name, num_steps=6)
    ft = finetune(model=_gmm_model(proc, name), process=proc, solver="ddpo",
                  solver_options={"inner_epochs": 2, "minibatches": 2, "clip_range": 0.2},
                  reward=LinearReward([1.0, 0.0]), sample_shape=(2,), iters=2, batch_size=32, lr=1e-3)
    for m in ft.metrics:
        assert m["updates"] == 4.0  # one optimiser step per minibatch and epoch
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert math.isfinite(m["reward_mean"]) and math.isfinite(m["approx_kl"])


@pytest.mark.parametrize("name", PROCESSES)
def test_first_update_is_on_policy_then_ratios_move_and_clip(name: str) -> None:
    """Before any update the recomputed log-density of the recorded x_{k+1} equals the sampling
    one: ratio exactly 1 and clipped = unclipped surrogate. Later minibatches are off-policy."""
    proc = get_process(name, num_steps=6)
    model = _gmm_model(proc, name)
    solver = DDPOSolver(inner_epochs=3, minibatches=2, clip_range=0.05)
    ft = Trainer(proc, model, solver, LinearReward([1.0, 0.0]), (2,), TrainConfig(batch_size=64, lr=1e-2))
    seen = []
    for out in solver.iteration(ft.ctx):
        seen.append(dict(out.metrics, loss=float(out.loss.detach())))
        ft.optimizer.zero_grad()
        out.loss.backward()
        ft.optimizer.step()
    assert len(seen) == 6
    first = seen[0]
    # measured (3 processes × seeds 0 – 4): ratio − 1 exactly 0.0 (same float32 kernels for sample and
    # replay); clipped − unclipped surrogate within ±1.5e-8 (float accumulation order)
    assert first["ratio_max_dev"] <= 1e-6 and first["clipfrac"] == 0.0 and first["approx_kl"] <= 1e-12
    assert first["loss"] == pytest.approx(first["loss_unclipped"], abs=1e-7)
    later = seen[-1]
    # measured last minibatch: max |ratio − 1| 1.0 – 25, clipfrac 0.34 – 0.71 (lr 1e-2 moves the policy)
    assert later["ratio_max_dev"] > 0.05 and later["clipfrac"] > 0.1
    # the clipped surrogate is a pessimistic bound: max(−Aρ, −A clip ρ) ≥ −Aρ, averaged
    assert all(m["loss"] >= m["loss_unclipped"] - 1e-6 for m in seen)


def test_advantages_are_normalised_per_condition() -> None:
    """Two conditions with reward scales 1 and 100: each group ends at mean 0 / std 1 on its own
    statistics; batch-wise normalisation would leave the small-scale group near 0."""
    g = torch.Generator().manual_seed(0)
    cond = torch.tensor([0, 1] * 32)
    rewards = torch.where(cond == 0, torch.randn(64, generator=g), 50.0 + 100.0 * torch.randn(64, generator=g))
    solver = DDPOSolver(stat_buffer_size=64, stat_min_count=8)
    adv = solver.advantages(rewards, cond)
    for c in (0, 1):
        a = adv[cond == c].double()
        assert float(a.mean()) == pytest.approx(0.0, abs=1e-6)
        assert float(a.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)  # 1/(1 + 1e-6/σ)
    pooled = DDPOSolver(per_condition=False).advantages(rewards, cond)
    assert float(pooled[cond == 0].std()) < 0.05  # scale-1 rewards vanish next to the scale-100 ones
    # prompts as strings group the same way; unhashable per-sample conditioning falls back to the batch
    prompts = ["a cat" if int(c) == 0 else "a dog" for c in cond]
    torch.testing.assert_close(DDPOSolver(stat_buffer_size=64, stat_min_count=8).advantages(rewards, prompts), adv)
    unhashable = [[int(c)] for c in cond]
    torch.testing.assert_close(DDPOSolver().advantages(rewards, unhashable), pooled)


def test_stat_tracker_uses_batch_statistics_until_min_count_then_its_buffer() -> None:
    tr = PerConditionStatTracker(buffer_size=4, min_count=4)
    r1 = torch.tensor([0.0, 10.0, 2.0, 12.0])
    keys = ["a", "b", "a", "b"]
    a1 = tr.update(keys, r1)  # 2 rewards per key < 4: the batch's mean 6 and std √26
    torch.testing.assert_close(a1, (r1.double() - 6.0) / (math.sqrt(26.0) + 1e-6))
    r2 = torch.tensor([4.0, 14.0, 6.0, 16.0])
    a2 = tr.update(keys, r2)  # 4 per key: each key's buffer, a = [0, 2, 4, 6], b = [10, 12, 14, 16]
    sd = math.sqrt(5.0)
    torch.testing.assert_close(a2, torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64) / (sd + 1e-6))
    restored = PerConditionStatTracker(buffer_size=4, min_count=4)
    restored.load_state(tr.state())
    torch.testing.assert_close(restored.update(keys, r2), tr.update(keys, r2))


def test_conditioned_training_groups_by_label() -> None:
    """End to end with a class-label sampler and a label-dependent reward scale: every minibatch
    sees advantages normalised within its label."""
    proc = get_process("ddpm", num_steps=6)
    model = _gmm_model(proc, "ddpm")

    def reward(x: torch.Tensor, cond: Any) -> torch.Tensor:
        return x[:, 0] * torch.where(cond == 0, 1.0, 100.0)

    def sampler(b: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, (b,), generator=gen)

    solver = DDPOSolver(stat_buffer_size=128, stat_min_count=4)
    captured: dict[str, torch.Tensor] = {}
    orig = solver.advantages

    def spy(r: torch.Tensor, c: Any) -> torch.Tensor:
        captured["adv"], captured["cond"] = orig(r, c), c
        return captured["adv"]

    solver.advantages = spy  # type: ignore[method-assign]
    ft = Trainer(proc, model, solver, reward, (2,), TrainConfig(batch_size=64), cond_sampler=sampler)
    ft.train_iteration()
    for c in (0, 1):
        a = captured["adv"][captured["cond"] == c]
        assert float(a.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(a.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", ["ddpm", "fm-memoryless"])
def test_ddpo_on_a_deterministic_process_is_refused(name: str) -> None:
    proc = get_process(name, num_steps=6, noise_scale=0.0)
    model = _gmm_model(proc, name)
    with pytest.raises(SoctuneError, match="needs a stochastic process") as exc:
        Trainer(proc, model, DDPOSolver(), LinearReward([1.0, 0.0]), (2,))
    assert "\n" not in str(exc.value)


def test_bad_options_are_one_line_errors() -> None:
    for bad in ({"inner_epochs": 0}, {"minibatches": 0}, {"clip_range": 0.0}, {"adv_clip_max": -1.0},
                {"step_fraction": 0.0}, {"logprob_reduction": "max"}, {"stat_buffer_size": 0}):
        with pytest.raises(SoctuneError):
            get_solver("ddpo", **bad)


def test_step_fraction_and_mean_reduction_train() -> None:
    proc = get_process("fm-memoryless", num_steps=6)
    ft = finetune(model=_gmm_model(proc, "fm-memoryless"), process=proc, solver="ddpo",
                  solver_options={"step_fraction": 0.5, "logprob_reduction": "mean", "minibatches": 2},
                  reward=LinearReward([1.0, 0.0]), sample_shape=(2,), iters=2, batch_size=16)
    assert all(math.isfinite(m["loss"]) and m["updates"] == 2.0 for m in ft.metrics)
