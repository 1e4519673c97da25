"""Run configuration: shipped presets, the layer order defaults ← preset ← file ← flags ← --set."""

import pytest
import yaml

from soctune import config as cfgmod
from soctune.registry import SoctuneError


@pytest.mark.parametrize("name", sorted(cfgmod.list_presets()))
def test_every_shipped_preset_validates(name):
    cfg = cfgmod.resolve(name)
    raw = cfgmod.load_yaml(name)
    assert cfg["process"]["name"] == raw["process"]["name"]
    assert cfg["solver"]["name"] == raw["solver"]["name"]
    assert cfgmod.list_presets()[name], "each preset starts with a one-line description comment"


def test_every_pair_gets_the_same_defaults_and_flags_win():
    """No per-pair preset is applied behind the user's back: a pair's config is the shared
    defaults (the solver's own constructor defaults, measured on every pair by
    benchmarks/pairs.py) plus what the user gave."""
    for process in ("ddpm", "dpmpp-sde", "fm-memoryless"):
        for solver in ("nabla-db", "adjoint-matching", "draft"):
            cfg = cfgmod.resolve(None, {"process.name": process, "solver.name": solver})
            assert cfg["solver"] == {"name": solver}
            # the shipped digits models declare their learning rate and its schedule (soctune.json)
            assert cfg["train"] == {**cfgmod.defaults()["train"], "lr": 0.01, "lr_schedule": "cosine"}
    cfg = cfgmod.resolve(None, {"process.name": "ddpm", "solver.name": "nabla-db", "train.lr": 0.5},
                         ["solver.lambda=3"])
    assert cfg["train"]["lr"] == 0.5 and cfg["solver"] == {"name": "nabla-db", "reward_scale": 3}


def test_a_model_folder_declares_its_training_defaults_under_the_users(tmp_path):
    """soctune.json's train/eval sections are a layer between soctune's defaults and everything the
    user gives; unknown keys or sections are one-line errors naming the file."""
    import json
    import shutil

    from soctune.examples.digits import shipped_model_path

    model = tmp_path / "model"
    shutil.copytree(shipped_model_path("ddpm"), model)
    (model / "soctune.json").write_text(json.dumps({"evaluator": "digits", "train": {"lr": 0.02, "iters": 7},
                                                    "eval": {"n_samples": 16}}))
    cfg = cfgmod.resolve(None, {"model.path": str(model), "process.name": "ddpm"})
    assert (cfg["train"]["lr"], cfg["train"]["iters"], cfg["eval"]["n_samples"]) == (0.02, 7, 16)
    cfg = cfgmod.resolve(None, {"model.path": str(model), "process.name": "ddpm", "train.iters": 3})
    assert (cfg["train"]["lr"], cfg["train"]["iters"]) == (0.02, 3)
    (model / "soctune.json").unlink()
    assert cfgmod.resolve(None, {"model.path": str(model)})["train"] == cfgmod.defaults()["train"]
    (model / "soctune.json").write_text(json.dumps({"train": {"learning_rate": 0.1}}))
    with pytest.raises(SoctuneError, match="soctune.json.*'train' must map keys of the train section"):
        cfgmod.resolve(None, {"model.path": str(model)})


def test_config_file_replaces_the_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"process": {"name": "ddpm"}, "solver": {"name": "nabla-db"}, "train": {"iters": 7}}))
    cfg = cfgmod.resolve(f, {}, ["train.batch_size=5"])
    assert cfg["solver"] == {"name": "nabla-db"} and cfg["train"]["iters"] == 7 and cfg["train"]["batch_size"] == 5


def test_unknown_config_names_the_presets():
    with pytest.raises(SoctuneError, match="paper-adjoint-matching"):
        cfgmod.resolve("no-such-preset")


def test_cosine_schedule_is_a_function_of_the_iteration_and_reaches_the_optimiser():
    """train.lr_schedule=cosine: lr·½(1 + cos(π i/iters)) at iteration i, set on the optimiser at the
    start of each iteration (so a resumed run continues the same curve) and logged as ``lr``."""
    import math

    import torch

    from soctune import TrainConfig, Trainer
    from soctune.models.base import CorrectedDenoiser
    from soctune.models.gmm import GaussianMixtureDenoiser, two_mode_mixture
    from soctune.rewards.base import LinearReward
    from soctune.sde import get_process
    from soctune.solvers import get_solver
    from soctune.trainer import lr_at

    cfg = TrainConfig(iters=4, lr=0.2, lr_schedule="cosine", batch_size=8)
    assert [lr_at(cfg, i) for i in range(4)] == pytest.approx([0.2, 0.1 * (1 + math.cos(math.pi / 4)), 0.1,
                                                               0.1 * (1 + math.cos(3 * math.pi / 4))])
    assert lr_at(TrainConfig(lr=0.2, lr_schedule="constant"), 3) == 0.2
    process = get_process("ddpm", num_steps=4)
    torch.manual_seed(0)
    model = CorrectedDenoiser(GaussianMixtureDenoiser(two_mode_mixture(), process, "epsilon"), hidden=8, depth=1)
    trainer = Trainer(process, model, get_solver("draft"), LinearReward((1.0, 0.0)), (2,), cfg)
    history = trainer.train()
    assert [h["lr"] for h in history] == pytest.approx([lr_at(cfg, i) for i in range(4)])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(cfg, 3))
    with pytest.raises(SoctuneError, match="lr_schedule"):
        cfgmod.resolve(None, {"train.lr_schedule": "step"})
