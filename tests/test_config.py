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


def test_pair_preset_applies_without_config_and_flags_win():
    raw = cfgmod.load_yaml("digits-ddpm-nabla-db")
    cfg = cfgmod.resolve(None, {"process.name": "ddpm", "solver.name": "nabla-db"})
    assert cfg["solver"] == raw["solver"]
    assert cfg["train"]["lr"] == raw["train"]["lr"]
    cfg = cfgmod.resolve(None, {"process.name": "ddpm", "solver.name": "nabla-db", "train.lr": 0.5},
                         ["solver.lambda=3"])
    assert cfg["train"]["lr"] == 0.5 and cfg["solver"]["reward_scale"] == 3
    # a pair without a preset gets the generic defaults; a user model disables presets
    assert cfgmod.preset_for("dpmpp-sde", "draft") is None
    assert cfgmod.resolve(None, {"process.name": "dpmpp-sde", "solver.name": "draft"})["solver"] == {"name": "draft"}
    cfg = cfgmod.resolve(None, {"process.name": "ddpm", "solver.name": "nabla-db", "model.path": "/some/model"})
    assert cfg["solver"] == {"name": "nabla-db"}


def test_config_file_replaces_the_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"process": {"name": "ddpm"}, "solver": {"name": "nabla-db"}, "train": {"iters": 7}}))
    cfg = cfgmod.resolve(f, {}, ["train.batch_size=5"])
    assert cfg["solver"] == {"name": "nabla-db"} and cfg["train"]["iters"] == 7 and cfg["train"]["batch_size"] == 5


def test_unknown_config_names_the_presets():
    with pytest.raises(SoctuneError, match="digits-ddpm-nabla-db"):
        cfgmod.resolve("no-such-preset")
