"""The library API a user writes against (issue #16): one helper per job, x̂₁ named as the data
estimate, user SDE parameters through the constructor, notebook-friendly registration, and the
state shape given once."""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor

import soctune.solvers.draft as draft_module
import soctune.solvers.nabla_db as nabla_db_module
from soctune import finetune
from soctune.distributed import batch_shard, sharded_cond_sampler
from soctune.models.base import (ClassifierFreeGuidance, CorrectedDenoiser, Denoiser, ZeroDenoiser, base_if,
                                 index_batch, resolve_sample_shape)
from soctune.models.diffusers_model import TextCond
from soctune.registry import Registry, SoctuneError, constructor_options
from soctune.sde import PROCESSES, get_process, register_process
from soctune.sde.ddpm import DDPM
from soctune.sde.euler_maruyama import EulerMaruyama
from soctune.trajectory import GradSpec, Trajectory, model_step, rollout


class Affine(Denoiser):
    """pred = 2x + t (a model with a non-trivial prediction to compare against)."""

    prediction_type = "epsilon"

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return 2 * x + t.view(-1, *([1] * (x.dim() - 1)))


# ------------------------------------------------------------------ 1. one model_step
def test_model_step_returns_the_prediction_with_the_kernel() -> None:
    process = DDPM(num_steps=4)
    x, k = torch.randn(3, 2), 1
    out = model_step(process, Affine(), x, k, None, process.init_state())
    expected_pred = Affine()(x, torch.full((3,), process.model_time(k)))
    torch.testing.assert_close(out.pred, expected_pred)
    ref = process.step_kernel(x, k, expected_pred, process.init_state(), "epsilon")
    torch.testing.assert_close(out.mean, ref.mean)
    torch.testing.assert_close(out.x1_hat, ref.x1_hat)
    # the copies that only added the prediction are gone
    assert not hasattr(nabla_db_module, "pred_step") and not hasattr(draft_module, "_model_step")


def test_checkpointed_rollout_matches_plain_rollout() -> None:
    """The checkpointed step also carries the prediction; states and x̂₁ agree with the plain path."""
    process = DDPM(num_steps=4)
    model = CorrectedDenoiser(Affine(), sample_shape=(2,), hidden=8, depth=1, time_features=2)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    plain = rollout(process, model, x_init=x0, generator=torch.Generator().manual_seed(1))
    ckpt = rollout(process, model, x_init=x0, noises=plain.noises, grad=GradSpec.all(checkpoint=True))
    torch.testing.assert_close(ckpt.xs, plain.xs)
    torch.testing.assert_close(ckpt.x1_hat_final.detach(), plain.x1_hat_final)


# ------------------------------------------------------------------ 2. one batch-indexing helper
def test_index_batch_selects_rows_of_every_batched_kind() -> None:
    idx = torch.tensor([2, 0])
    labels = torch.arange(3)
    cond = {"labels": labels, "shared": torch.ones(1, 4), "scale": torch.tensor(2.0), "names": ["a", "b", "c"],
            "pair": ("x", "y", "z"), "nested": {"emb": torch.arange(6).view(3, 2)}, "flag": True}
    out = index_batch(cond, idx, 3)
    assert torch.equal(out["labels"], torch.tensor([2, 0]))
    assert torch.equal(out["shared"], torch.ones(1, 4)) and torch.equal(out["scale"], torch.tensor(2.0))
    assert out["names"] == ["c", "a"] and out["pair"] == ("z", "x") and out["flag"] is True
    assert torch.equal(out["nested"]["emb"], torch.tensor([[4, 5], [0, 1]]))
    assert index_batch(None, idx, 3) is None
    # repeated indices tile: n copies laid out as (n b), what DRaFT-LV needs
    tile = torch.arange(2 * 3) % 3
    assert torch.equal(index_batch(labels, tile, 3), torch.tensor([0, 1, 2, 0, 1, 2]))


def test_index_batch_keeps_text_conditioning_and_its_prompts() -> None:
    """A TextCond stays a TextCond and its prompt strings follow the rows (text-image rewards read
    them after a solver's minibatching)."""
    tc = TextCond({"encoder_hidden_states": torch.arange(3).view(3, 1, 1).float()}, ["cat", "dog", "owl"])
    out = index_batch(tc, torch.tensor([1, 1, 2]), 3)
    assert isinstance(out, TextCond) and out.prompts == ["dog", "dog", "owl"]
    assert out["encoder_hidden_states"].flatten().tolist() == [1.0, 1.0, 2.0]
    assert tc.prompts == ["cat", "dog", "owl"]  # the original is untouched


def test_sharded_cond_sampler_keeps_text_conditioning() -> None:
    prompts = ["p0", "p1", "p2", "p3"]

    def sampler(n: int, gen: torch.Generator) -> TextCond:
        return TextCond({"e": torch.arange(n).float()[:, None]}, prompts[:n])

    with batch_shard(2, 4, 4):
        out = sharded_cond_sampler(sampler)(2, torch.Generator())
    assert isinstance(out, TextCond) and out.prompts == ["p2", "p3"]
    assert out["e"].flatten().tolist() == [2.0, 3.0]


# ------------------------------------------------------------------ 3. one no-op context
def test_base_if_switches_between_base_and_finetuned() -> None:
    model = CorrectedDenoiser(Affine(), sample_shape=(2,), hidden=8, depth=1, time_features=2)
    torch.nn.init.normal_(model.correction.out.weight)
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    with base_if(model, True):
        base = model(x, t)
    with base_if(model, False):
        tuned = model(x, t)
    torch.testing.assert_close(base, Affine()(x, t))
    assert not torch.allclose(tuned, base)
    with Affine().base():  # the interface default: nothing to switch off
        torch.testing.assert_close(Affine()(x, t), base)


def test_switchable_denoiser_contexts_nest() -> None:
    model = CorrectedDenoiser(ZeroDenoiser(), sample_shape=(2,))
    with model.base():
        with model.base():
            assert not model._adapt
        assert not model._adapt  # the inner exit restores the outer context's state
    assert model._adapt


# ------------------------------------------------------------------ 4. x̂₁ named as the data estimate
def test_data_estimate_is_named_x1_hat() -> None:
    """``xs[0]`` is the noise x_0; the data estimate x̂₁ is ``x1_hats`` / ``x1_hat_final``: on DDPM the
    deterministic last step lands exactly on it."""
    process = DDPM(num_steps=5)
    traj = rollout(process, Affine(), batch_size=4, sample_shape=(2,), generator=torch.Generator().manual_seed(0))
    assert traj.x1_hats is not None and traj.x1_hats.shape == (5, 4, 2)
    assert torch.equal(traj.xs[-1], traj.x1_hats[-1]) and torch.equal(traj.x1_hat_final, traj.x1_hats[-1])
    for old in ("x0s", "x0_final"):
        assert old not in Trajectory.__dataclass_fields__


# ------------------------------------------------------------------ 5. user SDE parameters
@pytest.fixture
def user_names() -> Iterator[list[str]]:
    """Names a test registers in the global process registry, removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        PROCESSES._entries.pop(name, None)


def test_user_sde_takes_declared_parameters_through_get_process(user_names: list[str]) -> None:
    user_names.append("test-api-linear")

    @register_process("test-api-linear", "dX = A X dt + σ dW on a grid of a chosen end time")
    class Linear(EulerMaruyama):
        A: float = -1.0
        sigma: float = 0.5
        t_end: float = 1.0

        def make_grid(self, num_steps: int) -> Tensor:  # reads a parameter: set before the grid
            return torch.linspace(0.0, self.t_end, num_steps + 1, dtype=torch.float64)

        def base_drift(self, x: Tensor, t: float) -> Tensor:
            return self.A * x

        def diffusion(self, t: float) -> float:
            return self.sigma

    p = get_process("test-api-linear", A=-2.0, t_end=0.5, num_steps=10, prior_std=0.0)
    assert (p.A, p.sigma, p.num_steps, p.prior_std) == (-2.0, 0.5, 10, 0.0)
    assert float(p.ts[-1]) == pytest.approx(0.5)
    assert Linear().A == -1.0  # defaults from the declaration
    # the parameter reaches the dynamics: with σ = 0 and x_0 = 1, X_1 = (1 + AΔt)^K exactly
    q = get_process("test-api-linear", A=-2.0, sigma=0.0, num_steps=10, prior_mean=1.0, prior_std=0.0)
    traj = rollout(q, ZeroDenoiser(), batch_size=2, sample_shape=(1,))
    torch.testing.assert_close(traj.x_final, torch.full((2, 1), (1 - 2.0 / 10) ** 10))
    accepted = "A, diffusion, drift, memoryless, num_steps, prior_mean, prior_std, sigma, t_end"
    with pytest.raises(SoctuneError, match=f"bad options for process 'test-api-linear': unknown B; it accepts {accepted}"):
        get_process("test-api-linear", B=1.0)
    with pytest.raises(SoctuneError, match=f"Linear has no option B; it accepts {accepted}"):
        Linear(B=1.0)


def test_unknown_option_names_the_accepted_ones_for_an_explicit_constructor(user_names: list[str]) -> None:
    user_names.append("test-api-explicit")

    @register_process("test-api-explicit")
    class Explicit(EulerMaruyama):
        """A user SDE with its own __init__."""

        def __init__(self, theta: float = 1.0, num_steps: int = 10) -> None:
            self.theta = theta
            super().__init__(num_steps=num_steps)

    assert get_process("test-api-explicit", theta=3.0, num_steps=4).theta == 3.0
    assert constructor_options(Explicit) == ["num_steps", "theta"]
    with pytest.raises(SoctuneError, match="unknown prior_std; it accepts num_steps, theta"):
        get_process("test-api-explicit", prior_std=0.0)


# ------------------------------------------------------------------ 6. notebook-friendly registration
def _cell() -> type:
    """What a notebook cell defines: a new class object on every run."""

    class MySDE(EulerMaruyama):
        """my sde"""

    return MySDE


def test_rerunning_a_registration_replaces_it_with_a_warning(user_names: list[str]) -> None:
    user_names.append("test-api-cell")
    first = register_process("test-api-cell")(_cell())
    with pytest.warns(UserWarning, match="'test-api-cell' registered again: .*MySDE replaces the earlier") as rec:
        second = register_process("test-api-cell")(_cell())
    assert rec[0].filename == __file__  # attributed to the user's line, not the library's
    assert second is not first and PROCESSES.get("test-api-cell") is second
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_process("test-api-cell")(second)  # the same object again: nothing to say


def test_replacing_a_builtin_warns_clearly_also_before_the_builtins_load() -> None:
    """A fresh registry of the same kind: the built-in names are known from soctune's source even
    before their modules register, and the lazily imported built-in does not undo the user's entry."""
    fake = _cell()
    loaded_first = Registry[type]("process")
    loaded_first.register("ddpm")(DDPM)
    with pytest.warns(UserWarning, match="process 'ddpm' is a soctune built-in; .*MySDE replaces it"):
        loaded_first.register("ddpm")(fake)
    assert loaded_first.get("ddpm") is fake

    user_first = Registry[type]("process")
    with pytest.warns(UserWarning, match="process 'ddpm' is a soctune built-in"):
        user_first.register("ddpm")(fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        user_first.register("ddpm")(DDPM)  # what importing soctune.sde.ddpm later does
    assert user_first.get("ddpm") is fake


# ------------------------------------------------------------------ 7. the state shape, once
def test_models_know_their_state_shape() -> None:
    model = CorrectedDenoiser(ZeroDenoiser(), sample_shape=(2,), hidden=8, depth=1)
    assert model.sample_shape == (2,) and model.correction.out.out_features == 2
    assert CorrectedDenoiser(ZeroDenoiser(), sample_shape=(1, 2, 3), hidden=8, depth=1).correction.out.out_features == 6
    assert CorrectedDenoiser(ZeroDenoiser(), 2).sample_shape is None  # D numbers, layout unknown
    assert CorrectedDenoiser(model, 2).sample_shape == (2,)  # from the base model
    assert ClassifierFreeGuidance(model, 2.0, None).sample_shape == (2,)
    assert ZeroDenoiser().sample_shape is None
    with pytest.raises(SoctuneError, match=r"dim=3 contradicts the state shape \(2,\)"):
        CorrectedDenoiser(ZeroDenoiser(), 3, sample_shape=(2,))
    with pytest.raises(SoctuneError, match=r"sample_shape=\(3,\) contradicts the base model's state shape \(2,\)"):
        CorrectedDenoiser(model, sample_shape=(3,))
    with pytest.raises(SoctuneError, match="needs the state shape"):
        CorrectedDenoiser(ZeroDenoiser())
    with pytest.raises(SoctuneError, match="a state shape is a tuple of positive integers"):
        CorrectedDenoiser(ZeroDenoiser(), sample_shape=(2, 0))


def test_resolve_sample_shape() -> None:
    known = CorrectedDenoiser(ZeroDenoiser(), sample_shape=(2,))
    unknown = CorrectedDenoiser(ZeroDenoiser(), 2)
    assert resolve_sample_shape(known, None) == (2,)
    assert resolve_sample_shape(known, [2]) == (2,)
    assert resolve_sample_shape(unknown, (1, 2)) == (1, 2)
    with pytest.raises(SoctuneError, match=r"sample_shape=\(3,\) contradicts the model's state shape \(2,\)"):
        resolve_sample_shape(known, (3,))
    with pytest.raises(SoctuneError, match="does not know its state shape: pass sample_shape"):
        resolve_sample_shape(unknown, None)


def test_finetune_takes_the_state_shape_from_the_model() -> None:
    process = EulerMaruyama(num_steps=4, prior_std=0.0)
    model = CorrectedDenoiser(ZeroDenoiser(), sample_shape=(2,), hidden=8, depth=1, time_features=2)

    def reward(x: Tensor, cond: Any = None) -> Tensor:
        return -(x - 1.0).pow(2).sum(1)

    run = finetune(model=model, process=process, solver="adjoint-matching", reward=reward, iters=1, batch_size=4)
    assert run.trainer.sample_shape == (2,) and run.sample(3).shape == (3, 2)
    # the old two-place form still works when it agrees
    finetune(model=model, process=process, solver="adjoint-matching", reward=reward, sample_shape=(2,), iters=1,
             batch_size=4)
    with pytest.raises(SoctuneError, match=r"sample_shape=\(3,\) contradicts the model's state shape \(2,\)"):
        finetune(model=model, process=process, solver="adjoint-matching", reward=reward, sample_shape=(3,), iters=1)
    with pytest.raises(SoctuneError, match="does not know its state shape"):
        finetune(model=CorrectedDenoiser(ZeroDenoiser(), 2), process=process, solver="adjoint-matching",
                 reward=reward, iters=1)
    with pytest.raises(SoctuneError, match="a diffusers model knows its state shape"):
        finetune(process="ddpm", solver="draft", reward="digit:3", sample_shape=(1, 8, 8))


def test_a_model_class_declares_its_training_defaults() -> None:
    """Denoiser.train_defaults sit under what the caller passes to finetune: a control-units correction
    (ControlGainDenoiser) trains at its own lr with cosine decay unless told otherwise; a prediction
    correction keeps TrainConfig's defaults."""
    from soctune.config import TrainConfig
    from soctune.models.control import ControlGainDenoiser
    from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture

    process = DDPM(num_steps=4)
    base = GaussianMixtureDenoiser(two_mode_mixture(), process, "epsilon")

    def reward(x: Tensor, cond: Any = None) -> Tensor:
        return x[:, 0]

    gain = ControlGainDenoiser(base, process, hidden=8, depth=1)
    run = finetune(model=gain, process=process, solver="adjoint-matching", reward=reward, iters=1, batch_size=4)
    assert (run.trainer.config.lr, run.trainer.config.lr_schedule) == (gain.train_defaults["lr"], "cosine")
    run = finetune(model=gain, process=process, solver="adjoint-matching", reward=reward, iters=1, batch_size=4,
                   lr=1e-4, lr_schedule="constant")
    assert (run.trainer.config.lr, run.trainer.config.lr_schedule) == (1e-4, "constant")
    plain = CorrectedDenoiser(base, hidden=8, depth=1)
    run = finetune(model=plain, process=process, solver="adjoint-matching", reward=reward, iters=1, batch_size=4)
    assert (run.trainer.config.lr, run.trainer.config.lr_schedule) == (TrainConfig().lr, TrainConfig().lr_schedule)
