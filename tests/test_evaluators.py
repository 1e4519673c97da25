"""Evaluators (issue #16 items 3, 4 and 6): a model folder declares its evaluator in soctune.json
or gets the generic one; the runtime imports nothing of the digits family; `soctune evaluate`
loads a full fine-tuning run's model/; the presets of the top-level configs/ ship in the package;
the digits pretraining reports through logging, not print."""

import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from helpers import needs_assets
from soctune import config as cfgmod
from soctune.evaluation import GenericEvaluator, evaluator_for, feature_extractor
from soctune.registry import SoctuneError

ROOT = Path(__file__).resolve().parent.parent


def tiny_pixel_model(folder: Path) -> Path:
    """A 1×8×8 ε-prediction UNet with random weights (not a digits model: no soctune.json)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    return folder


def tiny_config(model: str, *sets: str) -> dict:
    return cfgmod.resolve(None, {"model.path": model, "process.name": "ddpm", "process.num_steps": 4,
                                 "solver.name": "draft", "reward": "digit:3"}, list(sets))


def test_the_runtime_imports_nothing_of_the_digits_family():
    code = ("import sys, soctune.run, soctune.evaluation, soctune.trainer, soctune.solvers, soctune.sde; "
            "print([m for m in sys.modules if 'digit' in m or m.startswith('soctune.examples')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_non_digits_1x8x8_model_gets_the_generic_evaluator(tmp_path):
    from soctune.run import build, evaluate_pair, sample_run

    folder = tiny_pixel_model(tmp_path / "m")
    b = build(tiny_config(str(folder)))
    assert type(b.evaluator) is GenericEvaluator and b.target is None
    summary, _, _ = evaluate_pair(b, 8, seed=0)
    assert summary["after"]["diversity"] > 0
    assert not {"target_share", "class_counts", "class_shares"} & set(summary["after"]), summary["after"]
    out = sample_run(model=str(folder), process="ddpm", loras=[], num_steps=4, noise_scale=None, n=4, seed=0,
                     out=tmp_path / "s")
    assert (out / "samples.npz").is_file() and not (out / "summary.json").exists()


@needs_assets
def test_the_digits_models_get_the_digits_evaluator(tmp_path):
    from soctune.examples.digits.evaluator import DigitsEvaluator
    from soctune.run import build, evaluate_pair, sample_run

    b = build(tiny_config("digits-ddpm"))
    assert isinstance(b.evaluator, DigitsEvaluator) and b.target == 3
    assert b.features(torch.zeros(2, 1, 8, 8)).shape == (2, 128)  # the classifier's features, not pixels
    summary, _, _ = evaluate_pair(b, 16, seed=0)
    after = summary["after"]
    assert 0 <= after["target_share"] <= 1 and sum(after["class_counts"]) == 16 and len(after["class_shares"]) == 10
    # with a reward the evaluator has no target for: class report, no target share
    b = build(tiny_config("digits-ddpm", "reward=brightness"))
    assert b.target is None
    assert "target_share" not in evaluate_pair(b, 8, seed=0)[0]["after"]
    out = sample_run(model="digits-flow", process="fm-memoryless", loras=[], num_steps=4, noise_scale=None, n=4,
                     seed=0, out=tmp_path / "s")
    report = json.loads((out / "summary.json").read_text())
    assert report["evaluator"] == "digits" and report["n"] == 4 and sum(report["class_counts"]) == 4


def test_a_folder_naming_an_unknown_or_unregistered_evaluator_is_one_line_error(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    decl = folder / "soctune.json"
    decl.write_text(json.dumps({"evaluator": "nope"}))
    with pytest.raises(SoctuneError, match="unknown evaluator 'nope'.*soctune.json.*digits, generic") as err:
        evaluator_for(folder)
    assert "\n" not in str(err.value)
    # an import path is never imported (the folder may come from anywhere)
    (tmp_path / "sidefx.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\nclass E: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    decl.write_text(json.dumps({"evaluator": "sidefx:E"}))
    with pytest.raises(SoctuneError, match="import paths are not accepted"):
        evaluator_for(folder)
    assert not (tmp_path / "ran").exists() and "sidefx" not in sys.modules
    for bad in ("{not json", json.dumps({"evaluator": 3}), json.dumps(["digits"])):
        decl.write_text(bad)
        with pytest.raises(SoctuneError, match="soctune.json") as err:
            evaluator_for(folder)
        assert "\n" not in str(err.value)
    decl.unlink()
    assert type(evaluator_for(folder)) is GenericEvaluator


def test_feature_extractors_by_evaluator_name():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert feature_extractor("generic")(x).shape == (3, 64)
    with pytest.raises(SoctuneError, match="unknown feature extractor 'os:getcwd'"):
        feature_extractor("os:getcwd")


@pytest.mark.parametrize("full,solver", [(True, "draft"), (False, "adjoint-matching")])
def test_evaluate_loads_the_runs_trained_weights(tmp_path, full, solver):
    """`soctune evaluate` reproduces the run's own after-metrics (same n and seed), so it
    evaluates the trained network — model/ for a full fine-tuning run, lora/ otherwise — not an
    untouched copy; without them it is a one-line error. A solver that claims the tilt gets the SOC
    report (J of both chains, J*_K, the gap), a reward maximiser (DRaFT) none."""
    from soctune.run import evaluate_run, finetune_config

    folder = tiny_pixel_model(tmp_path / "m")
    extra = ["solver.step_weighting=am"] if solver == "adjoint-matching" else []  # the tiny model clips x̂₁
    cfg = tiny_config(str(folder), f"model.full_finetune={str(full).lower()}", f"solver.name={solver}", *extra,
                      "reward=brightness", "train.iters=3",
                      "train.batch_size=4", "train.lr=0.05", "eval.n_samples=8", "eval.grid=4")
    run = finetune_config(cfg, out=tmp_path / "run")
    trained = tmp_path / "run" / ("model" if full else "lora")
    assert trained.is_dir() and not (tmp_path / "run" / ("lora" if full else "model")).exists()
    summary, _ = evaluate_run(tmp_path / "run", n=8, seed=cfg["eval"]["seed"])
    after, before = summary["after"]["reward_mean"], summary["before"]["reward_mean"]
    assert after == pytest.approx(run.summary["after"]["reward_mean"], abs=1e-5)
    assert before == pytest.approx(run.summary["before"]["reward_mean"], abs=1e-5)
    assert abs(after - before) > 1e-4  # the run changed the model, and the evaluation sees it
    if solver == "draft":
        assert "soc" not in summary
    else:  # J of both chains and the K-step bound from the same draws
        soc = summary["soc"]
        assert soc["base_soc_cost"] == pytest.approx(-soc["reward_scale"] * before, rel=1e-4, abs=1e-5)  # no control
        assert soc["soc_cost"] > -soc["reward_scale"] * after  # + Σ½‖u‖² > 0
        assert soc["soc_gap"] == pytest.approx(soc["soc_cost"] - soc["soc_lower_bound"])
        assert soc["soc_gap"] > -3 * soc["soc_gap_se"]  # Donsker–Varadhan: J ≥ J*_K up to noise
        # where the control cost sits: the per-step means add up to J + λ E[r] (no running cost here)
        by_step, costliest = soc["control_cost_by_step"], soc["costliest_step"]
        assert sum(by_step) == pytest.approx(soc["soc_cost"] + soc["reward_scale"] * after, rel=1e-4, abs=1e-6)
        assert costliest["control_cost"] == max(by_step) == by_step[costliest["step"]] > 0
        assert costliest["t"][0] < costliest["t"][1] and costliest["noise_std"] > 0
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["after"]["reward_mean"] == after
    for f in trained.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(SoctuneError, match="did not finish.*--resume") as err:
        evaluate_run(tmp_path / "run", n=8)
    assert "\n" not in str(err.value)


def test_presets_live_in_configs_and_ship_in_the_package():
    assert not (ROOT / "soctune" / "configs").exists()
    assert cfgmod.PRESETS_DIR == ROOT / "configs" and set(cfgmod.list_presets()) == {
        p.stem for p in (ROOT / "configs").glob("*.yaml")}
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["soctune.configs"] == "configs" and "soctune.configs" in tool["packages"]
    assert tool["package-data"]["soctune.configs"] == ["*.yaml"]
    # every package of the source tree is listed (a missing one would be left out of the wheel)
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "soctune").rglob("__init__.py")}
    assert found <= set(tool["packages"]), found - set(tool["packages"])


@pytest.mark.slow
def test_a_wheel_carries_the_presets_and_the_digits_family(tmp_path):
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("soctune", "cli", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)

    names = set(zipfile.ZipFile(next(tmp_path.glob("soctune-*.whl"))).namelist())
    assert {f"soctune/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    assert {"soctune/examples/digits/evaluator.py", "soctune/assets/digits/ddpm/soctune.json",
            "soctune/assets/digits/flow/soctune.json"} <= names


def test_digits_pretraining_logs_instead_of_printing(tmp_path, capsys, caplog):
    from soctune.examples.digits.pretrain import pretrain_classifier

    with caplog.at_level(logging.INFO, logger="soctune.examples.digits.pretrain"):
        path = pretrain_classifier(tmp_path, epochs=1)
    assert path.is_file() and capsys.readouterr().out == ""
    assert any("held-out accuracy" in r.getMessage() for r in caplog.records)
