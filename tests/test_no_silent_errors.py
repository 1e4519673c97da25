"""No silent wrong results (issue 16): each case below used to return a plausible but wrong
answer; now it is correct or a one-line SoctuneError naming the fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from soctune import TrainConfig, Trainer
from soctune.distributed import batch_shard, current_shard, sharded_cond_sampler
from soctune.io import one_line_reason
from soctune.metrics import tilt_is_target
from soctune.models.base import CorrectedDenoiser, ZeroDenoiser
from soctune.models.gmm import GaussianMixture, GaussianMixtureDenoiser, two_mode_mixture
from soctune.registry import SoctuneError
from soctune.rewards import FunctionReward, LinearReward, QuadraticReward, get_reward
from soctune.sde import get_process
from soctune.solvers.ddpo import DDPOSolver
from soctune.trajectory import rollout


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ----------------------------------------------------------------------- 1. LinearReward length
def test_linear_reward_of_the_wrong_length_is_refused_naming_the_expected_length() -> None:
    x = torch.randn(4, 3)
    assert torch.allclose(LinearReward([1.0, 2.0, -1.0])(x), x @ torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(LinearReward()(x), x[:, 0])  # no weights: r(x) = x₁ at any size
    img = torch.randn(2, 1, 4, 4)
    assert torch.equal(get_reward("linear")(img), img.flatten(1)[:, 0])
    for a in ([1.0], [1.0, 0.0], [1.0, 0.0, 0.0, 0.0]):  # used to be zero-padded / cropped
        with pytest.raises(SoctuneError) as err:
            LinearReward(a)(x)
        one_line(err, f"a has {len(a)} entr", "exactly 3 numbers")
    with pytest.raises(SoctuneError) as err:
        get_reward("linear:1,0")(torch.randn(2, 1, 2, 2))
    one_line(err, "exactly 4 numbers", "(1, 2, 2)")


def test_quadratic_reward_of_the_wrong_size_is_refused_and_defaults_to_the_origin() -> None:
    x = torch.randn(5, 2)
    assert torch.allclose(QuadraticReward(scale=2.0)(x), -(x**2).sum(1))  # used to fail in einsum
    assert torch.allclose(get_reward("quadratic")(x), -0.5 * (x**2).sum(1))
    with pytest.raises(SoctuneError) as err:
        QuadraticReward(c=[1.0])(x)  # used to broadcast c = (1, 1)
    one_line(err, "c has 1 entry", "exactly 2 numbers")
    with pytest.raises(SoctuneError) as err:
        QuadraticReward(c=[0.0, 0.0], A=torch.eye(3))(x)
    one_line(err, "A has shape (3, 3)", "[2, 2] matrix")


# ------------------------------------------------------------------- 2. FunctionReward signature
def test_function_reward_passes_cond_by_signature_and_lets_a_users_type_error_through() -> None:
    x, cond = torch.randn(3, 2), torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(FunctionReward(lambda x: x.sum(1))(x, cond), x.sum(1))
    assert torch.equal(FunctionReward(lambda x, cond: x.sum(1) * cond)(x, cond), x.sum(1) * cond)
    assert torch.equal(FunctionReward(lambda x, *, cond=None: x[:, 0] + cond)(x, cond), x[:, 0] + cond)
    assert torch.equal(FunctionReward(lambda *args: args[1])(x, cond), cond)

    class Scorer(nn.Module):  # an nn.Module's __call__ is (*args, **kwargs): its forward decides
        def forward(self, x: Tensor) -> Tensor:
            return x.mean(1)

    assert torch.equal(FunctionReward(Scorer())(x, cond), x.mean(1))

    calls = []

    def buggy(x: Tensor, cond: Any = None) -> Tensor:
        calls.append(cond)
        return x.sum(1) + "oops"  # a TypeError inside the user's reward

    with pytest.raises(TypeError, match="str"):
        get_reward(buggy)(x, cond)
    assert len(calls) == 1 and calls[0] is cond  # called once, with cond; never retried without it

    def buggy_one(x: Tensor) -> Tensor:
        return len(5)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="has no len"):
        FunctionReward(buggy_one)(x, cond)

    with pytest.raises(SoctuneError) as err:
        FunctionReward(lambda x, cond, scale: x)
    one_line(err, "r(x) or r(x, cond)")


# ------------------------------------------------------------------------ 3. current_shard
def test_a_differently_sized_draw_inside_a_shard_is_still_sharded_by_global_index() -> None:
    """Inside batch_shard(3, 6, 6) (shard 1 of two equal shards) a rollout of 6 samples is rows
    [6, 12) of the 12-sample rollout; it used to ignore the shard, so both ranks drew the same 6."""
    proc = get_process("euler-maruyama", num_steps=4)
    model = CorrectedDenoiser(ZeroDenoiser(), dim=2)
    full = rollout(proc, model, batch_size=12, sample_shape=(2,), generator=torch.Generator().manual_seed(0))
    for start in (0, 3):
        with batch_shard(start, start + 3, 6):
            part = rollout(proc, model, batch_size=6, sample_shape=(2,), generator=torch.Generator().manual_seed(0))
        rows = slice(2 * start, 2 * start + 6)
        assert torch.equal(part.xs, full.xs[:, rows])
    # conditioning follows the same rows
    sampler = sharded_cond_sampler(lambda n, g: torch.arange(n))
    with batch_shard(3, 6, 6):
        assert sampler(6, torch.Generator()).tolist() == list(range(6, 12))
        assert current_shard(3) == current_shard()  # the shard's own size: the shard itself


def test_a_differently_sized_draw_in_an_unequal_shard_is_refused() -> None:
    with batch_shard(1, 3, 6), pytest.raises(SoctuneError) as err:
        current_shard(4)
    one_line(err, "unequal size", "draw 2 samples")
    with batch_shard(0, 4, 6), pytest.raises(SoctuneError):
        current_shard(2)


# --------------------------------------------------------------- 4. GMM denoiser per-row time
@pytest.mark.parametrize("name,pred", [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("ddpm", "sample"),
                                       ("fm-memoryless", "velocity")])
def test_gmm_denoiser_evaluates_each_row_at_its_own_time(name: str, pred: str) -> None:
    proc = get_process(name, num_steps=10)
    model = GaussianMixtureDenoiser(two_mode_mixture(), proc, pred)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.1, 0.9, 0.3, 0.5, 0.7], dtype=torch.float64)
    batch = model(x, t)
    rows = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(7)])
    assert torch.allclose(batch, rows, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batch, model(x, t[:1].expand(7)))  # t[0] for all (the old behaviour) differs
    assert torch.equal(model(x, t[1]), model(x, t[1:2].expand(7)))  # one time for the batch still works


# ------------------------------------------------------------ 5. diffusers learned variance
def _tiny_unet(out_channels: int) -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel.from_config(dict(sample_size=8, in_channels=1, out_channels=out_channels,
                                        block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                        up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                        add_attention=False))


def test_two_c_channels_are_split_only_for_a_learned_variance_scheduler() -> None:
    from diffusers import DDPMScheduler

    from soctune.models.diffusers_model import DiffusersDenoiser

    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6])
    unet = _tiny_unet(2).eval()
    learned = DiffusersDenoiser(unet, dict(DDPMScheduler(variance_type="learned_range").config))
    with torch.no_grad():
        raw = unet(x, learned.timestep(t), return_dict=False)[0]
        assert torch.equal(learned(x, t), raw[:, :1])  # [prediction, variance]: the first half
    fixed = DiffusersDenoiser(unet, dict(DDPMScheduler(variance_type="fixed_small").config))
    with torch.no_grad(), pytest.raises(SoctuneError) as err:
        fixed(x, t)  # used to cut the second channel silently
    one_line(err, "2 channels for a 1-channel input", "'fixed_small'", "out_channels=1")
    odd = DiffusersDenoiser(_tiny_unet(3).eval(), dict(DDPMScheduler(variance_type="learned").config))
    with torch.no_grad(), pytest.raises(SoctuneError) as err:
        odd(x, t)
    one_line(err, "3 channels")


# ------------------------------------------------------------------- 6. which runs target the tilt
def test_tilt_is_target_only_for_tilt_solvers_with_eta_one_on_memoryless_processes() -> None:
    fm, ddpm = get_process("fm-memoryless", num_steps=10), get_process("ddpm", num_steps=10)
    half = get_process("ddpm", num_steps=10, noise_scale=0.5)
    em = get_process("euler-maruyama", num_steps=10)
    assert fm.memoryless and ddpm.memoryless and not half.memoryless and not em.memoryless
    assert tilt_is_target("adjoint-matching", {}, fm)
    assert tilt_is_target("nabla-db", {"reward_scale": 2.0}, ddpm)
    assert tilt_is_target("db", {}, ddpm)
    assert not tilt_is_target("adjoint-matching", {}, half)  # non-memoryless: initial-value bias
    assert not tilt_is_target("nabla-db", {}, em)
    assert not tilt_is_target("nabla-db", {"prior_strength": 0.5}, ddpm)  # p_base^η·e^{λr}
    assert not tilt_is_target("db", {"variant": "dag-db"}, ddpm)  # e^{λr} alone
    assert not tilt_is_target("draft", {}, fm) and not tilt_is_target("ddpo", {}, fm)  # reward maximisers


def test_evaluate_table_labels_the_distance_by_the_runs_target() -> None:
    from rich.console import Console

    from soctune_cli.app import _summary_table

    side = {"reward_mean": 0.0, "reward_se": 0.0, "diversity": 1.0}
    summary = {"before": side, "after": side, "prior_preservation_frechet": 0.0,
               "target_fidelity": {"sw_base_to_target": 1.0, "sw_to_target": 0.5}}

    def text(tilt_target: bool) -> str:
        console = Console(width=200, record=True)
        console.print(_summary_table(summary, tilt_target))
        return console.export_text()

    assert "distance to exact tilt" in text(True) and "not this method's target" not in text(True)
    assert "SOC cost" not in text(True)
    summary["soc"] = {"soc_cost": -0.5, "soc_cost_se": 0.01, "base_soc_cost": -0.2, "base_soc_cost_se": 0.01,
                      "soc_lower_bound": -0.6, "soc_lower_bound_se": 0.02, "soc_gap": 0.1, "soc_gap_se": 0.022}
    assert "-0.2000 ± 0.0100" in text(True) and "-0.5000 ± 0.0100" in text(True)  # J: base, fine-tuned
    assert "J*_K = −log E_base e^{λr} = -0.6000" in text(True) and "0.1000 ± 0.0220" in text(True)
    assert "distance to p_base·e^{λr} (SW; not this method's target)" in text(False)
    assert "exact tilt" not in text(False)


def test_the_step_that_carries_most_of_the_soc_gap_is_named() -> None:
    """When one step holds more than half of a significant J − J*_K (the DDIM kernel's last
    stochastic step: s = 0.001 on the digits flow model), the finetune/evaluate output names it, its
    noise and the (tiny) mean shift that costs so much; otherwise it says nothing."""
    from soctune_cli.app import _costliest_step_note

    step = {"step": 23, "t": [0.9574, 0.999], "noise_std": 0.001, "control_cost": 1026.0, "mean_shift_rms": 0.0057}
    soc = {"soc_gap": 990.0, "soc_gap_se": 14.0, "costliest_step": step}
    note = _costliest_step_note({"soc": soc})
    assert note is not None and "\n" not in note
    assert "step 23 (t 0.9574 → 0.999, noise s = 0.001) alone costs 1026 nats (J − J*_K = 990)" in note
    assert "0.0057 rms" in note
    assert _costliest_step_note({"soc": {**soc, "costliest_step": {**step, "control_cost": 400.0}}}) is None  # < half
    assert _costliest_step_note({"soc": {**soc, "soc_gap": 20.0, "soc_gap_se": 14.0}}) is None  # not significant
    assert _costliest_step_note({"soc": {k: v for k, v in soc.items() if k != "costliest_step"}}) is None
    assert _costliest_step_note({}) is None


# ------------------------------------------------------------------ 7. DDPO's clip fraction
@pytest.mark.parametrize("name,pred", [("ddpm", "epsilon"), ("fm-memoryless", "velocity")])
def test_ddpo_default_clip_does_not_clip_nearly_every_latent_sample(name: str, pred: str) -> None:
    """A 64-number state (a digits-sized latent), the defaults (clip_range 1e-4, per-dimension mean
    log-prob, as the DDPO paper's code), lr 3e-4: on the first off-policy minibatch of the first
    iteration only part of the ratios is clipped. With summed log-probs the log-ratio is 64× larger
    and nearly all are. Measured (seeds 0–2): mean 0.60–0.63 (ddpm), 0.29–0.35 (fm-memoryless);
    sum 1.0 (ddpm), 0.975–0.988 (fm-memoryless)."""
    D = 64
    means = torch.zeros(2, D)
    means[0, 0], means[1, 0] = -2.0, 2.0
    gmm = GaussianMixture.isotropic([0.5, 0.5], means, 0.25)

    def second_minibatch_clipfrac(**options: Any) -> float:
        proc = get_process(name, num_steps=6)
        torch.manual_seed(0)
        model = CorrectedDenoiser(GaussianMixtureDenoiser(gmm, proc, pred), D, hidden=32, depth=2)
        solver = DDPOSolver(minibatches=2, **options)
        ft = Trainer(proc, model, solver, LinearReward(), (D,), TrainConfig(batch_size=32, lr=3e-4, seed=0))
        seen = []
        for out in solver.iteration(ft.ctx):
            seen.append(out.metrics["clipfrac"])
            ft.optimizer.zero_grad()
            out.loss.backward()
            ft.optimizer.step()
        assert seen[0] == 0.0  # on-policy
        return seen[1]

    assert DDPOSolver().logprob_reduction == "mean" and DDPOSolver().clip_range == 1e-4
    assert second_minibatch_clipfrac() < 0.75
    assert second_minibatch_clipfrac(logprob_reduction="sum") > 0.95


def test_ddpo_resume_keeps_its_logprob_reduction() -> None:
    saved = DDPOSolver(logprob_reduction="sum").extra_state()
    DDPOSolver(logprob_reduction="sum").load_extra_state(saved)
    with pytest.raises(SoctuneError) as err:
        DDPOSolver().load_extra_state(saved)
    one_line(err, "logprob_reduction='sum'", "solver.logprob_reduction=sum")
    DDPOSolver().load_extra_state({"stat_tracker": [(None, [1.0, 2.0])]})  # checkpoints written before


# --------------------------------------------------------- 8. GaussianMixture covariances
def test_gaussian_mixture_takes_full_covariances_and_samples_their_moments() -> None:
    covs = torch.tensor([[[1.0, 0.6], [0.6, 0.5]], [[0.3, -0.2], [-0.2, 0.8]]])
    means = torch.tensor([[-1.0, 2.0], [3.0, 0.5]])
    gmm = GaussianMixture([0.3, 0.7], means, covs)
    x, comp = gmm.sample(200_000, generator=torch.Generator().manual_seed(0))
    for m in range(2):
        xm = x[comp == m]
        # standard errors at n ≈ 60 000 – 140 000: ≤ 0.005 on the means, ≤ 0.006 on the covariances
        assert torch.allclose(xm.mean(0), means[m].double(), atol=0.02)
        assert torch.allclose(torch.cov(xm.T), covs[m].double(), atol=0.03)
    assert float((comp == 0).double().mean()) == pytest.approx(0.3, abs=0.01)
    total = (gmm.weights[:, None, None] * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
    mu = gmm.weights @ gmm.means
    assert torch.allclose(torch.cov(x.T), total - torch.outer(mu, mu), atol=0.05)

    iso = GaussianMixture.isotropic([1.0, 1.0], means, [0.5, 2.0])  # one variance per component
    assert torch.allclose(iso.covs[1], 2.0 * torch.eye(2, dtype=torch.float64))
    diag = GaussianMixture.diagonal([1.0, 1.0], means, [[0.5, 1.0], [2.0, 0.1]])
    assert torch.allclose(diag.covs[1], torch.diag(torch.tensor([2.0, 0.1], dtype=torch.float64)))


@pytest.mark.parametrize("covs,needle", [
    (torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]]), "component 1 is not positive definite"),
    (torch.tensor([[[1.0, 0.5], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]), "component 0 is not a finite symmetric"),
    (torch.ones(2, 2), "covs must be [M, D, D] = [2, 2, 2]"),
])
def test_gaussian_mixture_refuses_bad_covariances_in_one_line(covs: Tensor, needle: str) -> None:
    with pytest.raises(SoctuneError) as err:
        GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], covs)
    one_line(err, needle)


# ------------------------------------------------------------------- 9. one error-line helper
def test_one_line_reason_flattens_any_exception_text() -> None:
    assert one_line_reason(OSError("first line\n  second\tline")) == "first line second line"
    assert one_line_reason(KeyError()) == "KeyError"
    assert len(one_line_reason(ValueError("x" * 1000))) == 300
    assert len(one_line_reason(ValueError("x" * 1000), limit=20)) == 20


def test_prediction_units_refuse_a_step_that_is_not_affine_with_one_slope() -> None:
    """step_prediction_coefficient summarises ∂m_k/∂pred by one number: a clipped x̂₁ (clip_sample)
    or a per-dimension kernel has no such number and is refused in one line, instead of being
    averaged into a wrong step weight / control gain."""
    from soctune.models.control import ControlGainDenoiser
    from soctune.sde.euler_maruyama import EulerMaruyama
    from soctune.trajectory import step_prediction_coefficient

    x = torch.zeros(1, 2)
    plain = get_process("ddpm", num_steps=10)
    assert step_prediction_coefficient(plain, 0, x, plain.init_state(), "epsilon") != 0
    clipped = get_process("ddpm", num_steps=10, scheduler_config={"clip_sample": True})
    with pytest.raises(SoctuneError, match="not affine.*clip_sample=false"):
        for k in range(clipped.num_steps):
            step_prediction_coefficient(clipped, k, x, clipped.init_state(), "epsilon")
    base = GaussianMixtureDenoiser(two_mode_mixture(), clipped, "epsilon")
    with pytest.raises(SoctuneError, match="not affine"):
        ControlGainDenoiser(base, clipped, hidden=8, depth=1)

    class PerDimension(EulerMaruyama):
        def drift(self, x: Tensor, t: float, pred: Tensor, prediction_type: str) -> Tensor:
            return pred * torch.tensor([1.0, 3.0])  # a different gain per coordinate

    proc = PerDimension(num_steps=4, prior_std=0.0)
    with pytest.raises(SoctuneError, match="one slope for every dimension"):
        step_prediction_coefficient(proc, 0, x, proc.init_state(), "control")


def test_control_gain_model_builds_on_a_multistep_process() -> None:
    """Order-2 dpmpp-sde's step k ≥ 1 reads the previous x̂₁ from the step state: the gains are probed
    along a threaded state (it used to probe every step with the initial state and fail)."""
    from soctune.models.control import ControlGainDenoiser

    process = get_process("dpmpp-sde", num_steps=6, order=2)
    model = ControlGainDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, "epsilon"), process,
                                hidden=8, depth=1)
    assert model.gains.shape == (6,) and bool((model.gains[:-1] > 0).all())
    with torch.no_grad():
        x = rollout(process, model, batch_size=4, generator=torch.Generator().manual_seed(0)).x_final
    assert x.shape == (4, 2) and torch.isfinite(x).all()


def test_tilt_solvers_warn_on_a_multistep_chain() -> None:
    """Order-2 dpmpp-sde reads the previous x̂₁ (Process.multistep): the solvers that claim the tilt warn
    once at construction that their conditions are approximate there; the default (order 1) and the
    reward maximisers stay silent."""
    import warnings

    from soctune.solvers import get_solver

    order2, order1 = get_process("dpmpp-sde", num_steps=6, order=2), get_process("dpmpp-sde", num_steps=6)
    assert order2.multistep and not order1.multistep
    model = GaussianMixtureDenoiser(two_mode_mixture(), order1, "epsilon")
    for name, opts in (("adjoint-matching", {}), ("nabla-db", {}), ("db", {})):
        with pytest.warns(UserWarning, match="multistep kernel.*order=1"):
            get_solver(name, **opts).check(order2, model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            get_solver(name, **opts).check(order1, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("draft", "ddpo"):
            get_solver(name).check(order2, model)
        get_solver("db", variant="dag-db").check(order2, model)
