"""Stable-Diffusion-scale plumbing on the tiny pipeline: network gradient checkpointing changes no
gradient, the prompt set's cached embeddings equal a fresh encoding and the text encoders leave
the accelerator, prompt files parse with one-line errors, and a run writes per-prompt results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soctune.models.diffusers_model import load_model
from soctune.registry import SoctuneError
from soctune.trajectory import GradSpec, rollout
from test_diffusers_models import PROMPTS, build_sd

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("models") / "sd")


def _grads(sd_dir: Path, checkpointing: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """LoRA gradients of a reward through a 3-step rollout with the graph kept (DRaFT's path),
    and the gradient w.r.t. the state of one base-model step (the lean adjoint's VJP)."""
    from soctune.rewards import get_reward

    torch.manual_seed(0)
    m = load_model(sd_dir, lora_rank=4, gradient_checkpointing=checkpointing)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a real effect
        for p in m.trainable_parameters():
            p.normal_(0, 0.05)
    proc = m.default_process("ddpm", num_steps=3, scheduler_config={"timestep_spacing": "trailing"})
    cond = m.encode_prompts(PROMPTS[:2])
    reward = m.image_reward(get_reward("brightness"))
    traj = rollout(proc, m.model, batch_size=2, sample_shape=m.sample_shape, cond=cond,
                   generator=torch.Generator().manual_seed(1), grad=GradSpec.all(checkpoint=False), reward_fn=reward)
    traj.reward.sum().backward()
    grads = [p.grad.detach().clone() for p in m.trainable_parameters()]
    x = traj.xs[1].clone().requires_grad_(True)
    with m.base():  # the backward too: checkpointing recomputes the forward in the adapter state of its backward
        out = m.model(x, torch.full((2,), float(proc.model_time(1))), cond)
        (vjp,) = torch.autograd.grad(out, x, torch.ones_like(out))
    return grads, vjp


def test_gradient_checkpointing_gives_the_same_gradients(sd_dir: Path) -> None:
    """fp32: on vs off agree to 1e-5 relative (recomputation repeats the same float ops; the
    measured difference is 0 on this CPU)."""
    g_off, v_off = _grads(sd_dir, False)
    g_on, v_on = _grads(sd_dir, True)
    scale = max(float(g.abs().max()) for g in g_off)
    assert scale > 0
    assert max(float((a - b).abs().max()) for a, b in zip(g_on, g_off)) <= 1e-5 * scale
    assert float((v_on - v_off).abs().max()) <= 1e-5 * float(v_off.abs().max())


def test_cached_prompt_embeddings_equal_a_fresh_encoding_and_encoders_are_released(sd_dir: Path) -> None:
    m = load_model(sd_dir, lora_rank=0)
    sampler = m.cond_sampler(PROMPTS)
    m.release_text_encoders()
    assert all(next(e.parameters()).device.type == "cpu" for e in m.text_encoders())
    cond = sampler(6, torch.Generator().manual_seed(0))
    fresh = m.encode_prompts(cond.prompts)  # encoders now where they were released to
    assert torch.equal(cond["encoder_hidden_states"], fresh["encoder_hidden_states"])
    assert cond["encoder_hidden_states"].device == m.device


def test_negative_prompt_is_the_unconditional_branch(sd_dir: Path) -> None:
    plain = load_model(sd_dir, lora_rank=0, guidance_scale=3.0)
    neg = load_model(sd_dir, lora_rank=0, guidance_scale=3.0, negative_prompt="blurry")
    assert torch.equal(neg.denoiser.null_cond["encoder_hidden_states"],
                       plain.encode_prompts(["blurry"])["encoder_hidden_states"])
    assert not torch.equal(neg.denoiser.null_cond["encoder_hidden_states"],
                           plain.denoiser.null_cond["encoder_hidden_states"])


# ------------------------------------------------------------------------------- prompt files
def test_prompt_files_txt_jsonl_and_shipped(tmp_path: Path) -> None:
    from soctune.prompts import prompt_list, read_prompt_file, shipped_prompt_sets

    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\na cat\n\n   \na dog  \n# not a prompt\n")
    assert prompt_list(txt) == ["a cat", "a dog"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "split": "train"}\n\n{"prompt": "a dog"}\n')
    entries = read_prompt_file(jl)
    assert [e.prompt for e in entries] == ["a cat", "a dog"] and entries[0].metadata == {"split": "train"}
    sets = shipped_prompt_sets()
    assert {"animals", "animal-activities", "scenes"} <= set(sets) and all(sets.values())
    assert len(prompt_list("animals")) >= 40


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "a cat"}\n{"prompt": "a dog",}\n', "p.jsonl:2: not a JSON object"),
    ('{"prompt": "a cat"}\n\n["a dog"]\n', "p.jsonl:3: expected an object with a non-empty \"prompt\""),
    ('{"text": "a cat"}\n', "p.jsonl:1: expected an object"),
    ("\n\n", "holds no prompts"),
])
def test_bad_prompt_file_is_one_line_with_the_line_number(tmp_path: Path, content: str, needle: str) -> None:
    from soctune.prompts import read_prompt_file

    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(SoctuneError) as ei:
        read_prompt_file(f)
    assert needle in str(ei.value) and "\n" not in str(ei.value), str(ei.value)


def test_missing_prompt_file_names_the_shipped_sets() -> None:
    from soctune.prompts import prompt_list

    with pytest.raises(SoctuneError, match="shipped set: animal-activities, animals, scenes"):
        prompt_list("/no/such/prompts.txt")


def test_run_with_a_prompt_file_writes_per_prompt_results(sd_dir: Path, tmp_path: Path) -> None:
    """--prompts FILE on the tiny pipeline: per-prompt reward statistics in summary.json and one
    before/after picture per prompt."""
    from typer.testing import CliRunner

    from soctune_cli.app import app

    torch.set_num_threads(1)
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "finetune", "--model", str(sd_dir), "--process", "ddpm", "--solver", "draft", "--set", "solver.k=1",
        "--reward", "brightness", "--prompts", str(pf), "--negative-prompt", "dark", "--guidance-scale", "2",
        "--iters", "1", "--batch-size", "2", "--num-steps", "3", "--set", "eval.n_samples=6",
        "--set", "eval.grid=2", "--set", "eval.prompt_grids=2", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    summary = json.loads((out / "summary.json").read_text())
    per = summary["per_prompt"]
    assert set(per) <= set(PROMPTS[:3]) and sum(v["n"] for v in per.values()) == 6
    assert sorted(p.name for p in (out / "prompts").iterdir()) == ["00.png", "01.png"]


@pytest.mark.parametrize("solver, options", [("adjoint-matching", {"num_loss_steps": 2}), ("nabla-db", {}),
                                             ("draft", {"k": 2}), ("ddpo", {}), ("db", {})])
def test_every_solver_takes_the_same_update_with_checkpointing(sd_dir: Path, solver: str, options: dict) -> None:
    """One fp32 update of each solver with network checkpointing on equals the one without (the
    gradient, read from Adam's first moment, to 1e-5 relative): recomputation happens in the
    adapter state of the forward (base-model VJPs backpropagated outside ``model.base()``)."""
    from soctune import TrainConfig, Trainer
    from soctune.rewards import get_reward
    from soctune.solvers import get_solver

    torch.set_num_threads(1)

    def moments(ckpt: bool) -> torch.Tensor:
        torch.manual_seed(0)
        m = load_model(sd_dir, lora_rank=4, gradient_checkpointing=ckpt)
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.normal_(0, 0.05)
        proc = m.default_process("ddpm", num_steps=4, scheduler_config={"timestep_spacing": "trailing"})
        t = Trainer(proc, m.model, get_solver(solver, reward_scale=10.0, **options),
                    m.image_reward(get_reward("brightness")), m.sample_shape,
                    TrainConfig(batch_size=2, seed=0, device="cpu"), cond_sampler=m.cond_sampler(PROMPTS))
        t.train_iteration()
        st = t.optimizer.state
        return torch.cat([st[p]["exp_avg"].flatten() for p in m.trainable_parameters() if p in st])

    off, on = moments(False), moments(True)
    assert off.abs().max() > 0
    assert float((on - off).abs().max()) <= 1e-5 * float(off.abs().max())
