"""Residual ∇-DB: score formulas, sub-sampling, residuals at the base, and short training runs."""

from __future__ import annotations

import math

import pytest
import torch

from soctune import TrainConfig, Trainer
from soctune.models.base import CorrectedDenoiser
from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
from soctune.registry import SoctuneError
from soctune.rewards.base import LinearReward
from soctune.sde import Process, get_process, list_processes
from soctune.solvers import get_solver
from soctune.solvers.base import FinetuneContext
from soctune.soc import path_costs
from soctune.solvers.nabla_db import (SocCostEstimate, forward_score, inclusion_weights, make_gamma, reverse_score,
                                      subsample_transitions, terminal_index)
from soctune.trajectory import model_step, rollout

PROCESSES = [("ddpm", "epsilon"), ("fm-memoryless", "velocity")]
if "dpmpp-sde" in dict(list_processes()):
    PROCESSES.append(("dpmpp-sde", "epsilon"))


def _setup(process_name: str, pred_type: str, num_steps: int = 8, batch: int = 16, **solver_options):
    torch.manual_seed(0)
    process = get_process(process_name, num_steps=num_steps)
    model = CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, pred_type), dim=2,
                              hidden=32, depth=2)
    solver = get_solver("nabla-db", **solver_options)
    ctx = FinetuneContext(process=process, model=model, reward=LinearReward([0.5, 0.0]), sample_shape=(2,),
                          batch_size=batch, generator=torch.Generator().manual_seed(0))
    solver.setup(ctx)
    solver._gamma_fn = make_gamma(process, solver.gamma_spec)
    traj = rollout(process, model, batch_size=batch, sample_shape=(2,), generator=torch.Generator().manual_seed(1))
    return process, model, solver, ctx, traj


@pytest.mark.parametrize("process_name,pred_type", PROCESSES)
def test_closed_form_scores_match_autograd_of_log_prob(process_name: str, pred_type: str) -> None:
    process, model, _, _, traj = _setup(process_name, pred_type)
    for k in traj.stochastic_steps():
        x = traj.xs[k].clone().requires_grad_(True)
        x_next = traj.xs[k + 1].clone().requires_grad_(True)
        out = model_step(process, model, x, k, None, traj.states[k])
        logp = Process.log_prob(x_next, out.mean, out.std).sum()
        g_next, g_x = torch.autograd.grad(logp, [x_next, x])
        closed = forward_score(x_next.detach(), out.mean.detach(), out.std)
        # compared in units of 1/s (the scores are O(1/s)); float32 rounding is ~1e-6 there
        s = float(out.std)
        torch.testing.assert_close(closed * s, g_next * s, rtol=1e-5, atol=1e-5)
        x2 = traj.xs[k].clone().requires_grad_(True)
        out2 = model_step(process, model, x2, k, None, traj.states[k])
        torch.testing.assert_close(reverse_score(traj.xs[k + 1], out2.mean, out2.std, x2), g_x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("process_name,pred_type", PROCESSES)
def test_residuals_vanish_at_the_base(process_name: str, pred_type: str) -> None:
    """Model = base (zero-initialised correction), g_φ zero-initialised: both residual scores
    are exactly zero, so the loss reduces to the forward-looking flow term."""
    _, _, solver, ctx, traj = _setup(process_name, pred_type)
    idx = torch.arange(traj.batch_size)
    for k in traj.stochastic_steps():
        res = solver.residual_scores(ctx, traj, k, None, idx, reverse=True)
        assert float(res["forward"].detach().abs().max()) == 0.0
        assert float(res["reverse"].detach().abs().max()) == 0.0
        tb = torch.full((traj.batch_size,), float(traj.ts[k]))
        assert float(solver.flow(traj.xs[k], tb).detach().abs().max()) == 0.0


def test_residual_scores_see_the_fine_tuned_mean() -> None:
    """Shift the correction: the forward residual becomes (m_θ − m_base)/s² (η = 1)."""
    process, model, solver, ctx, traj = _setup("ddpm", "epsilon")
    with torch.no_grad():
        model.correction.out.bias.fill_(0.3)
    k = traj.stochastic_steps()[2]
    res = solver.residual_scores(ctx, traj, k, None, torch.arange(traj.batch_size), reverse=True)
    m_ft = model_step(process, model, traj.xs[k], k, None, {}).mean
    with model.base():
        m_b = model_step(process, model, traj.xs[k], k, None, {}).mean
    torch.testing.assert_close(res["forward"], (m_ft - m_b) / traj.stds[k] ** 2, rtol=1e-4, atol=1e-4)
    assert float(res["reverse"].detach().abs().max()) > 0


def test_subsample_always_contains_the_last_stochastic_transition() -> None:
    gen = torch.Generator().manual_seed(0)
    stochastic = list(range(49))
    for transitions in (1, 2, 5, 0.1, 0.25, 1.0):
        for stratified in (True, False):
            for _ in range(50):
                ks = subsample_transitions(stochastic, transitions, gen, stratified)
                assert ks[-1] == 48 and ks == sorted(set(ks))
                expected = transitions if isinstance(transitions, int) else max(1, round(transitions * 49))
                assert len(ks) == expected
    # DDPM's last step is deterministic: the last stochastic transition is K−2, the terminal state x_{K−1}
    _, _, _, _, traj = _setup("ddpm", "epsilon", num_steps=10)
    assert traj.stochastic_steps()[-1] == 8 and terminal_index(traj) == 9


def test_inclusion_weights_give_an_unbiased_sum() -> None:
    """Σ_{k picked} g_k/π_k over subsample_transitions' draws averages to Σ_k g_k (Horvitz–Thompson): 4000
    draws per setting, within 4 standard errors of their mean; every step picked every time with
    transitions 1.0; the steps never picked (a count of 1: the last transition only) weigh ∞."""
    gen = torch.Generator().manual_seed(0)
    steps = list(range(23))
    g = torch.rand(len(steps), generator=gen, dtype=torch.float64) + 0.5
    for transitions in (0.25, 0.5, 3):
        for stratified in (True, False):
            w = inclusion_weights(steps, transitions, stratified)
            est = torch.tensor([sum(w[k] * float(g[k]) for k in subsample_transitions(steps, transitions, gen, stratified))
                                for _ in range(4000)], dtype=torch.float64)
            se = float(est.std()) / math.sqrt(est.numel())
            assert abs(float(est.mean()) - float(g.sum())) < 4 * se, (transitions, stratified)
    assert set(inclusion_weights(steps, 1.0).values()) == {1.0}
    w1 = inclusion_weights(steps, 1)
    assert w1[22] == 1.0 and all(math.isinf(w1[k]) for k in steps[:-1])


@pytest.mark.parametrize("process_name,pred_type", PROCESSES)
def test_logged_soc_cost_is_the_rollouts_cost(process_name: str, pred_type: str) -> None:
    """With every transition evaluated (transitions 1.0) the logged soc_cost equals J of the rollout by
    soctune.soc.path_costs (Σ ½‖u_k‖² − λr per sample; u_k from the rollout's recorded means), and it is
    split over two chunks of samples the way inner_steps splits them."""
    process, model, solver, ctx, traj = _setup(process_name, pred_type, transitions=1.0, reward_scale=2.0)
    with torch.no_grad():  # a non-zero control
        model.correction.out.weight.normal_(std=0.3)
        model.correction.out.bias.normal_(std=0.3)
    traj = rollout(process, model, batch_size=16, sample_shape=(2,), generator=torch.Generator().manual_seed(1))
    reward = ctx.reward(traj.xs[-1], None)
    T = terminal_index(traj)
    est = SocCostEstimate(solver, traj, T, reward)
    for idx in torch.arange(16).tensor_split(2):
        for k in range(T):
            est.add(k, solver.residual_scores(ctx, traj, k, None, idx, reverse=False)["control_sq"], idx)
    exact = path_costs(process, model, traj, reward, 2.0)
    metrics = est.metrics()
    assert metrics["control_cost"] > 0.01
    assert metrics["soc_cost"] == pytest.approx(float(exact.mean()), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("process_name,pred_type", PROCESSES)
def test_two_iterations_give_finite_losses(process_name: str, pred_type: str) -> None:
    process = get_process(process_name, num_steps=10)
    model = CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, pred_type), dim=2,
                              hidden=32, depth=2)
    solver = get_solver("nabla-db", transitions=4, inner_steps=2, reg_weight=1.0)
    ft = Trainer(process, model, solver, LinearReward([0.5, 0.0]), (2,), TrainConfig(iters=2, batch_size=16, lr=1e-2))
    hist = ft.train()
    assert len(hist) == 2
    for h in hist:
        assert h["updates"] == 2.0
        for key in ("loss", "loss_forward", "loss_reverse", "loss_terminal", "reward_mean", "reward_std",
                    "control_cost", "soc_cost"):
            assert math.isfinite(h[key]), (key, h)
        assert h["soc_cost"] == pytest.approx(h["control_cost"] - h["reward_mean"], abs=1e-5)  # λ = 1
    # after the first update the trust-region term sees the moved policy
    assert hist[-1]["loss_reg"] > 0
    # the flow network is trained with the model
    assert any(float(p.abs().max()) > 0 for p in solver.flow.net.out.parameters())


def test_no_flow_variant_has_no_flow_network() -> None:
    process = get_process("ddpm", num_steps=8)
    model = CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, "epsilon"), dim=2,
                              hidden=32, depth=2)
    solver = get_solver("nabla-db", no_flow=True, transitions=3)
    ft = Trainer(process, model, solver, LinearReward([0.5, 0.0]), (2,), TrainConfig(iters=1, batch_size=8))
    assert solver.flow is None and len(list(solver.parameters())) == 0
    h = ft.train()[-1]
    assert math.isfinite(h["loss"]) and h["loss_reverse"] == 0.0 and h["loss_terminal"] == 0.0


def test_image_shaped_data_gets_a_conv_flow_net() -> None:
    solver = get_solver("nabla-db")
    ctx = FinetuneContext(process=get_process("ddpm", num_steps=4), model=None, reward=None,  # type: ignore[arg-type]
                          sample_shape=(1, 8, 8), batch_size=2, generator=torch.Generator())
    solver.setup(ctx)
    assert solver.flow.kind == "conv"
    out = solver.flow(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert out.shape == (2, 1, 8, 8) and float(out.detach().abs().max()) == 0.0


def test_bad_options_raise_one_line_errors() -> None:
    for opts in ({"transitions": 1.5}, {"transitions": 0}, {"gamma": "cosine"}, {"step_weighting": "x"},
                 {"lookahead_model": "ema"}, {"prior_strength": 0.0}, {"inner_steps": 0}, {"reverse_target": "x"},
                 {"reverse_target": "chain", "no_flow": True},
                 {"reverse_target": "chain", "reverse_trains_policy": True}):
        with pytest.raises(SoctuneError):
            get_solver("nabla-db", **opts)


@pytest.mark.parametrize("process_name,pred_type", PROCESSES)
def test_prediction_weighting_is_the_residual_in_prediction_units(process_name: str, pred_type: str) -> None:
    """step_weighting="prediction": w_k‖fwd_k − target‖² = ‖c_k⁻¹s_k²(fwd_k − target)‖², i.e. the
    forward term measured as a change of the model prediction, since the kernel mean is affine in
    the prediction with slope c_k (checked here on a random perturbation of the prediction)."""
    from soctune.trajectory import prediction_coefficients

    process, model, solver, ctx, traj = _setup(process_name, pred_type, step_weighting="prediction")
    coef = prediction_coefficients(process, traj)
    for k in traj.stochastic_steps():
        x = traj.xs[k]
        pred = torch.randn_like(x)
        delta = torch.randn_like(x)
        m0 = process.step_kernel(x, k, pred, traj.states[k], traj.prediction_type).mean
        m1 = process.step_kernel(x, k, pred + delta, traj.states[k], traj.prediction_type).mean
        torch.testing.assert_close(m1 - m0, float(coef[k]) * delta, rtol=1e-4, atol=1e-6)
        s2 = float(traj.stds[k]) ** 2
        assert solver._step_weight(process, traj, k) == pytest.approx((s2 / abs(float(coef[k]))) ** 2, rel=1e-9)
    ft = Trainer(process, model, solver, LinearReward([0.5, 0.0]), (2,), TrainConfig(iters=2, batch_size=16, lr=1e-2))
    assert all(math.isfinite(h["loss"]) for h in ft.train())


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_chain_target_is_the_reverse_condition_with_the_forward_one_substituted(eta: float) -> None:
    """reverse residual + J_bᵀ·forward residual = (J_θ − J_b)ᵀ(x_{k+1} − m_θ)/s² (zero mean under the
    rollout's step), for any prior strength η: the identity behind reverse_target="chain"."""
    process, model, solver, ctx, traj = _setup("ddpm", "epsilon", prior_strength=eta)
    torch.manual_seed(3)
    with torch.no_grad():  # a moved policy whose Jacobian differs from the base's
        for p in model.correction.parameters():
            p.add_(0.3 * torch.randn_like(p))
    idx = torch.arange(traj.batch_size)
    for k in traj.stochastic_steps()[:-1]:
        res = solver.residual_scores(ctx, traj, k, None, idx, reverse=True)
        lhs = res["reverse"] + solver.chain_target(ctx, traj, k, None, idx, res["forward"].detach())[0]
        x = traj.xs[k].clone().requires_grad_(True)
        m_ft = model_step(process, model, x, k, None, traj.states[k]).mean
        v = ((traj.xs[k + 1] - m_ft) / traj.stds[k] ** 2).detach()
        (jt,) = torch.autograd.grad(m_ft, x, grad_outputs=v)
        with model.base():
            x = traj.xs[k].clone().requires_grad_(True)
            (jb,) = torch.autograd.grad(model_step(process, model, x, k, None, traj.states[k]).mean, x, grad_outputs=v)
        s = float(traj.stds[k])  # compared in units of 1/s, as above
        torch.testing.assert_close(lhs.detach() * s, (jt - jb) * s, rtol=1e-4, atol=1e-4)


def _exact_flow_scores(process: Process, base: CorrectedDenoiser, xs: torch.Tensor, a: torch.Tensor,
                       T: int) -> list[torch.Tensor]:
    """∇_{x_k} log F̃ = λ (∂E[x_K | x_k]/∂x_k)ᵀ a at the states xs[k] [B, 2], k < T, for a Gaussian
    base (λ = 1): the mean maps are affine, so E[x_K | x_k] is the composition of the base mean maps."""
    out = []
    for k in range(T):
        xk = xs[k].clone().requires_grad_(True)
        y = xk
        with base.base():
            for j in range(k, process.num_steps):
                y = model_step(process, base, y, j, None, process.init_state()).mean
        (g,) = torch.autograd.grad((y * a).sum(), xk)
        out.append(g)
    return out


def chain_flow_error(seed: int, reverse_target: str = "chain", iters: int = 150) -> float:
    """Train ∇-DB (g_φ alone, γ = 0) on a Gaussian base with a linear reward, whose flow score is
    known in closed form (a constant per step, growing from ≈ 0 at the noise end to λa); the
    largest mean error of the learned flow score over the steps, on states of the fine-tuned
    chain, relative to ‖λa‖."""
    from soctune.models.gmm import GaussianMixture

    torch.manual_seed(seed)
    process = get_process("ddpm", num_steps=10)
    gauss = GaussianMixture.isotropic([1.0], [[1.0, -0.5]], 0.5)
    model = CorrectedDenoiser(GaussianMixtureDenoiser(gauss, process, "epsilon"), dim=2, hidden=32, depth=2)
    a = torch.tensor([0.5, -0.25])
    solver = get_solver("nabla-db", reverse_target=reverse_target, gamma="zero", transitions=1.0)
    ft = Trainer(process, model, solver, LinearReward(a), (2,),
                   TrainConfig(iters=iters, batch_size=64, lr=3e-3, seed=seed))
    ft.train()
    traj = rollout(process, model, batch_size=256, sample_shape=(2,), generator=torch.Generator().manual_seed(seed + 50))
    T = terminal_index(traj)
    errs = []
    for k, exact in enumerate(_exact_flow_scores(process, model, traj.xs, a, T)):
        tb = torch.full((traj.batch_size,), float(traj.ts[k]))
        learned = solver.flow(traj.xs[k], tb).detach()
        errs.append(float((learned - exact).norm(dim=-1).mean()))
    return max(errs) / float(a.norm())


def test_chain_target_learns_the_exact_flow_score() -> None:
    """reverse_target="chain" on a problem with a known flow: g_φ is within 10% of ‖λa‖ of the
    closed-form score at every step after 150 iterations. Measured over seeds 0/1/2: 0.050 / 0.054 /
    0.049; the paper's target ("policy"), same budget: 0.60 / 0.61 / 0.60 — its flow follows the
    slowly fitted policy (≈ 12 s)."""
    assert chain_flow_error(seed=0) <= CHAIN_FLOW_TOL


CHAIN_FLOW_TOL = 0.10
