"""DRaFT / DRaFT-K / DRaFT-LV / ReFL (soctune.solvers.draft): finite losses on every Gaussian-path
process, exact gradient truncation, checkpointing equivalence, ReFL's stop range, impossible pairs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from soctune import TrainConfig, Trainer, finetune
from soctune.models.base import CorrectedDenoiser, Denoiser, ZeroDenoiser
from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
from soctune.registry import SoctuneError
from soctune.rewards import LinearReward, QuadraticReward
from soctune.sde import get_process, list_processes
from soctune.solvers import get_solver
from soctune.solvers.draft import DraftSolver

PREDICTION = {"ddpm": "epsilon", "fm-memoryless": "velocity", "dpmpp-sde": "epsilon"}
PROCESSES = [name for name in PREDICTION if name in dict(list_processes())]

VARIANTS = [
    {"k": 1},
    {"k": 3},
    {"k": "all"},
    {"k": "all", "checkpoint": False},
    {"lv_samples": 3},
    {"variant": "refl"},
    {"k": 2, "kl_weight": 0.5, "output_reg_weight": 0.1},
    {"variant": "refl", "kl_weight": 0.5, "output_reg_weight": 0.1},
    {"lv_samples": 2, "output_reg_weight": 0.1},
]


def _gmm_model(process: Any, name: str, seed: int = 0) -> CorrectedDenoiser:
    torch.manual_seed(seed)
    base = GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[name])
    model = CorrectedDenoiser(base, 2, hidden=32, depth=2)
    with torch.no_grad():  # a non-zero correction, so base and fine-tuned models differ from the start
        model.correction.out.weight.normal_(0, 0.1)
    return model


class StepOffsetDenoiser(Denoiser):
    """Exact mixture model plus one learnable offset per grid step: pred = base + offsets[k(t)].
    offsets.grad[k] is then exactly the gradient reaching step k."""

    def __init__(self, process: Any, name: str) -> None:
        super().__init__()
        self.base_model = GaussianMixtureDenoiser(two_mode_mixture(), process, PREDICTION[name])
        self.prediction_type = self.base_model.prediction_type
        self.times = torch.tensor([process.model_time(k) for k in range(process.num_steps)])
        self.offsets = nn.Parameter(torch.zeros(process.num_steps, 2))

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        k = int((self.times - float(t[0])).abs().argmin())
        return self.base_model(x, t, cond) + self.offsets[k]


def _context(process: Any, model: Denoiser, solver: DraftSolver, reward: Any, batch: int = 32, seed: int = 0
             ) -> Trainer:
    return Trainer(process, model, solver, reward, (2,), TrainConfig(batch_size=batch, seed=seed))


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_variant_trains_finitely(name: str, options: dict[str, Any]) -> None:
    proc = get_process(name, num_steps=8)
    ft = finetune(model=_gmm_model(proc, name), process=proc, solver="draft", solver_options=options,
                  reward=LinearReward([0.5, 0.0]), sample_shape=(2,), iters=2, batch_size=32, lr=1e-3)
    assert len(ft.metrics) == 2
    for m in ft.metrics:
        assert m["updates"] == 1.0
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert math.isfinite(m["reward_mean"]) and m["reward_std"] > 0
        if "kl_weight" in options and options.get("variant") != "refl":
            assert m["kl"] > 0  # steps K−2 (stochastic) is among the differentiated ones


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("k", [1, 3])
def test_draft_k_gradient_stops_before_the_last_k_steps(name: str, k: int) -> None:
    proc = get_process(name, num_steps=8)
    model = StepOffsetDenoiser(proc, name)
    ft = _context(proc, model, DraftSolver(k=k), QuadraticReward(c=[1.0, 0.0]))
    out = next(ft.solver.iteration(ft.ctx))
    out.loss.backward()
    g = model.offsets.grad.abs().sum(1)
    assert torch.all(g[: 8 - k] == 0), g
    assert torch.all(g[8 - k:] > 0), g


@pytest.mark.parametrize("name", PROCESSES)
def test_full_draft_reaches_every_step(name: str) -> None:
    proc = get_process(name, num_steps=6)
    model = StepOffsetDenoiser(proc, name)
    ft = _context(proc, model, DraftSolver(k="all"), QuadraticReward(c=[1.0, 0.0]))
    next(ft.solver.iteration(ft.ctx)).loss.backward()
    assert torch.all(model.offsets.grad.abs().sum(1) > 0)


@pytest.mark.parametrize("name", PROCESSES)
def test_checkpointed_full_draft_gradient_equals_plain_backprop(name: str) -> None:
    proc = get_process(name, num_steps=8)
    grads, recomputed = [], []
    for ckpt in (True, False):
        model = _gmm_model(proc, name, seed=3)
        ft = _context(proc, model, DraftSolver(k="all", checkpoint=ckpt), QuadraticReward(c=[1.0, 0.0]), seed=5)
        loss = next(ft.solver.iteration(ft.ctx)).loss
        calls: list[int] = []
        # hook the inner model: non-reentrant checkpointing stops the recomputation early, before
        # the outer module's forward returns
        model.base_model.register_forward_hook(lambda *_: calls.append(1))
        loss.backward()
        recomputed.append(len(calls))
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    assert recomputed == [8, 0]  # checkpointing really re-ran every step's forward in the backward pass
    # measured max |difference| exactly 0 (seeds 0 – 4, all processes; gradient norms 1.1 – 13):
    # the recomputation is bitwise identical on CPU, 1e-5 leaves room for other backends
    assert grads[0].norm() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


def test_k_at_least_the_number_of_steps_is_full_draft() -> None:
    solver = DraftSolver(k=50)
    assert solver.grad_spec(8).mode == "all" and solver.grad_spec(8).checkpoint
    assert solver.grad_spec(100).mode == "last" and solver.grad_spec(100).k == 50
    assert DraftSolver(k="3").grad_spec(8).k == 3


@pytest.mark.parametrize("name", PROCESSES)
def test_refl_stop_step_lies_in_the_configured_range(name: str) -> None:
    proc = get_process(name, num_steps=10)
    model = _gmm_model(proc, name)
    solver = DraftSolver(variant="refl", refl_k_min=4, refl_k_max=8)
    ft = _context(proc, model, solver, LinearReward([1.0, 0.0]), batch=8)
    stops = [next(solver.iteration(ft.ctx)).metrics["stop_step"] for _ in range(60)]
    assert set(stops) == {4.0, 5.0, 6.0, 7.0}  # 60 uniform draws miss one of 4 values w.p. < 1e-6
    assert DraftSolver(variant="refl").refl_range(proc) == (7, 10)  # default: the last quarter


@pytest.mark.parametrize("name", PROCESSES)
def test_refl_scores_the_data_estimate_of_its_stop_step(name: str) -> None:
    """ReFL's loss is −λ·r(x̂₁(x_k)) at the stop step: gradient only reaches that step."""
    proc = get_process(name, num_steps=10)
    model = StepOffsetDenoiser(proc, name)
    solver = DraftSolver(variant="refl", refl_k_min=5, refl_k_max=6, reward_scale=2.0)
    ft = _context(proc, model, solver, QuadraticReward(c=[1.0, 0.0]))
    out = next(solver.iteration(ft.ctx))
    out.loss.backward()
    g = model.offsets.grad.abs().sum(1)
    assert out.metrics["stop_step"] == 5.0 and g[5] > 0 and g.sum() == g[5]
    assert float(out.loss.detach()) == pytest.approx(-2.0 * out.metrics["reward_mean"], rel=1e-6)


@pytest.mark.parametrize("name", PROCESSES)
def test_lv_differentiates_only_the_tail_from_n_redraws(name: str) -> None:
    """DRaFT-LV on DDPM/flow grids: the redrawn step K−2 is gradient-free, the final step gets all
    of it, and the loss averages n·B one-step rewards."""
    proc = get_process(name, num_steps=8)
    model = StepOffsetDenoiser(proc, name)
    solver = DraftSolver(lv_samples=4)
    assert solver.lv_step(proc) == 6
    ft = _context(proc, model, solver, QuadraticReward(c=[1.0, 0.0]))
    out = next(solver.iteration(ft.ctx))
    out.loss.backward()
    g = model.offsets.grad.abs().sum(1)
    assert torch.all(g[:7] == 0) and g[7] > 0
    assert float(out.loss.detach()) == pytest.approx(-out.metrics["reward_mean"], rel=1e-6)


def test_lv_redraws_reduce_the_gradient_variance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Averaging n redraws of the last stochastic step lowers the spread of the last-step gradient
    over the redraw noise. The rollout prefix is pinned (a fixed generator inside the solver's
    rollout), so only the redraws differ between seeds."""
    import soctune.solvers.draft as draft_mod

    real_rollout = draft_mod.rollout

    def pinned_rollout(*args: Any, **kwargs: Any) -> Any:
        kwargs["generator"] = torch.Generator().manual_seed(123)
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(draft_mod, "rollout", pinned_rollout)
    name = "ddpm"
    proc = get_process(name, num_steps=8, scheduler_config={"timestep_spacing": "trailing", "clip_sample": False})
    spreads = {}
    for n in (1, 16):
        gs = []
        for seed in range(12):
            model = StepOffsetDenoiser(proc, name)
            ft = _context(proc, model, DraftSolver(lv_samples=n), QuadraticReward(c=[1.0, 0.0]), batch=4, seed=seed)
            next(ft.solver.iteration(ft.ctx)).loss.backward()
            gs.append(model.offsets.grad[7].clone())
        spreads[n] = float(torch.stack(gs).std(0).norm())
    # a mean of 16 i.i.d. redraws: ratio ≈ 1/4 in expectation; measured 0.30 – 0.35 (12-seed std
    # estimates) over prefix pins 0 – 9
    assert spreads[16] < 0.45 * spreads[1]


def test_kl_regulariser_matches_the_per_step_gaussian_kl() -> None:
    name = "ddpm"
    proc = get_process(name, num_steps=8)
    model = _gmm_model(proc, name, seed=1)
    solver = DraftSolver(k=3, kl_weight=1.0)
    ft = _context(proc, model, solver, LinearReward([1.0, 0.0]), seed=2)
    gen_state = ft.generator.get_state()
    out = next(solver.iteration(ft.ctx))
    # replay the same rollout and sum ‖m_θ − m_base‖²/(2s²) over the last 3 steps with s > 0
    from soctune.trajectory import model_step, rollout

    ft.generator.set_state(gen_state)
    ft.ctx.sample_cond()
    traj = rollout(proc, model, batch_size=32, sample_shape=(2,), generator=ft.generator)
    expect = 0.0
    with torch.no_grad():
        for k in range(5, 8):
            s = float(traj.stds[k])
            if s == 0:
                continue
            m = model_step(proc, model, traj.xs[k], k, None, traj.states[k]).mean
            with model.base():
                mb = model_step(proc, model, traj.xs[k], k, None, traj.states[k]).mean
            expect += float(((m - mb) ** 2).sum(1).mean() / (2 * s**2))
    assert expect > 0
    assert out.metrics["kl"] == pytest.approx(expect, rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(-out.metrics["reward_mean"] + expect, rel=1e-4)


def test_impossible_pairs_fail_with_one_line_errors() -> None:
    gmm_proc = get_process("ddpm", num_steps=8, noise_scale=0.0)
    model = _gmm_model(gmm_proc, "ddpm")
    reward = LinearReward([1.0, 0.0])
    with pytest.raises(SoctuneError, match="stochastic step before the last") as exc:
        Trainer(gmm_proc, model, DraftSolver(lv_samples=4), reward, (2,))
    assert "\n" not in str(exc.value)
    Trainer(gmm_proc, model, DraftSolver(k=2), reward, (2,))  # plain DRaFT runs on the ODE sampler
    em = get_process("euler-maruyama", num_steps=8)
    soc_model = CorrectedDenoiser(ZeroDenoiser(), 2, hidden=16, depth=1)
    with pytest.raises(SoctuneError, match="x̂₁"):
        Trainer(em, soc_model, DraftSolver(variant="refl"), reward, (2,))
    with pytest.raises(SoctuneError, match="refl_k_min"):
        Trainer(gmm_proc, model, DraftSolver(variant="refl", refl_k_min=8), reward, (2,))
    for bad in ({"k": 0}, {"k": "some"}, {"variant": "reinforce"}, {"lv_samples": 2, "k": 3},
                {"lv_samples": 2, "variant": "refl"}, {"variant": "refl", "k": "all"}, {"kl_weight": -1.0}, {"reward_scale": 0.0}):
        with pytest.raises(SoctuneError):
            get_solver("draft", **bad)
    with pytest.raises(SoctuneError, match="bad options"):
        get_solver("draft", K=3)
