"""Runs: the one entry point :func:`finetune` (what ``soctune finetune`` calls), build
everything from a config, fine-tune into an output folder (checkpoints, metrics, pictures, LoRA,
summary), resume, sample and evaluate.

The library never prints: progress reaches the caller through ``on_event(kind, payload)``.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import config as cfgmod
from .config import TrainConfig
from .evaluation import Evaluator, compare, evaluate_samples, evaluator_for, tilt_fidelity
from .io import (UnsafeOrCorruptStateError, append_jsonl, atomic_write_text, load_state, plot_curve, save_grid,
                 save_side_by_side, save_state)
from .models.base import Denoiser, base_if, resolve_sample_shape
from .registry import SoctuneError
from .rewards import get_reward
from .sde.base import Process
from .soc import StepCosts, cost_summary, path_costs
from .solvers import Solver, get_solver
from .trainer import Float32Reward, NonFiniteError, Trainer, make_accelerator
from .trajectory import RewardFn, rollout

EventFn = Callable[[str, dict[str, Any]], None]
#: process -> the shipped model alias it samples by default
DEFAULT_MODELS = {"ddpm": "digits-ddpm", "dpmpp-sde": "digits-ddpm", "fm-memoryless": "digits-flow"}
CKPT_RE = re.compile(r"^ckpt-(\d{6})\.safetensors$")
PICKLED_CKPT_RE = re.compile(r"^ckpt-(\d{6})\.(pt|pth|bin|pkl)$")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _noop(kind: str, payload: dict[str, Any]) -> None:
    return None


def default_model_for(process_name: str) -> str:
    """The shipped model matching a process (ε model for VP processes, velocity model for flow
    processes)."""
    if process_name in DEFAULT_MODELS:
        return DEFAULT_MODELS[process_name]
    raise SoctuneError(f"process '{process_name}' has no shipped default model; pass --model PATH "
                       f"(shipped defaults exist for {', '.join(DEFAULT_MODELS)})")


def frozen_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """dtype of the frozen base weights: ``model.frozen_dtype``, where ``auto`` follows
    ``train.precision`` (bf16/fp16 halve the frozen weights' memory; LoRA stays float32)."""
    name = cfg["model"]["frozen_dtype"]
    return DTYPES[cfg["train"]["precision"] if name == "auto" else name]


@dataclass
class Built:
    """A run's parts. ``features``/``images`` map states [N, *S] to the evaluator's features
    [N, D] / decoded images [N, C, H, W] (on the CPU); ``evaluator`` is the one the model folder
    declares and ``target`` what it reads the reward as favouring (None: no target report)."""

    cfg: dict[str, Any]
    loaded: Any
    process: Process
    solver: Solver
    reward: Any
    features: Callable[[Tensor], Tensor]
    images: Callable[[Tensor], Tensor]
    evaluator: Evaluator
    target: Any
    cond_sampler: Any


def build(cfg: dict[str, Any], device: str | torch.device = "cpu") -> Built:
    """Model, process, solver and reward from a validated config, on ``device`` (one-line
    errors on misuse). The frozen weights are loaded in :func:`frozen_dtype`."""
    from .models.diffusers_model import load_model, resolve_model_path

    m = cfg["model"]
    proc_cfg = dict(cfg["process"])
    pname = proc_cfg.pop("name")
    path = m["path"] or default_model_for(pname)
    dev = torch.device(device)
    prompts = run_prompts(cfg)
    loaded = load_model(path, lora_rank=m["lora_rank"], lora_alpha=m["lora_alpha"], target_modules=m["target_modules"],
                        full_finetune=m["full_finetune"], guidance_scale=m["guidance_scale"], device=dev,
                        dtype=frozen_dtype(cfg), gradient_checkpointing=gradient_checkpointing(cfg, path),
                        vae_tiling=m["vae_tiling"], negative_prompt=m["negative_prompt"])
    num_steps = proc_cfg.pop("num_steps", cfgmod.defaults()["process"]["num_steps"])
    process = loaded.default_process(pname, num_steps=num_steps, **proc_cfg)
    sol_cfg = dict(cfg["solver"])
    solver = get_solver(sol_cfg.pop("name"), **sol_cfg)
    solver.check(process, loaded.model)
    raw_reward = get_reward(cfg["reward"])
    if isinstance(raw_reward, torch.nn.Module):
        raw_reward = raw_reward.to(dev)
    reward = loaded.image_reward(raw_reward) if loaded.is_latent else raw_reward
    evaluator = evaluator_for(resolve_model_path(path))

    def images(x: Tensor) -> Tensor:
        with torch.no_grad():
            return loaded.decode(x.to(dev)).float().cpu()

    def features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return evaluator.features(images(x)).cpu()

    cond_sampler = loaded.cond_sampler(prompts) if prompts else None
    if cond_sampler is None and getattr(loaded.denoiser, "needs_cond", False):
        raise SoctuneError("this model is text/class-conditional; pass prompts with --prompts FILE (or --set "
                           "model.prompts='[\"a cat\"]')")
    loaded.release_text_encoders()  # the prompt set and the null prompt are encoded: free the accelerator
    return Built(cfg, loaded, process, solver, reward, features, images, evaluator, evaluator.target(cfg["reward"]),
                 cond_sampler)


def run_prompts(cfg: dict[str, Any]) -> list[str] | None:
    """The run's prompts: ``model.prompt_file`` (a file or shipped set) or ``model.prompts``."""
    from .prompts import prompt_list

    m = cfg["model"]
    if m["prompt_file"] and m["prompts"]:
        raise SoctuneError("pass either model.prompts or model.prompt_file (--prompts), not both")
    return prompt_list(m["prompt_file"]) if m["prompt_file"] else m["prompts"]


def gradient_checkpointing(cfg: dict[str, Any], path: str) -> bool:
    """``model.gradient_checkpointing``: auto = on for latent models (a ``vae/`` next to the
    network: the Stable Diffusion class, where activations dominate memory), off for small
    pixel models, where it only costs time."""
    v = str(cfg["model"]["gradient_checkpointing"]).lower()
    if v != "auto":
        return v == "true"
    from .models.diffusers_model import resolve_model_path

    return (resolve_model_path(path) / "vae" / "config.json").is_file()


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of a validated run config."""
    return TrainConfig(**cfg["train"])


# ------------------------------------------------------------------------------- sampling
class Draw(NamedTuple):
    """:func:`draw`'s samples: states [n, *S] and rewards [n] on the CPU, the conditioning of each batch,
    and (when asked for) each rollout's SOC path cost [n] float64 (:func:`soctune.soc.path_costs`) and, for
    the fine-tuned model, its control cost per step (:class:`soctune.soc.StepCosts`, on the CPU)."""

    x: Tensor
    rewards: Tensor
    conds: list[Any]
    costs: Tensor | None = None
    step_costs: StepCosts | None = None


def draw(b: Built, n: int, seed: int, base: bool, batch: int = 256, device: str | torch.device = "cpu",
         autocast: Any = None, cond_sampler: Any = None, costs: bool = False) -> Draw:
    """n samples from the base or fine-tuned model with a fixed seed (:class:`Draw`). Sampled on
    ``device`` (the noise comes from a generator there) under ``autocast`` (a context factory, e.g. the
    trainer's); ``cond_sampler`` overrides the run's (e.g. one prompt). ``costs``: also each rollout's
    SOC path cost at the solver's λ (for the fine-tuned model one more base forward per step)."""
    dev = torch.device(device)
    cond_sampler = cond_sampler or b.cond_sampler
    gen = torch.Generator(device=dev).manual_seed(seed)
    reward = Float32Reward(b.reward, dev.type)
    xs, rs, conds, cs = [], [], [], []
    steps: StepCosts | None = None
    model = b.loaded.model
    for start in range(0, n, batch):
        m = min(batch, n - start)
        cond = cond_sampler(m, gen) if cond_sampler is not None else None
        with base_if(model, base), torch.no_grad():
            with (autocast or nullcontext)():
                traj = rollout(b.process, model, batch_size=m, sample_shape=tuple(b.loaded.sample_shape), cond=cond,
                               generator=gen, device=dev)
            x = traj.x_final.float()
            r = reward(x, cond)
            if costs:
                with (autocast or nullcontext)():
                    c = path_costs(b.process, model, traj, r, b.solver.reward_scale, controlled=False)
                    if not base:
                        batch_steps = StepCosts.of(b.process, model, traj)
                        c = c + batch_steps.costs.to(c.device).sum(0)
                        steps = batch_steps if steps is None else steps.cat(batch_steps)
                cs.append(c.cpu())
            rs.append(r.cpu())
            xs.append(x.cpu())
        conds.append(cond)
    return Draw(torch.cat(xs), torch.cat(rs), conds, torch.cat(cs) if costs else None, steps)


def evaluate_pair(b: Built, n: int, seed: int, device: str | torch.device = "cpu",
                  autocast: Any = None) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Base vs fine-tuned on the same seeds. Returns (summary, base images, fine-tuned images). For a
    solver that claims the tilt (:attr:`~soctune.solvers.base.Solver.claims_tilt`) the summary's ``soc``
    holds J of the fine-tuned chain, the K-step lower bound J*_K from the base draws and the gap
    (:func:`soctune.soc.cost_summary`)."""
    soc = b.solver.claims_tilt
    base = draw(b, n, seed, base=True, device=device, autocast=autocast, costs=soc)
    tuned = draw(b, n, seed, base=False, device=device, autocast=autocast, costs=soc)  # same seed: same prompts
    xb, rb, xf, rf = base.x, base.rewards, tuned.x, tuned.rewards
    fb, ff = b.features(xb), b.features(xf)
    ib, i_f = b.images(xb), b.images(xf)
    before = evaluate_samples(xb, rb, fb, evaluator=b.evaluator, images=ib, target=b.target)
    after = evaluate_samples(xf, rf, ff, evaluator=b.evaluator, images=i_f, target=b.target)
    summary = compare(before, after, ff, fb)
    prompts = [p for c in base.conds for p in (getattr(c, "prompts", None) or [])]
    if len(prompts) == n:
        summary["per_prompt"] = per_prompt_rewards(prompts, rb, rf)
    r_max = getattr(b.reward, "maximum", None)
    if r_max is not None:
        summary["target_fidelity"] = tilt_fidelity(ff, fb, rb, b.solver.reward_scale, float(r_max),
                                                   torch.Generator().manual_seed(seed + 1))
    if soc:
        assert tuned.costs is not None and base.costs is not None
        summary["soc"] = {"reward_scale": b.solver.reward_scale,
                          **cost_summary(tuned.costs, base.costs, tuned.step_costs)}
    return summary, ib, i_f


def per_prompt_rewards(prompts: list[str], before: Tensor, after: Tensor) -> dict[str, dict[str, float]]:
    """Reward statistics per prompt of paired samples (same seeds, so the same prompts):
    prompt -> {n, before, after, before_std, after_std} (means and population stds)."""
    out: dict[str, dict[str, float]] = {}
    for prompt in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, q in enumerate(prompts) if q == prompt])
        rb, ra = before[idx].double(), after[idx].double()
        out[prompt] = {"n": int(idx.numel()), "before": float(rb.mean()), "after": float(ra.mean()),
                       "before_std": float(rb.std(unbiased=False)), "after_std": float(ra.std(unbiased=False))}
    return out


def save_prompt_grids(b: Built, folder: Path, prompts: list[str], n: int, seed: int, device: Any,
                      autocast: Any) -> None:
    """One before/after picture per prompt (same seeds), ``folder/NN.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        one = b.loaded.cond_sampler([prompt])
        before = draw(b, n, seed, base=True, device=device, autocast=autocast, cond_sampler=one)
        after = draw(b, n, seed, base=False, device=device, autocast=autocast, cond_sampler=one)
        save_side_by_side(b.images(before.x), b.images(after.x), folder / f"{i:02d}.png",
                          (f"{prompt[:40]} — base {float(before.rewards.mean()):.3f}",
                           f"fine-tuned {float(after.rewards.mean()):.3f}"))


# ------------------------------------------------------------------------------- run folders
class RunDir:
    """Layout of an output folder."""

    def __init__(self, out: str | Path) -> None:
        self.root = Path(out)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.ckpts = self.root / "checkpoints"
        self.lora = self.root / "lora"
        self.summary = self.root / "summary.json"

    def checkpoints(self) -> list[Path]:
        if not self.ckpts.is_dir():
            return []
        return sorted((p for p in self.ckpts.iterdir() if CKPT_RE.match(p.name)), reverse=True)

    def pickled_checkpoints(self) -> list[Path]:
        if not self.ckpts.is_dir():
            return []
        return sorted(p for p in self.ckpts.iterdir() if PICKLED_CKPT_RE.match(p.name))


def save_checkpoint(rd: RunDir, trainer: Trainer, keep: int = 2) -> Path:
    """Write ``checkpoints/ckpt-{step:06d}.safetensors`` atomically (write-then-rename: a crash
    or a full disk never leaves a partial file under a checkpoint name; tensors in safetensors,
    everything else as JSON in its header — nothing that loading could execute), then drop all
    but the newest ``keep``. Older checkpoints are deleted only after the new one is in place."""
    path = rd.ckpts / f"ckpt-{trainer.step:06d}.safetensors"
    save_state(path, trainer.state_dict())
    for old in rd.checkpoints()[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(rd: RunDir, trainer: Trainer, on_event: EventFn) -> int:
    """Restore the newest checkpoint that loads; corrupt ones are reported and skipped, and a
    pickled one (``ckpt-*.pt``, or a pickle under a checkpoint name) is refused unread.

    Data-parallel: process 0 reads the checkpoint and broadcasts its state, so every process
    resumes from the same one (and nodes need no shared file system). Returns the iteration
    resumed at.
    """
    state: dict[str, Any] | None = None
    if trainer.is_main:
        pickled = rd.pickled_checkpoints()
        if pickled and not rd.checkpoints():
            raise SoctuneError(f"{pickled[-1].relative_to(rd.root)} is a pickled checkpoint; soctune never unpickles "
                               "run files (loading a pickle can execute code) — start a new run or resume one "
                               "written as ckpt-*.safetensors")
        _remove_stale_temporaries(rd)
        for path in rd.checkpoints():
            try:
                candidate = load_state(path)
                trainer.load_state_dict(candidate)
            except UnsafeOrCorruptStateError as exc:  # truncated, corrupt or a pickle: fall back to an older one
                on_event("warning", {"message": f"{exc}; trying an older checkpoint"})
                continue
            except SoctuneError:
                raise
            except Exception as exc:  # noqa: BLE001 — readable but not a checkpoint of this run
                detail = " ".join(str(exc).split())[:120]
                on_event("warning", {"message": f"checkpoint {path.name} is unusable ({type(exc).__name__}: "
                                                f"{detail}); trying an older one"})
                continue
            state = candidate
            on_event("phase", {"message": f"resuming from {path.relative_to(rd.root)} (iteration {trainer.step})"})
            break
        else:
            if rd.ckpts.is_dir():
                on_event("warning", {"message": "no valid checkpoint found; starting from iteration 0"})
    if trainer.world_size > 1:
        from accelerate.utils import broadcast_object_list

        box = broadcast_object_list([state], from_process=0)  # between this job's own processes
        state = box[0]
        if state is not None and not trainer.is_main:
            trainer.load_state_dict(state)
    return trainer.step


def _remove_stale_temporaries(rd: RunDir) -> None:
    """Delete the temporary files of writes interrupted by a crash (never taken for checkpoints)."""
    if rd.ckpts.is_dir():
        for p in rd.ckpts.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- the run object
@dataclass
class FinetuneRun:
    """What :func:`finetune` returns: the trained :class:`~soctune.trainer.Trainer`, the output
    folder (if any), the evaluation summary (config runs with an output folder) and, for models
    loaded from a diffusers folder, the :class:`Built` parts."""

    trainer: Trainer
    out: Path | None = None
    summary: dict[str, Any] | None = None
    built: Built | None = field(default=None, repr=False)

    @property
    def metrics(self) -> list[dict[str, float]]:
        """One dict per iteration (reward_mean, loss, grad_norm, time, …)."""
        return self.trainer.history

    @property
    def model(self) -> Denoiser:
        return self.trainer.model

    def sample(self, n: int, seed: int = 0, process: Process | None = None, base: bool = False,
               cond: Any = None) -> Tensor:
        """n samples [n, *S] (float32) of the fine-tuned model (``base=True``: the base model);
        ``process`` samples with another process (e.g. another noise level)."""
        return self.trainer.sample(n, seed=seed, process=process, base=base, cond=cond)

    def save_lora(self, folder: str | Path) -> Path:
        """The trained adaptation into ``folder``: a diffusers model's LoRA in diffusers format
        (``pipe.load_lora_weights(folder)``; full fine-tuning: the whole network), otherwise the
        trainable tensors of the model as ``adapter.safetensors``."""
        folder = Path(folder)
        if self.built is not None:
            if self.built.cfg["model"]["full_finetune"]:
                self.built.loaded.network.save_pretrained(folder)
                return folder
            return self.built.loaded.save_lora(folder)
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().float().cpu().contiguous() for n, p in self.trainer.model.named_parameters()
                   if p.requires_grad}, str(folder / "adapter.safetensors"))
        return folder


# ------------------------------------------------------------------------------- finetune
def finetune(config: str | Path | dict[str, Any] | None = None, *, model: Denoiser | str | None = None,
             process: Process | str | None = None, solver: Solver | str | None = None,
             reward: RewardFn | str | None = None, sample_shape: tuple[int, ...] | None = None,
             cond_sampler: Any = None, process_options: dict[str, Any] | None = None,
             solver_options: dict[str, Any] | None = None, out: str | Path | None = None, resume: bool = False,
             sets: list[str] | tuple[str, ...] = (), callback: Callable[[int, dict[str, float]], None] | None = None,
             on_event: EventFn = _noop, **train: Any) -> FinetuneRun:
    """Fine-tune a model on a reward — everything ``soctune finetune`` does, from Python.

    Two ways to say what to train:

    * **a diffusers model** (``model`` a folder / hub id / ``digits-ddpm``, or None for the
      shipped digits model, with ``process`` / ``solver`` / ``reward`` as names): the config is
      resolved exactly as the CLI resolves it (defaults ← preset or ``config`` file / dict ←
      these arguments ← ``sets``); with ``out`` the run writes config.yaml, metrics.jsonl,
      checkpoints (``resume=True`` continues exactly), pictures, lora/ and summary.json;
    * **any** :class:`~soctune.models.base.Denoiser` (an analytic model with a correction
      network, a user SDE's control): ``process`` and ``solver`` objects or registered names
      (options in ``process_options`` / ``solver_options``), ``reward`` a callable r(x, cond)
      -> [B]; with ``out``: metrics, checkpoints, resume. The state shape S comes from the model
      (:attr:`~soctune.models.base.Denoiser.sample_shape`, e.g. ``CorrectedDenoiser(base,
      sample_shape=(2,))``); ``sample_shape`` gives it for a model that does not know it, and
      contradicting the model is a one-line error.

    ``train``: :class:`~soctune.config.TrainConfig` fields — iters, batch_size, lr, seed,
    grad_clip, grad_accum, device ("auto", "cpu", "cuda", "cuda:N", "mps"), precision ("fp32",
    "bf16", "fp16"), log ("none", "tensorboard", "wandb"), checkpoint_every, max_nonfinite; a
    Denoiser object's :attr:`~soctune.models.base.Denoiser.train_defaults` fill what is not given.
    ``callback(step, metrics)`` is called after every iteration. Returns a :class:`FinetuneRun`
    (``.sample(n)``, ``.save_lora(dir)``, ``.metrics``, ``.summary``).

    Under ``accelerate launch`` / ``torchrun`` it trains data-parallel; only process 0 writes
    files and evaluates (``summary`` is None on the others).
    """
    bad = set(train) - set(TrainConfig.__dataclass_fields__)
    if bad:
        raise SoctuneError(f"unknown training option(s) {sorted(bad)}; valid: {sorted(TrainConfig.__dataclass_fields__)}")
    if model is None or isinstance(model, (str, Path)):
        if sample_shape is not None:
            raise SoctuneError("sample_shape is for a Denoiser object as model; a diffusers model knows its state shape "
                               "(drop sample_shape)")
        if isinstance(process, Process) or isinstance(solver, Solver) or (reward is not None and not isinstance(reward, str)):
            raise SoctuneError("with a diffusers model (a path, or None for the shipped one) pass process, solver and "
                               "reward as names; pass a Denoiser as model to use process/solver/reward objects")
        flags: dict[str, Any] = {"model.path": None if model is None else str(model), "process.name": process,
                                 "solver.name": solver, "reward": reward}
        flags.update({f"train.{k}": v for k, v in train.items()})
        layers = [{"process": process_options or {}}, {"solver": solver_options or {}}]
        cfg = cfgmod.resolve(config, flags, sets, extra_layers=layers)
        return finetune_config(cfg, out=out, resume=resume, on_event=on_event, callback=callback)
    if config is not None or sets:
        raise SoctuneError("config/sets describe a diffusers run; with a Denoiser object pass the training options as "
                           "keyword arguments")
    shape = resolve_sample_shape(model, sample_shape)
    return _finetune_objects(model, process, solver, reward, shape, cond_sampler, process_options,
                             solver_options, out, resume, on_event, callback,
                             TrainConfig(**{**model.train_defaults, **train}))


def _finetune_objects(model: Denoiser, process: Process | str | None, solver: Solver | str | None, reward: Any,
                      sample_shape: tuple[int, ...] | None, cond_sampler: Any, process_options: dict[str, Any] | None,
                      solver_options: dict[str, Any] | None, out: str | Path | None, resume: bool, on_event: EventFn,
                      callback: Any, tc: TrainConfig) -> FinetuneRun:
    from .sde import get_process

    if process is None or solver is None or reward is None or sample_shape is None:
        raise SoctuneError("with a Denoiser as model, pass process, solver, reward and sample_shape")
    if isinstance(reward, str):
        reward = get_reward(reward)
    proc = get_process(process, **(process_options or {})) if isinstance(process, str) else process
    solv = get_solver(solver, **(solver_options or {})) if isinstance(solver, str) else solver
    tc.validate()
    with _job(tc, out, resume) as (acc, rd):
        trainer = Trainer(proc, model, solv, reward, tuple(sample_shape), tc, cond_sampler=cond_sampler,
                          accelerator=acc)
        run = FinetuneRun(trainer, None if rd is None else rd.root)
        tracker_cfg = {"process": getattr(proc, "registered_name", type(proc).__name__),
                       "solver": getattr(solv, "registered_name", type(solv).__name__), **_flat("train", vars(tc))}
        _train_loop(trainer, rd, resume, on_event if acc.is_main_process else _noop, callback, tracker_cfg)
    return run


def finetune_config(cfg: dict[str, Any], out: str | Path | None = None, resume: bool = False,
                    on_event: EventFn = _noop, callback: Any = None) -> FinetuneRun:
    """Fine-tune as configured (a resolved config, see :func:`soctune.config.resolve`).

    With ``out``: writes ``config.yaml`` (resolved; rerunning with it reproduces the run),
    ``metrics.jsonl`` (one line per iteration), ``checkpoints/`` (atomic, pickle-free;
    ``resume`` continues exactly from the newest valid one),
    ``samples_before.png``/``samples_after.png``/``samples_compare.png``, ``reward.png``,
    ``lora/`` (diffusers LoRA format) and ``summary.json``, and with ``train.log`` a tensorboard
    or wandb (offline unless ``WANDB_MODE`` says otherwise) run under ``out``.
    """
    cfg = cfgmod.validate(cfg)
    tc = train_config(cfg)
    with _job(tc, out, resume) as (acc, rd):
        main = acc.is_main_process
        b = build(cfg, acc.device)
        resolved = dict(cfg, model=dict(cfg["model"], path=cfg["model"]["path"] or
                                        default_model_for(cfg["process"]["name"])))
        if main and rd is not None:
            atomic_write_text(rd.config, cfgmod.dump(resolved))
        trainer = Trainer(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape), tc,
                          cond_sampler=b.cond_sampler, accelerator=acc)
        run = FinetuneRun(trainer, None if rd is None else rd.root, built=b)
        tracker_cfg = {"process": cfg["process"]["name"], "solver": cfg["solver"]["name"], "reward": cfg["reward"],
                       "model": resolved["model"]["path"], **_flat("train", cfg["train"])}
        train_time = _train_loop(trainer, rd, resume, on_event if main else _noop, callback, tracker_cfg)
        if main and rd is not None:
            run.summary = _finish(run, cfg, resolved, rd, train_time, on_event)
    return run


@contextmanager
def _job(tc: TrainConfig, out: str | Path | None, resume: bool) -> Iterator[tuple[Any, RunDir | None]]:
    """The accelerator and output folder of one run (both entry points): a tracker needs a
    folder; process 0 creates it (refusing to overwrite a run); the seed is set; at the end the
    process group is left — after a barrier, or without one on an error (peers may be gone)."""
    rd = RunDir(out) if out is not None else None
    if tc.log != "none" and rd is None:
        raise SoctuneError(f"train.log={tc.log} writes under the output folder; pass out= (--out)")
    acc = make_accelerator(tc.device, tc.precision, tc.log, project_dir=out)
    try:
        if acc.is_main_process and rd is not None:
            _prepare_out(rd, resume)
        torch.manual_seed(tc.seed)
        yield acc, rd
    except BaseException:
        _leave(acc, wait=False)
        raise
    _leave(acc)


def _prepare_out(rd: RunDir, resume: bool) -> None:
    """Create the output folder; refuse to write a new run over an old one."""
    if rd.root.exists() and any(rd.root.iterdir()) and not resume:
        if rd.checkpoints() or rd.pickled_checkpoints() or rd.metrics.exists():
            raise SoctuneError(f"output folder '{rd.root}' already holds a run; pass --resume (resume=True) to continue "
                               "it or choose another --out")
    rd.root.mkdir(parents=True, exist_ok=True)


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in d.items() if isinstance(v, (int, float, str, bool))}


def _train_loop(trainer: Trainer, rd: RunDir | None, resume: bool, on_event: EventFn, callback: Any,
                tracker_cfg: dict[str, Any]) -> float:
    """Iterate to ``config.iters`` with metrics lines, checkpoints and trackers; returns the
    training wall time in seconds. A run stopped by non-finite updates leaves a checkpoint."""
    acc, main = trainer.accelerator, trainer.is_main
    start = load_latest_checkpoint(rd, trainer, on_event) if (resume and rd is not None) else 0
    if main and rd is not None:
        _truncate_metrics(rd.metrics, start)
    if trainer.config.log != "none":
        init = {"wandb": {"dir": str(rd.root) if rd else None, "mode": os.environ.get("WANDB_MODE", "offline")}}
        acc.init_trackers("soctune", config=tracker_cfg, init_kwargs=init)
    on_event("start", {"iters": trainer.config.iters, "resumed_from": start, "world_size": trainer.world_size})
    every = trainer.config.checkpoint_every
    t_start = time.perf_counter()
    while trainer.step < trainer.config.iters:
        try:
            metrics = trainer.train_iteration()
        except NonFiniteError as exc:
            if not main or rd is None:
                raise
            path = save_checkpoint(rd, trainer)
            raise NonFiniteError(f"{exc}; saved {path.relative_to(rd.root)} — lower them and continue with "
                                 "--resume") from None
        if trainer.config.log != "none":
            acc.log({k: v for k, v in metrics.items() if k != "iteration"}, step=trainer.step - 1)
        if main and rd is not None:
            append_jsonl(rd.metrics, {"iteration": trainer.step - 1,
                                      **{k: v for k, v in metrics.items() if k != "iteration"}})
        if main and metrics.get("skipped_nonfinite"):
            on_event("warning", {"message": f"iteration {trainer.step - 1}: non-finite {trainer.last_nonfinite}, "
                                            f"update skipped ({trainer.nonfinite_in_row} in a row, at most "
                                            f"{trainer.config.max_nonfinite})"})
        on_event("iteration", {"step": trainer.step, **metrics})
        if callback is not None:
            callback(trainer.step, metrics)
        if main and rd is not None and every and trainer.step % every == 0 and trainer.step < trainer.config.iters:
            save_checkpoint(rd, trainer)
    if main and rd is not None:
        save_checkpoint(rd, trainer)
    if trainer.config.log != "none":
        acc.end_training()
    return time.perf_counter() - t_start


def _finish(run: FinetuneRun, cfg: dict[str, Any], resolved: dict[str, Any], rd: RunDir, train_time: float,
            on_event: EventFn) -> dict[str, Any]:
    """Evaluation, pictures, LoRA and summary.json of a finished config run (process 0)."""
    b, trainer = run.built, run.trainer
    assert b is not None
    on_event("phase", {"message": "evaluating base vs fine-tuned"})
    ev = cfg["eval"]
    summary, img_b, img_f = evaluate_pair(b, ev["n_samples"], ev["seed"], device=trainer.device,
                                          autocast=trainer.autocast)
    summary.update(train_seconds=train_time, iterations=trainer.step, process=cfg["process"]["name"],
                   solver=cfg["solver"]["name"], reward=cfg["reward"], model=resolved["model"]["path"],
                   world_size=trainer.world_size, device=str(trainer.device), precision=cfg["train"]["precision"])
    g = ev["grid"]
    rb, ra = summary["before"]["reward_mean"], summary["after"]["reward_mean"]
    save_grid(img_b[:g], rd.root / "samples_before.png", title=f"base  (reward {rb:.3f})")
    save_grid(img_f[:g], rd.root / "samples_after.png", title=f"fine-tuned  (reward {ra:.3f})")
    save_side_by_side(img_b[:g], img_f[:g], rd.root / "samples_compare.png",
                      (f"before: reward {rb:.3f}", f"after: reward {ra:.3f}"))
    prompts = run_prompts(cfg)
    if prompts and b.cond_sampler is not None and ev["prompt_grids"]:
        # the first prompts of the set, each with its own grid (the encoders run on the CPU by now)
        save_prompt_grids(b, rd.root / "prompts", prompts[:ev["prompt_grids"]], min(g, 8), ev["seed"],
                          trainer.device, trainer.autocast)
    hist = _read_metrics(rd.metrics)
    plot_curve([h["iteration"] for h in hist], [h.get("reward_mean", float("nan")) for h in hist],
               rd.root / "reward.png", "reward (training batch)", band=[h.get("reward_std", 0.0) for h in hist],
               title=f"{cfg['solver']['name']} on {cfg['process']['name']}, reward {cfg['reward']}")
    # the model is never wrapped (no DistributedDataParallel), so adapter keys carry no "module." prefix
    run.save_lora(rd.root / "model" if cfg["model"]["full_finetune"] else rd.lora)
    atomic_write_text(rd.summary, json.dumps(summary, indent=2))
    on_event("done", summary)
    return summary


def _leave(acc: Any, wait: bool = True) -> None:
    """Leave a multi-process job: after a final barrier (no process exits while others still
    talk) unless ``wait=False`` (error path: peers may be gone)."""
    if acc.num_processes > 1:
        import torch.distributed as dist

        if wait:
            acc.wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()


def _truncate_metrics(path: Path, start: int) -> None:
    """Keep only the lines of iterations < start (a resumed run rewrites the rest, so no line is
    duplicated or lost). A partial last line (a crash during the append) is dropped."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("iteration"), (int, float)) and rec["iteration"] < start:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


# ------------------------------------------------------------------------------- evaluate
def load_trained(b: Built, run: str | Path) -> None:
    """Put a finished run's trained weights into ``b`` (built from the run's config.yaml): the
    LoRA of ``run/lora/``, or, for full fine-tuning (``model.full_finetune``), the whole network
    saved in ``run/model/`` (safetensors only). The base stays the pretrained model (adapters
    disabled, or the frozen copy full fine-tuning keeps), so base vs fine-tuned compares what
    the run changed. A missing or mismatched folder is a one-line error, never an evaluation of
    the untouched model."""
    from safetensors.torch import load_file

    rd = RunDir(run)
    resume = f"resume it with `soctune finetune --config {rd.config} --out {rd.root} --resume`"
    if not b.cfg["model"]["full_finetune"]:
        if not (rd.lora / "pytorch_lora_weights.safetensors").is_file():
            raise SoctuneError(f"'{rd.root}' has no lora/pytorch_lora_weights.safetensors (the run did not finish); "
                               f"{resume}")
        from .models import lora as lora_mod

        lora_mod.delete_lora(b.loaded, lora_mod.TRAIN_ADAPTER)  # build() added a fresh adapter under that name
        b.loaded.load_lora(rd.lora, adapter_name=lora_mod.TRAIN_ADAPTER)
        return
    shards = sorted((rd.root / "model").glob("*.safetensors"))  # save_pretrained may shard a large network
    if not shards:
        raise SoctuneError(f"'{rd.root}' is a full fine-tuning run (model.full_finetune) without model/*.safetensors "
                           f"(the run did not finish); {resume}")
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    try:
        b.loaded.network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:160]
        raise SoctuneError(f"{rd.root / 'model'} does not fit the run's model ({detail}); evaluate the run with the "
                           "config.yaml it wrote") from None


def evaluate_run(run: str | Path, n: int = 256, seed: int = 1234, device: str | None = None,
                 precision: str | None = None) -> tuple[dict[str, Any], Built]:
    """Base vs fine-tuned of a finished ``finetune`` output folder on the same ``seed`` (what
    ``soctune evaluate`` calls): rebuilt from its config.yaml (``device``/``precision``
    override the run's), its trained weights loaded by :func:`load_trained`, ``n`` samples
    each. Writes ``run/evaluation.json``; returns the summary (as in summary.json) and the
    built parts."""
    rd = RunDir(run)
    if not rd.config.is_file():
        raise SoctuneError(f"'{rd.root}' is not a finetune output folder (no config.yaml); pass the --out of a run")
    cfg = cfgmod.load_yaml(rd.config)
    overrides = {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
    cfg["train"] = {**(cfg.get("train") or {}), **overrides}
    cfg = cfgmod.validate(cfg)
    acc = make_accelerator(cfg["train"]["device"], cfg["train"]["precision"])
    b = build(cfg, acc.device)
    load_trained(b, rd.root)
    summary, _, _ = evaluate_pair(b, n, seed, device=acc.device, autocast=acc.autocast)
    atomic_write_text(rd.root / "evaluation.json", json.dumps(summary, indent=2))
    return summary, b


# ------------------------------------------------------------------------------- sample
def sample_run(*, model: str | None, process: str, loras: list[tuple[str, float]], num_steps: int,
               noise_scale: float | None, n: int, seed: int, out: str | Path, prompts: list[str] | None = None,
               guidance_scale: float = 1.0, device: str = "auto", precision: str = "fp32",
               negative_prompt: str | None = None, on_event: EventFn = _noop) -> Path:
    """Sample ``n`` states with optional LoRAs (each with a scale; several are mixed) and write
    ``samples.npz`` (key ``x``: float32 [N, C, H, W] images in [−1, 1]) and ``grid.png``.
    ``noise_scale=0`` solves the probability-flow ODE with torchdiffeq. Sampled on ``device``
    with the network under ``precision``'s autocast (the frozen weights in that dtype). Where the
    model folder's evaluator reports on samples (e.g. class shares), ``summary.json`` holds
    ``{"n", "evaluator", **its report}``."""
    from .models.diffusers_model import load_model, resolve_model_path
    from .sde.gaussian import GaussianPathProcess, sample_ode

    acc = make_accelerator(device, precision)
    dev = acc.device
    path = model or default_model_for(process)
    loaded = load_model(path, lora_rank=0, guidance_scale=guidance_scale, device=dev, dtype=DTYPES[precision],
                        negative_prompt=negative_prompt)
    names = {}
    for i, (folder, scale) in enumerate(loras):
        if not Path(folder).exists():
            raise SoctuneError(f"LoRA folder '{folder}' does not exist; pass the lora/ folder of a finetune run")
        names[loaded.load_lora(folder, scale=scale, adapter_name=f"lora{i}")] = scale
    if names:
        loaded.set_adapter_weights(names)
    opts: dict[str, Any] = {}
    if noise_scale is not None and noise_scale > 0:
        opts["noise_scale"] = noise_scale
    proc = loaded.default_process(process, num_steps=num_steps, **opts)
    gen = torch.Generator(device=dev).manual_seed(seed)
    cond_sampler = loaded.cond_sampler(prompts) if prompts else None
    loaded.release_text_encoders()
    outs = []
    for start in range(0, n, 256):
        m = min(256, n - start)
        cond = cond_sampler(m, gen) if cond_sampler is not None else None
        with torch.no_grad(), acc.autocast():
            if noise_scale == 0:
                if not isinstance(proc, GaussianPathProcess):
                    raise SoctuneError(f"--noise-scale 0 (the ODE) needs a Gaussian-path process, not '{process}'")
                x0 = proc.prior((m, *loaded.sample_shape), generator=gen, device=dev)
                x = sample_ode(proc, loaded.model, x0, cond)
            else:
                x = rollout(proc, loaded.model, batch_size=m, sample_shape=tuple(loaded.sample_shape), cond=cond,
                            generator=gen, device=dev, callback=lambda k, _x: on_event("step", {"k": k + 1, "of": proc.num_steps})
                            ).x_final
            outs.append(loaded.decode(x.float()).float().clamp(-1, 1).cpu())
        on_event("batch", {"done": start + m, "of": n})
    images = torch.cat(outs)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    tmp = outp / ".samples.npz.tmp.npz"
    np.savez(tmp, x=images.numpy().astype(np.float32))
    os.replace(tmp, outp / "samples.npz")
    save_grid(images[:256], outp / "grid.png")
    evaluator = evaluator_for(resolve_model_path(path))
    report = evaluator.report(images, evaluator.features(images))
    if report:  # the generic evaluator reports nothing beyond the files
        atomic_write_text(outp / "summary.json", json.dumps(
            {"n": int(images.shape[0]), "evaluator": evaluator.registered_name, **report}, indent=2))
    return outp
