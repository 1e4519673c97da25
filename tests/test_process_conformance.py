"""Conformance of every registered process to the trajectory interface.

Parametrised over ``soctune.sde.list_processes()`` plus the processes registered by helper
modules in tests/ (e.g. ``user_ou``), each built with its default options and a tiny model it
accepts (:func:`helpers.tiny_model_for`), plus a few non-default variants of the built-ins. A
newly registered process is covered here with no test edits.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchsde

from helpers import DIM, conformance_process_names, tiny_model_for
from soctune.sde import Process, get_process
from soctune.trajectory import GradSpec, Trajectory, base_states, model_step, rollout

K = 6
B = 8

# non-default options of built-ins whose kernels differ (kept only if the process is registered)
EXTRA_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("dpmpp-sde", {"order": 2}),
    ("dpmpp-sde", {"final_sigmas_type": "zero"}),
    ("dpmpp-sde", {"order": 2, "final_sigmas_type": "zero"}),
    ("dpmpp-sde", {"order": 2, "num_steps": 16}),  # order 2 through the last step (K ≥ 15, σ_min)
    ("fm-memoryless", {"kernel": "euler"}),
    ("fm-memoryless", {"noise_scale": 0.5}),
    ("ddpm", {"scheduler_config": {"clip_sample": True, "beta_schedule": "squaredcos_cap_v2"}}),
]

_NAMES = conformance_process_names()
CASES = [(name, {}) for name in _NAMES] + [(n, o) for n, o in EXTRA_VARIANTS if n in _NAMES]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items() if k != "scheduler_config")
       + ("-cfg" if "scheduler_config" in opts else "") for name, opts in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[Process, torch.nn.Module]:
    name, opts = request.param
    process = get_process(name, **{"num_steps": K, **opts})
    return process, tiny_model_for(process)


def _roll(process: Process, model: Any, seed: int = 0, **kw: Any) -> Trajectory:
    return rollout(process, model, batch_size=B, sample_shape=(DIM,),
                   generator=torch.Generator().manual_seed(seed), **kw)


def _reward(x: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear reward [B, D] -> [B]."""
    return torch.sin(x).sum(-1) - 0.1 * (x**2).sum(-1)


def test_shapes_and_dtypes(case: tuple[Process, Any]) -> None:
    process, model = case
    n = process.num_steps
    traj = _roll(process, model)
    assert traj.ts.shape == (n + 1,) and traj.ts.dtype == torch.float64
    assert bool((traj.ts[1:] > traj.ts[:-1]).all()), "the grid must move forward in generation time"
    assert 0.0 <= float(traj.ts[0]) and float(traj.ts[-1]) <= 1.0
    assert traj.xs.shape == (n + 1, B, DIM) and traj.xs.dtype == torch.float32
    for t in (traj.noises, traj.means):
        assert t.shape == (n, B, DIM) and t.dtype == torch.float32
    assert traj.stds.shape == (n,) and traj.stds.dtype == torch.float32 and bool((traj.stds >= 0).all())
    assert traj.x1_hats is None or (traj.x1_hats.shape == (n, B, DIM) and traj.x1_hats.dtype == torch.float32)
    assert len(traj.states) == n and traj.num_steps == n and traj.batch_size == B
    assert traj.x_final.shape == (B, DIM) and torch.isfinite(traj.xs).all()
    lp = traj.log_probs()
    assert lp.shape == (n, B) and lp.dtype == torch.float32
    # every step is x_{k+1} = mean_k + std_k·ξ_k with the recorded ξ
    torch.testing.assert_close(traj.xs[1:], traj.means + traj.stds[:, None, None] * traj.noises, rtol=0, atol=1e-6)


def test_same_seed_same_result(case: tuple[Process, Any]) -> None:
    process, model = case
    a, b = _roll(process, model, seed=3), _roll(process, model, seed=3)
    assert torch.equal(a.xs, b.xs) and torch.equal(a.noises, b.noises)
    c = _roll(process, model, seed=4)
    assert not torch.equal(a.xs[-1], c.xs[-1])


def test_replay_reproduces_states(case: tuple[Process, Any]) -> None:
    process, model = case
    traj = _roll(process, model, seed=1)
    replay = rollout(process, model, x_init=traj.xs[0], noises=traj.noises)
    assert torch.equal(replay.xs, traj.xs)
    assert torch.equal(replay.means, traj.means) and torch.equal(replay.stds, traj.stds)
    # a shorter replay (ReFL's early stop) reproduces the prefix
    short = rollout(process, model, x_init=traj.xs[0], noises=traj.noises, stop_at=process.num_steps - 1)
    assert torch.equal(short.xs, traj.xs[:-1])


def test_single_step_replay_from_recorded_state(case: tuple[Process, Any]) -> None:
    """What solvers do: recompute step k's kernel from (x_k, states[k]) after the fact."""
    process, model = case
    traj = _roll(process, model, seed=7)
    for k in range(traj.num_steps):
        x = traj.xs[k].clone().requires_grad_(True)
        out = model_step(process, model, x, k, traj.cond, traj.states[k])
        assert torch.equal(out.mean.detach(), traj.means[k]) and torch.equal(out.std.detach(), traj.stds[k])
        # the mean map is differentiable in x_k (the recorded state enters as a constant)
        (g,) = torch.autograd.grad(out.mean.sum(), x)
        assert torch.isfinite(g).all()


def test_base_states_are_the_base_chains_own(case: tuple[Process, Any]) -> None:
    """base_states along a BASE rollout are that rollout's states (the base chain replays itself); along
    a fine-tuned rollout, a stateless process gets its states back unchanged."""
    process, model = case
    with model.base():
        traj = _roll(process, model, seed=5)
    replayed = base_states(process, model, traj)
    assert len(replayed) == len(traj.states)
    for ours, theirs in zip(replayed, traj.states):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    tuned = _roll(process, model, seed=5)
    if not any(tuned.states):
        assert base_states(process, model, tuned) is tuned.states


def test_log_prob_equals_torch_normal(case: tuple[Process, Any]) -> None:
    process, model = case
    traj = _roll(process, model, seed=2)
    lp = traj.log_probs()
    stochastic = traj.stochastic_steps()
    assert stochastic, "a process needs at least one stochastic step"
    for k in range(traj.num_steps):
        if k in stochastic:
            ref = torch.distributions.Normal(traj.means[k].double(), traj.stds[k].double()).log_prob(
                traj.xs[k + 1].double()).sum(-1)
            torch.testing.assert_close(lp[k].double(), ref, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(Process.log_prob(traj.xs[k + 1], traj.means[k], traj.stds[k]).double(), ref,
                                       rtol=1e-5, atol=1e-4)
        else:  # deterministic step: no density term, and no noise enters
            assert float(traj.stds[k]) == 0.0 and torch.equal(lp[k], torch.zeros_like(lp[k]))
            assert torch.equal(traj.xs[k + 1], traj.means[k])


def test_grad_specs_agree(case: tuple[Process, Any]) -> None:
    process, model = case
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the tiny model must have trainable parameters"
    runs: dict[str, Trajectory] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    specs = {"none": GradSpec.none(), "last2": GradSpec.last(2), "all-ckpt": GradSpec.all(checkpoint=True),
             "all-plain": GradSpec.all(checkpoint=False)}
    for key, spec in specs.items():
        traj = _roll(process, model, seed=5, grad=spec)
        runs[key] = traj
        if key == "none":
            assert not traj.x_final.requires_grad
            continue
        model.zero_grad(set_to_none=True)
        _reward(traj.x_final).mean().backward()
        grads[key] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    ref = runs["none"]
    for key, traj in runs.items():
        assert torch.equal(traj.xs, ref.xs), key
        assert torch.equal(traj.means, ref.means) and torch.equal(traj.stds, ref.stds), key
        assert (traj.x1_hats is None) == (ref.x1_hats is None), key
        if ref.x1_hats is not None:
            assert torch.equal(traj.x1_hats, ref.x1_hats), key
        assert (traj.x1_hat_final is None) == (ref.x1_hat_final is None), key
    total = sum(float(g.abs().sum()) for g in grads["all-plain"])
    assert total > 0, "the reward gradient must reach the model"
    for g_ckpt, g_plain in zip(grads["all-ckpt"], grads["all-plain"]):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-8)
    assert sum(float(g.abs().sum()) for g in grads["last2"]) > 0


def test_as_torchsde_runs(case: tuple[Process, Any]) -> None:
    process, model = case
    sde = process.as_torchsde(model, sample_shape=(DIM,))
    assert callable(sde.f) and callable(sde.g)
    assert sde.noise_type == "diagonal" and sde.sde_type == "ito"
    # from t_1 (the first grid point past any t = 0 singularity) to the last model time
    t_a, t_b = float(process.ts[1]), float(process.ts[-2])
    if t_b <= t_a:
        t_a = float(process.ts[0])
    traj = _roll(process, model, seed=6)
    y0 = traj.xs[1].reshape(B, -1)
    t = torch.tensor(t_a, dtype=y0.dtype)
    assert sde.f(t, y0).shape == y0.shape and sde.g(t, y0).shape == y0.shape
    with torch.no_grad():
        ys = torchsde.sdeint(sde, y0, torch.tensor([t_a, t_b]), method="euler", dt=(t_b - t_a) / 20)
    assert ys.shape == (2, B, DIM) and torch.isfinite(ys).all()
