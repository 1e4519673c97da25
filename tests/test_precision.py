"""The trainer under mixed precision, on the CPU where torch allows it (bf16 autocast), and the
plain-PyTorch meaning of its fp32 update.

fp16 needs accelerate's gradient scaler, which runs on accelerators only; on a CPU it is refused
with one line (tests/test_reliability.py), and its path — scaler, one optimiser step per update —
is exercised by tests/test_gpu.py (marked ``gpu``) and benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import needs_assets
from test_diffusers_models import PROMPTS, build_sd

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

#: every registered solver, with options that keep 2 iterations on the tiny pipeline quick
SOLVERS = {
    "adjoint-matching": {"num_loss_steps": 2},
    "nabla-db": {"transitions": 2},
    "draft": {"k": 1},
    "ddpo": {"inner_epochs": 2, "minibatches": 2, "clip_range": 0.2},
    "db": {"transitions": 2},
}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("models") / "sd")


def test_every_solver_is_covered():
    from soctune.solvers import list_solvers

    assert sorted(SOLVERS) == sorted(name for name, _ in list_solvers())


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_trains_tiny_sd_in_bf16(sd_dir: Path, tmp_path: Path, solver: str) -> None:
    """2 iterations of each solver on the tiny Stable Diffusion pipeline with --precision bf16
    through the one entry point: finite losses, the frozen UNet in bf16 while the LoRA weights
    and Adam's moments are float32, one optimiser step per reported update, and the saved LoRA
    loads with diffusers' own ``load_lora_weights``. (One optimiser step per update: below.)"""
    from diffusers import StableDiffusionPipeline

    from soctune import finetune

    torch.set_num_threads(1)
    run = finetune({"model": {"path": str(sd_dir), "prompts": PROMPTS, "lora_rank": 4},
                    "process": {"name": "ddpm", "num_steps": 4,
                                "scheduler_config": {"timestep_spacing": "trailing"}},
                    "solver": {"name": solver, "reward_scale": 10.0, **SOLVERS[solver]},
                    "reward": "brightness", "eval": {"n_samples": 2, "grid": 2}},
                   out=tmp_path / "run", iters=2, batch_size=2, lr=1e-2, device="cpu", precision="bf16")
    trainer = run.trainer
    assert len(run.metrics) == 2
    for h in run.metrics:
        assert math.isfinite(h["loss"]) and h["updates"] >= 1, h
    net = run.built.loaded.network
    frozen = [p for p in net.parameters() if not p.requires_grad]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    for st in trainer.optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and k != "step":
                assert v.dtype == torch.float32, k
    assert run.summary is not None and run.summary["precision"] == "bf16"
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_optimiser_step_per_update(sd_dir: Path, precision: str) -> None:
    """DDPO with 2 epochs × 2 minibatches reports 4 updates per iteration: the wrapped optimiser
    steps exactly 4 times (no double step through accelerate's wrapper, DESIGN.md §7)."""
    from soctune import TrainConfig, Trainer
    from soctune.models.diffusers_model import load_model
    from soctune.rewards import get_reward
    from soctune.solvers import get_solver
    from soctune.trainer import make_accelerator

    torch.set_num_threads(1)
    acc = make_accelerator("cpu", precision)
    m = load_model(sd_dir, lora_rank=4, device=acc.device,
                   dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    proc = m.default_process("ddpm", num_steps=4, scheduler_config={"timestep_spacing": "trailing"})
    trainer = Trainer(proc, m.model, get_solver("ddpo", **SOLVERS["ddpo"]), m.image_reward(get_reward("brightness")),
                      m.sample_shape, TrainConfig(iters=1, batch_size=4, lr=1e-3, device="cpu", precision=precision),
                      cond_sampler=m.cond_sampler(PROMPTS), accelerator=acc)
    steps = {"n": 0}
    trainer.optimizer.optimizer.register_step_post_hook(lambda *a: steps.__setitem__("n", steps["n"] + 1))
    metrics = trainer.train_iteration()
    assert metrics["updates"] == 4.0 and steps["n"] == 4


@needs_assets
@pytest.mark.parametrize("solver", ["adjoint-matching", "nabla-db"])
def test_fp32_update_is_the_plain_pytorch_update(solver: str) -> None:
    """In fp32 on one process the trainer's update is the textbook one: backpropagate each loss
    part as the solver yields it, clip the global norm, one AdamW step per closing part. The
    same iteration written that way by hand gives the same weights to 1e-6 (the accelerate
    wrapper, the shard context and the float32 reward wrapper change nothing)."""
    from soctune import Trainer
    from soctune.config import defaults, merge, validate
    from soctune.run import build, train_config
    from soctune.solvers.base import FinetuneContext

    torch.set_num_threads(1)
    cfg = validate(merge(defaults(), {"process": {"name": "fm-memoryless", "num_steps": 6},
                                      "solver": {"name": solver}, "train": {"batch_size": 8, "lr": 1e-2, "seed": 5}}))
    if solver == "nabla-db":
        cfg = validate(merge(cfg, {"process": {"name": "ddpm", "num_steps": 6}, "solver": {"name": "nabla-db"}}))
    tc = train_config(cfg)

    torch.manual_seed(tc.seed)
    b = build(cfg)
    trainer = Trainer(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape), tc)
    trainer.train_iteration()
    got = {n: p.detach().clone() for n, p in trainer._named_trainable()}

    torch.manual_seed(tc.seed)
    b = build(cfg)
    gen = torch.Generator().manual_seed(tc.seed)
    ctx = FinetuneContext(process=b.process, model=b.loaded.model, reward=b.reward,
                          sample_shape=tuple(b.loaded.sample_shape), batch_size=tc.batch_size, generator=gen)
    torch.manual_seed(tc.seed)
    b.solver.setup(ctx)
    params = [*b.loaded.model.trainable_parameters(), *b.solver.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    for out in b.solver.iteration(ctx):
        if out.loss.requires_grad:
            out.loss.backward()
        if not out.accumulate:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    want = {f"model.{n}": p.detach() for n, p in b.loaded.model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    assert max(float(w.abs().max()) for n, w in want.items() if "lora_B" in n) > 0  # a real update (B starts at 0)
    for n in want:
        assert float((got[n] - want[n]).abs().max()) <= 1e-6, n
