"""Adjoint Matching: the adjoint sweeps are exact gradients, the loss runs, the warnings fire,
and the solver recovers a closed-form optimal control on a user-defined SDE."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from soctune import TrainConfig, Trainer
from soctune.models.base import CorrectedDenoiser, Denoiser, ZeroDenoiser
from soctune.models.gmm import GaussianMixture, GaussianMixtureDenoiser, two_mode_mixture
from soctune.registry import SoctuneError
from soctune.rewards.base import LinearReward, QuadraticReward
from soctune.sde import PROCESSES, get_process
from soctune.sde.euler_maruyama import EulerMaruyama
from soctune.solvers import FinetuneContext, get_solver
from soctune.solvers.adjoint_matching import AdjointMatching
from soctune.trajectory import GradSpec, model_step, rollout

LAM = 1.3


def _gaussian_processes() -> list[str]:
    get_process("ddpm", num_steps=2)  # loads the built-in registry
    names = ["ddpm", "fm-memoryless"]
    return names + (["dpmpp-sde"] if "dpmpp-sde" in PROCESSES else [])


def _gmm_model(process: Any) -> CorrectedDenoiser:
    pt = process.accepts[0]  # epsilon for VP processes, velocity for flow matching
    return CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, pt), 2, hidden=32, depth=2)


def _ctx(process: Any, model: Denoiser, reward: Any, batch: int = 8, seed: int = 0) -> FinetuneContext:
    return FinetuneContext(process=process, model=model, reward=reward, sample_shape=(2,), batch_size=batch,
                           generator=torch.Generator().manual_seed(seed))


def _perturb(model: CorrectedDenoiser, seed: int = 1, scale: float = 0.3) -> None:
    """Give the zero-initialised correction a non-zero output, so fine-tuned ≠ base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.correction.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


class _InputRecorder(Denoiser):
    """Records every model input x_k with its graph, so autograd can give ∂(·)/∂x_k."""

    def __init__(self, inner: Denoiser) -> None:
        super().__init__()
        self.inner = inner
        self.prediction_type = inner.prediction_type
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if x.requires_grad:
            x.retain_grad()
            self.inputs.append(x)
        return self.inner(x, t, cond)

    def base(self):  # type: ignore[override]
        return self.inner.base()


def _process_for_exactness(name: str) -> Any:
    # a multistep solver's state (previous x̂₁) is a constant for the adjoint, so autograd through
    # a replay only agrees for the one-step kernel
    opts: dict[str, Any] = {"num_steps": 12}
    if name == "dpmpp-sde":
        import inspect

        if "order" in inspect.signature(PROCESSES.get(name)).parameters:
            opts["order"] = 1
    return get_process(name, **opts)


@pytest.mark.parametrize("name", _gaussian_processes())
def test_lean_adjoint_is_the_base_chain_gradient(name: str) -> None:
    """ã_k (solver) = ∂(−λ r(x_K))/∂x_k through a base-model replay with the same noise."""
    torch.manual_seed(0)
    process = _process_for_exactness(name)
    model = _gmm_model(process)
    _perturb(model)  # the lean adjoint must ignore the fine-tuned weights
    reward = QuadraticReward(c=(1.0, 0.5), scale=0.7)
    solver = AdjointMatching(reward_scale=LAM)
    ctx = _ctx(process, model, reward)
    with model.base():
        traj = rollout(process, model, batch_size=8, sample_shape=(2,), generator=torch.Generator().manual_seed(3))
    adj = solver.lean_adjoint(ctx, traj)
    assert adj.shape == (traj.num_steps + 1, 8, 2)

    rec = _InputRecorder(model)
    x0 = traj.xs[0].clone().requires_grad_(True)
    with model.base():
        replay = rollout(process, rec, x_init=x0, noises=traj.noises, grad=GradSpec.all(checkpoint=False))
    assert torch.equal(replay.xs, traj.xs)
    (-LAM * reward(replay.x_final).sum()).backward()
    grads = [x0.grad] + [x.grad for x in rec.inputs[1:]]
    assert len(grads) == traj.num_steps
    for k, g in enumerate(grads):
        ref = g if g is not None else torch.zeros_like(adj[k])
        err = float((adj[k] - ref).norm() / ref.norm().clamp(min=1e-12))
        # measured ≤ 6e-8 (float32 chain, float64 mixture model); 0 where the map ignores x_k
        assert err <= 1e-4 or float(ref.norm()) < 1e-12 and float(adj[k].norm()) < 1e-9, (k, err)
    xk = traj.xs[-1].clone().requires_grad_(True)
    (g_r,) = torch.autograd.grad(reward(xk).sum(), xk)
    assert torch.allclose(adj[-1], -LAM * g_r)


@pytest.mark.skipif("dpmpp-sde" not in _gaussian_processes(), reason="dpmpp-sde is not registered")
def test_lean_adjoint_holds_multistep_state_constant() -> None:
    """Order-2 dpmpp-sde: the previous x̂₁ in the step state is a constant of the adjoint (DESIGN §4),
    so ã_k equals the gradient through a base replay that feeds each step its recorded state."""
    process = get_process("dpmpp-sde", num_steps=10, order=2)
    model = _gmm_model(process)
    reward = QuadraticReward(c=(1.0, 0.5), scale=0.7)
    with model.base():
        traj = rollout(process, model, batch_size=6, sample_shape=(2,), generator=torch.Generator().manual_seed(5))
    assert any(traj.states[k] for k in range(traj.num_steps))  # order 2 does carry state
    adj = AdjointMatching(reward_scale=LAM).lean_adjoint(_ctx(process, model, reward, batch=6), traj)
    xs = [traj.xs[0].clone().requires_grad_(True)]
    with model.base():
        for k in range(traj.num_steps):
            x = model_step(process, model, xs[-1], k, None, traj.states[k]).mean + traj.stds[k] * traj.noises[k]
            x.retain_grad()
            xs.append(x)
    assert torch.allclose(torch.stack([v.detach() for v in xs]), traj.xs, atol=1e-5)
    (-LAM * reward(xs[-1]).sum()).backward()
    for k in range(traj.num_steps + 1):
        ref = xs[k].grad
        assert float((adj[k] - ref).norm() / ref.norm().clamp(min=1e-12)) <= 1e-4, k


@pytest.mark.parametrize("name", ["ddpm", "fm-memoryless"])
def test_basic_adjoint_is_the_cost_to_go_gradient(name: str) -> None:
    """a_k (basic) = ∂/∂x_k [Σ_{j≥k, s_j>0} ½‖u_j‖² − λ r(x_K)] through a FINE-TUNED replay with the
    same noise, u_j = (m_θ(x_j) − m_base(x_j))/s_j."""
    torch.manual_seed(0)
    process = get_process(name, num_steps=10)
    model = _gmm_model(process)
    _perturb(model)
    reward = LinearReward((0.5, -0.25))
    solver = AdjointMatching(reward_scale=LAM, variant="basic")
    ctx = _ctx(process, model, reward)
    with torch.no_grad():
        traj = rollout(process, model, batch_size=6, sample_shape=(2,), generator=torch.Generator().manual_seed(4))
    adj = solver.basic_adjoint(ctx, traj)

    xs: list[Tensor] = [traj.xs[0].clone().requires_grad_(True)]
    cost = torch.zeros(())
    x = xs[0]
    for k in range(traj.num_steps):
        out = model_step(process, model, x, k, None, {})
        with model.base():
            m_base = model_step(process, model, x, k, None, {}).mean
        s = traj.stds[k]
        if float(s) > 0:
            cost = cost + 0.5 * ((out.mean - m_base) / s).pow(2).sum()
        x = out.mean + s * traj.noises[k]
        x.retain_grad()
        xs.append(x)
    assert torch.allclose(torch.stack([v.detach() for v in xs]), traj.xs, atol=1e-5)
    (cost - LAM * reward(x).sum()).backward()
    for k in range(traj.num_steps + 1):
        ref = xs[k].grad
        err = float((adj[k] - ref).norm() / ref.norm().clamp(min=1e-12))
        assert err <= 1e-4 or float(ref.norm()) < 1e-12, (k, err)  # measured ≤ 1e-6


@pytest.mark.parametrize("name", _gaussian_processes())
@pytest.mark.parametrize("options", [
    {},
    {"estimator": "pathwise"},
    {"variant": "basic", "num_loss_steps": 4, "num_last_steps": 2, "loss_clip": 5.0, "reward_grad_clip": 0.5},
    {"step_weighting": "prediction"},
])
def test_two_iterations_are_finite(name: str, options: dict[str, Any]) -> None:
    process = get_process(name, num_steps=8)
    model = _gmm_model(process)
    solver = get_solver("adjoint-matching", reward_scale=1.0, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a memoryless process must not warn
        ft = Trainer(process, model, solver, LinearReward((0.5, 0.0)), (2,), TrainConfig(iters=2, batch_size=16))
    before = [p.detach().clone() for p in model.trainable_parameters()]
    history = ft.train()
    assert len(history) == 2
    for m in history:
        pathwise = solver.estimator_for((2,)) == "pathwise"
        for key in ("loss", "reward_mean", "reward_std", "soc_cost", "control_cost", "grad_norm") + (
                ("adjoint_norm",) if pathwise else ()):
            assert math.isfinite(m[key]), (key, m)
        assert m["updates"] == 1.0
    assert history[0]["control_cost"] == 0.0  # the zero-initialised correction is the base model
    assert history[1]["loss"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.trainable_parameters()))


@pytest.mark.parametrize("name", ["fm-memoryless", "ddpm"])
@pytest.mark.parametrize("variates", [{}, {"cost_to_go": "quadratic", "baseline": "mean"}], ids=["default", "plain"])
def test_score_target_has_the_basic_adjoints_mean(name: str, variates: dict[str, str]) -> None:
    """Stein's identity: E[(C_{k+1} − b)ξ_k/s_k] = E[a_{k+1}] (basic adjoint) at every stochastic
    step, for a control that is not the optimum — with the default control variates (log-ratio
    cost-to-go, state baseline) as with the plain target. Smooth problem (one Gaussian, quadratic
    reward) so both estimators have finite variance; 20 000 paths, K = 6. Measured over seeds 0–4:
    the largest |z| of the per-coordinate difference of batch means is 2.4 (fm-memoryless) and 2.7
    (ddpm) for the plain target, 3.0 and 2.7 with the control variates; the lean adjoint, whose mean
    differs away from the optimum, gives |z| up to 81 against the same score target, so the bound
    4.5 has power."""
    process = get_process(name, num_steps=6)
    base = GaussianMixtureDenoiser(GaussianMixture.isotropic([1.0], [[1.0, -0.5]], 0.5), process, process.accepts[0])
    model = CorrectedDenoiser(base, 2, hidden=16, depth=1)
    _perturb(model, scale=0.3)
    solver = AdjointMatching(reward_scale=LAM, estimator="score", **variates)
    n = 20_000
    with torch.no_grad():
        traj = rollout(process, model, batch_size=n, sample_shape=(2,), generator=torch.Generator().manual_seed(0))
    ctx = _ctx(process, model, QuadraticReward(c=(0.5, 1.0), scale=0.5), batch=n)
    score = solver.score_pass(ctx, traj).adjoints
    basic = solver.adjoint_pass(ctx, traj, "basic").adjoints
    assert traj.stochastic_steps()
    for k in traj.stochastic_steps():
        d = (score[k + 1] - basic[k + 1]).double()
        z = (d.mean(0) / (d.std(0) / math.sqrt(n))).abs().max()
        assert float(z) < 4.5, (k, float(z))


def test_state_baseline_never_reads_its_own_cost() -> None:
    """b_i must not depend on c_i (else the score target is biased): changing one sample's cost leaves
    its own baseline unchanged, bit for bit, also through the bandwidth choice; and on costs that are
    a function of the state plus noise it removes most of the state's part (second moment of c − b
    against c − leave-one-out mean: 0.35 vs 2.4 on this draw; the bound 0.6 leaves room for other draws)."""
    from soctune.solvers.adjoint_matching import loo_mean, state_baseline
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    c = 3.0 * (x[:, 0] > 0).double() + 0.3 * torch.randn(256, generator=g, dtype=torch.float64)
    b = state_baseline(x, c)
    for i in (0, 5, 255):
        c2 = c.clone()
        c2[i] += 100.0
        assert float(state_baseline(x, c2)[i]) == float(b[i])
    assert float((c - b).pow(2).mean()) < 0.6 < float((c - loo_mean(c)).pow(2).mean())


def test_score_estimator_trains_on_a_reward_without_gradient() -> None:
    """estimator="score" never differentiates the reward: a step reward 1{x₁ > 0} (zero gradient
    almost everywhere, built without autograd) still moves the model and keeps the loss finite."""
    process = get_process("fm-memoryless", num_steps=8)
    model = _gmm_model(process)

    def step_reward(x: Tensor, cond: Any = None) -> Tensor:
        return (x.detach()[:, 0] > 0).float()

    before = [p.detach().clone() for p in model.trainable_parameters()]
    ft = Trainer(process, model, AdjointMatching(estimator="score"), step_reward, (2,),
                   TrainConfig(iters=2, batch_size=32))
    history = ft.train()
    for m in history:
        for key in ("loss", "reward_mean", "soc_cost", "control_cost", "grad_norm"):
            assert math.isfinite(m[key]), (key, m)
    assert history[1]["loss"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.trainable_parameters()))


def test_loss_step_selection_is_unbiased() -> None:
    solver = AdjointMatching(num_loss_steps=5, num_last_steps=2)
    stochastic = list(range(12))  # e.g. a 13-step chain whose last step is deterministic
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(12)
    for _ in range(2000):
        sel = solver.loss_steps(stochastic, g)
        assert len(sel) == 5 and [k for k, _ in sel[-2:]] == [10, 11]
        for k, w in sel:
            counts[k] += w
    # E[Σ_selected w_k 1{k = j}] = 1 for every step j: the estimator of Σ_k f_k is unbiased
    assert torch.allclose(counts / 2000, torch.ones(12), atol=0.1)  # binomial sd ≈ 0.04
    assert AdjointMatching().loss_steps(stochastic, g) == [(k, 1.0) for k in stochastic]


def test_deterministic_steps_are_excluded_but_carry_the_adjoint() -> None:
    process = get_process("fm-memoryless", num_steps=6)
    model = _gmm_model(process)
    solver = AdjointMatching()
    with torch.no_grad():
        traj = rollout(process, model, batch_size=4, sample_shape=(2,), generator=torch.Generator().manual_seed(0))
    assert float(traj.stds[-1]) == 0 and traj.num_steps - 1 not in traj.stochastic_steps()
    adj = solver.lean_adjoint(_ctx(process, model, LinearReward((1.0, 0.0)), batch=4), traj)
    # through the deterministic last step x_K = x̂₁(x_{K−1}) the adjoint is −λ (∂x̂₁/∂x)ᵀ a, not a copy
    assert not torch.allclose(adj[-2], adj[-1])
    assert float(adj[-2].norm()) > 0


@pytest.mark.parametrize("process_name, options", [("fm-memoryless", {"noise_scale": 0.5}),
                                                    ("euler-maruyama", {"num_steps": 5})])
def test_non_memoryless_process_warns(process_name: str, options: dict[str, Any]) -> None:
    process = get_process(process_name, **options)
    if process_name == "euler-maruyama":
        model: Denoiser = CorrectedDenoiser(ZeroDenoiser(), 2, hidden=16, depth=1)
    else:
        model = _gmm_model(process)
    with pytest.warns(UserWarning, match="NOT the reward tilt.*fm-memoryless"):
        Trainer(process, model, AdjointMatching(), LinearReward((1.0, 0.0)), (2,), TrainConfig(iters=1))


def test_fixed_start_user_sde_does_not_warn_and_warnings_point_at_the_caller() -> None:
    """X_0 fixed (prior_std = 0) is independent of X_1: the chain is memoryless, AM's samples are
    the tilt, no warning. A warning that does fire is attributed to the user's line, not to
    soctune's internals."""
    model: Denoiser = CorrectedDenoiser(ZeroDenoiser(), 2, hidden=16, depth=1)
    fixed = get_process("euler-maruyama", num_steps=5, prior_std=0.0)
    assert fixed.memoryless
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(fixed, model, AdjointMatching(), LinearReward((1.0, 0.0)), (2,), TrainConfig(iters=1))
    with pytest.warns(UserWarning, match="NOT the reward tilt") as record:
        Trainer(get_process("euler-maruyama", num_steps=5), model, AdjointMatching(), LinearReward((1.0, 0.0)),
                (2,), TrainConfig(iters=1))
    assert record[0].filename == __file__


def test_auto_options_follow_the_model_and_the_state_size() -> None:
    """``estimator="auto"``: the score target on small states, the pathwise adjoint on images or
    with an adjoint-only option; ``step_weighting="auto"``: control units for a control-units
    model, prediction units otherwise."""
    from soctune.models.control import ControlGainDenoiser
    from soctune.solvers.base import control_units

    am = AdjointMatching()
    assert am.estimator_for((2,)) == "score" and am.estimator_for((1, 8, 8)) == "pathwise"
    assert am.estimator_for((8,)) == "score" and am.estimator_for((10,)) == "pathwise"  # 8-D mixtures / SOC problems
    assert AdjointMatching(bootstrap=0.2).estimator_for((2,)) == "pathwise"
    assert AdjointMatching(estimator="pathwise").estimator_for((2,)) == "pathwise"
    process = get_process("fm-memoryless", num_steps=6)
    plain = _gmm_model(process)
    gain = ControlGainDenoiser(plain.base_model, process, (2,), hidden=8, depth=1)
    assert not control_units(plain) and control_units(gain)
    with torch.no_grad():
        traj = rollout(process, plain, batch_size=2, sample_shape=(2,), generator=torch.Generator().manual_seed(0))
    ks = traj.stochastic_steps()
    assert set(am.step_weights(process, gain, traj, ks).values()) == {1.0}
    assert am.step_weights(process, plain, traj, ks) == AdjointMatching(step_weighting="prediction").step_weights(
        process, plain, traj, ks)


def test_bad_options_are_one_line_errors() -> None:
    for opts in ({"variant": "fancy"}, {"num_loss_steps": 0}, {"num_loss_steps": 2, "num_last_steps": 3},
                 {"loss_clip": -1.0}, {"step_weighting": "snr"}, {"estimator": "mc"},
                 {"baseline": "median"}, {"cost_to_go": "kl"},
                 {"estimator": "score", "variant": "basic"}, {"estimator": "score", "bootstrap": 0.5}):
        with pytest.raises(SoctuneError):
            AdjointMatching(**opts)
    with pytest.raises(SoctuneError, match="noise"):
        AdjointMatching().check(get_process("fm-memoryless", num_steps=4, noise_scale=0.0), None)  # type: ignore[arg-type]


def test_linear_soc_problem_recovers_the_constant_optimal_control() -> None:
    """dX = σ u dt + σ dW on [0, 1], X_0 = 0, reward r(x) = aᵀx: V_t(x) = −λaᵀx − λ²σ²‖a‖²(1−t)/2,
    so u* = −σ∇V = σλa (constant) and J* = −log E[exp(λaᵀX_1)] = −λ²σ²‖a‖²/2. For the Euler chain
    the discrete optimum is the same control at any step size (the value function is linear)."""
    sigma, lam = 0.8, 1.5
    a = torch.tensor([1.0, -0.5])
    process = EulerMaruyama(diffusion=sigma, num_steps=20, prior_std=0.0, memoryless=True)
    torch.manual_seed(0)
    model = CorrectedDenoiser(ZeroDenoiser(), 2, hidden=32, depth=2)
    ft = Trainer(process, model, AdjointMatching(reward_scale=lam), LinearReward(a), (2,),
                   TrainConfig(iters=150, batch_size=256, lr=1e-2, seed=0))
    ft.train()
    u_star = sigma * lam * a
    with torch.no_grad():
        traj = rollout(process, model, batch_size=512, sample_shape=(2,), generator=torch.Generator().manual_seed(9))
        sq = [(model(traj.xs[k], torch.full((512,), process.model_time(k))) - u_star).pow(2).sum(1).mean()
              for k in range(process.num_steps)]
    rel_l2 = float(torch.stack(sq).mean().sqrt()) / float(u_star.norm())
    # relative L2 error of the learned control along fine-tuned paths, seeds 0-4 (150 iterations of
    # 256): 0.051-0.092 with the default estimator (the score target on these 2-D states); the pathwise
    # adjoint, exact and noise-free on a linear reward, reaches 0.004-0.005 (estimator="pathwise")
    assert rel_l2 < 0.12, rel_l2
    j_star = -0.5 * lam**2 * sigma**2 * float(a.pow(2).sum())
    j = sum(h["soc_cost"] for h in ft.history[-20:]) / 20
    # |J − J*| measured ≤ 0.026 over seeds 0-4; the 20-iteration mean of λr has sd ≈ 0.04
    assert abs(j - j_star) < 0.15, (j, j_star)


@pytest.mark.parametrize("estimator, atol", [("pathwise", 1e-6), ("score", 1e-4)])
def test_step_by_step_backward_is_the_same_update(estimator: str, atol: float) -> None:
    """Without loss_clip the loss is backpropagated one step at a time (graph freed per step, memory
    flat in K) and stepped once; a huge loss_clip takes the single-graph path with scale 1. Same
    seed -> the same update up to float summation order (measured max |Δ| 1.5e-8 pathwise, 1.1e-5
    with the score target, whose per-sample targets are larger)."""
    process = get_process("fm-memoryless", num_steps=8)
    params = []
    for clip in (0.0, 1e30):
        torch.manual_seed(0)
        model = _gmm_model(process)
        solver = get_solver("adjoint-matching", reward_scale=1.0, loss_clip=clip, estimator=estimator)
        ft = Trainer(process, model, solver, LinearReward((0.5, 0.0)), (2,),
                       TrainConfig(iters=2, batch_size=16, lr=1e-2, seed=0))
        hist = ft.train()
        assert all(h["updates"] == 1.0 for h in hist)
        params.append(([p.detach().clone() for p in model.trainable_parameters()], hist))
    (pa, ha), (pb, hb) = params
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert ha[-1]["loss"] == pytest.approx(hb[-1]["loss"], rel=1e-5)
