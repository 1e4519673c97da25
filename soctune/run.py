"""Runs as the command line knows them: build everything from a config, fine-tune into an
output folder (checkpoints, metrics, pictures, LoRA, summary), resume, sample and evaluate.

The library never prints: progress reaches the caller through ``on_event(kind, payload)``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import config as cfgmod
from . import distributed as dist_
from .evaluation import compare, evaluate_samples, pixel_features, tilt_fidelity
from .finetune import Finetuner, NonFiniteError, TrainConfig
from .io import append_jsonl, atomic_torch_save, atomic_write_text, plot_curve, save_grid, save_side_by_side
from .registry import SoctuneError
from .rewards import get_reward
from .sde.base import Process
from .solvers import Solver, get_solver
from .trajectory import rollout

EventFn = Callable[[str, dict[str, Any]], None]
DIGITS_DEFAULT = {"ddpm": "digits-ddpm", "dpmpp-sde": "digits-ddpm", "fm-memoryless": "digits-flow"}
CKPT_RE = re.compile(r"^ckpt-(\d{6})\.pt$")


def _noop(kind: str, payload: dict[str, Any]) -> None:
    return None


def default_model_for(process_name: str) -> str:
    """The shipped digits model matching a process (ε model for VP processes, velocity model
    for flow processes)."""
    if process_name in DIGITS_DEFAULT:
        return DIGITS_DEFAULT[process_name]
    raise SoctuneError(f"process '{process_name}' has no shipped default model; pass --model PATH "
                       f"(shipped defaults exist for {', '.join(DIGITS_DEFAULT)})")


@dataclass
class Built:
    cfg: dict[str, Any]
    loaded: Any
    process: Process
    solver: Solver
    reward: Any
    features: Callable[[Tensor], Tensor]
    images: Callable[[Tensor], Tensor]
    target_class: int | None
    cond_sampler: Any


def build(cfg: dict[str, Any], device: str = "cpu") -> Built:
    """Model, process, solver and reward from a validated config (one-line errors on misuse)."""
    from .models.diffusers_model import load_model

    m = cfg["model"]
    proc_cfg = dict(cfg["process"])
    pname = proc_cfg.pop("name")
    path = m["path"] or default_model_for(pname)
    loaded = load_model(path, lora_rank=m["lora_rank"], lora_alpha=m["lora_alpha"], target_modules=m["target_modules"],
                        full_finetune=m["full_finetune"], guidance_scale=m["guidance_scale"], device=device)
    num_steps = proc_cfg.pop("num_steps", 50)
    process = loaded.default_process(pname, num_steps=num_steps, **proc_cfg)
    sol_cfg = dict(cfg["solver"])
    solver = get_solver(sol_cfg.pop("name"), **sol_cfg)
    solver.check(process, loaded.model)
    raw_reward = get_reward(cfg["reward"])
    reward = loaded.image_reward(raw_reward) if loaded.is_latent else raw_reward
    target = _digit_target(cfg["reward"])
    digits_like = tuple(loaded.sample_shape) == (1, 8, 8)
    if digits_like:
        from .models.digits import load_classifier

        clf = load_classifier()

        def features(x: Tensor) -> Tensor:
            with torch.no_grad():
                return clf.features(loaded.decode(x))
    else:
        def features(x: Tensor) -> Tensor:
            with torch.no_grad():
                return pixel_features(loaded.decode(x))

    def images(x: Tensor) -> Tensor:
        with torch.no_grad():
            return loaded.decode(x)

    cond_sampler = loaded.cond_sampler(m["prompts"]) if m["prompts"] else None
    if cond_sampler is None and getattr(loaded.denoiser, "needs_cond", False):
        raise SoctuneError("this model is text/class-conditional; pass prompts with --set model.prompts='[\"a cat\"]'")
    return Built(cfg, loaded, process, solver, reward, features, images, target if digits_like else None, cond_sampler)


def _digit_target(spec: str) -> int | None:
    name, _, arg = spec.partition(":")
    return int(arg) if name == "digit" and arg.isdigit() else None


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    t = cfg["train"]
    return TrainConfig(iters=t["iters"], batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"],
                       grad_clip=t["grad_clip"], seed=t["seed"], max_nonfinite=t["max_nonfinite"])


# ------------------------------------------------------------------------------- sampling
def draw(b: Built, n: int, seed: int, base: bool, batch: int = 256) -> tuple[Tensor, Tensor, Any]:
    """n samples (states [n, *S]) from the base or fine-tuned model with a fixed seed, their
    rewards [n] and the conditioning used."""
    gen = torch.Generator().manual_seed(seed)
    xs, rs, conds = [], [], []
    model = b.loaded.model
    for start in range(0, n, batch):
        m = min(batch, n - start)
        cond = b.cond_sampler(m, gen) if b.cond_sampler is not None else None
        ctx = model.base() if base else _Null()
        with ctx, torch.no_grad():
            traj = rollout(b.process, model, batch_size=m, sample_shape=tuple(b.loaded.sample_shape), cond=cond,
                           generator=gen)
            xs.append(traj.x_final)
            rs.append(b.reward(traj.x_final, cond).float())
        conds.append(cond)
    return torch.cat(xs), torch.cat(rs), conds


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def evaluate_pair(b: Built, n: int, seed: int) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Base vs fine-tuned on the same seeds. Returns (summary, base images, fine-tuned images)."""
    xb, rb, _ = draw(b, n, seed, base=True)
    xf, rf, _ = draw(b, n, seed, base=False)
    fb, ff = b.features(xb), b.features(xf)
    ib, i_f = b.images(xb), b.images(xf)
    before = evaluate_samples(xb, rb, fb, target_class=b.target_class, images=ib)
    after = evaluate_samples(xf, rf, ff, target_class=b.target_class, images=i_f)
    summary = compare(before, after, ff, fb)
    r_max = getattr(b.reward, "maximum", None)
    if r_max is not None:
        summary["target_fidelity"] = tilt_fidelity(ff, fb, rb, b.solver.reward_scale, float(r_max),
                                                   torch.Generator().manual_seed(seed + 1))
    return summary, ib, i_f


# ------------------------------------------------------------------------------- finetune
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


def save_checkpoint(rd: RunDir, ft: Finetuner, keep: int = 2) -> Path:
    """Write ``checkpoints/ckpt-{step:06d}.pt`` atomically (write-then-rename: a crash or a full
    disk never leaves a partial file under a checkpoint name), then drop all but the newest
    ``keep``. Older checkpoints are deleted only after the new one is in place."""
    path = rd.ckpts / f"ckpt-{ft.step:06d}.pt"
    atomic_torch_save(ft.state_dict(), path)
    for old in rd.checkpoints()[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(rd: RunDir, ft: Finetuner, on_event: EventFn) -> int:
    """Restore the newest checkpoint that loads; corrupt ones are reported and skipped.

    Data-parallel: rank 0 reads the checkpoint and broadcasts its state, so every rank resumes
    from the same one (and nodes need no shared file system). Returns the iteration resumed at.
    """
    state: dict[str, Any] | None = None
    if ft.dist.is_main:
        _remove_stale_temporaries(rd)
        for path in rd.checkpoints():
            try:
                candidate = torch.load(path, map_location="cpu", weights_only=False)
                ft.load_state_dict(candidate)
            except SoctuneError:
                raise
            except Exception as exc:  # noqa: BLE001 — a truncated/corrupt file: fall back to an older one
                detail = " ".join(str(exc).split())[:120]
                on_event("warning", {"message": f"checkpoint {path.name} is unreadable ({type(exc).__name__}: "
                                                f"{detail}); trying an older one"})
                continue
            state = candidate
            on_event("phase", {"message": f"resuming from {path.relative_to(rd.root)} (iteration {ft.step})"})
            break
        else:
            if rd.ckpts.is_dir():
                on_event("warning", {"message": "no valid checkpoint found; starting from iteration 0"})
    if ft.dist.enabled:
        state = dist_.broadcast_object(state, ft.dist)
        if state is not None and not ft.dist.is_main:
            ft.load_state_dict(state)
    return ft.step


def _remove_stale_temporaries(rd: RunDir) -> None:
    """Delete the temporary files of writes interrupted by a crash (never taken for checkpoints)."""
    if rd.ckpts.is_dir():
        for p in rd.ckpts.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)


def finetune_run(cfg: dict[str, Any], out: str | Path, resume: bool = False, on_event: EventFn = _noop) -> dict[str, Any]:
    """Fine-tune as configured into ``out`` and return the summary.

    Writes ``config.yaml`` (resolved; rerunning with it reproduces the run), ``metrics.jsonl``
    (one line per iteration), ``checkpoints/`` (atomic; ``resume`` continues exactly from the
    newest valid one), ``samples_before.png``/``samples_after.png``/``samples_compare.png``,
    ``reward.png``, ``lora/`` (diffusers LoRA format) and ``summary.json``.

    Launched by torchrun (``WORLD_SIZE`` > 1) it trains data-parallel (see
    :mod:`soctune.distributed`); only rank 0 writes files, evaluates and returns the summary
    (other ranks return ``{}``).
    """
    cfg = cfgmod.validate(cfg)
    info = dist_.init_from_env()
    try:
        summary = _finetune_run(cfg, out, resume, on_event if info.is_main else _noop, info)
    except BaseException:
        dist_.shutdown(info, wait=False)  # the others may be gone: no barrier
        raise
    dist_.shutdown(info)
    return summary


def _finetune_run(cfg: dict[str, Any], out: str | Path, resume: bool, on_event: EventFn,
                  info: dist_.DistInfo) -> dict[str, Any]:
    rd = RunDir(out)
    main = info.is_main
    if main and rd.root.exists() and any(rd.root.iterdir()) and not resume:
        if rd.checkpoints() or rd.metrics.exists():
            raise SoctuneError(f"output folder '{out}' already holds a run; pass --resume to continue it or "
                               "choose another --out")
    if main:
        rd.root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["train"]["seed"])
    b = build(cfg)
    resolved = dict(cfg, model=dict(cfg["model"], path=cfg["model"]["path"] or default_model_for(cfg["process"]["name"])))
    if main:
        atomic_write_text(rd.config, cfgmod.dump(resolved))
    ft = Finetuner(b.process, b.loaded.model, b.solver, b.reward, tuple(b.loaded.sample_shape), train_config(cfg),
                   cond_sampler=b.cond_sampler, dist=info)
    start = load_latest_checkpoint(rd, ft, on_event) if resume else 0
    if main:
        _truncate_metrics(rd.metrics, start)
    on_event("start", {"iters": ft.config.iters, "resumed_from": start, "world_size": info.world_size})
    every = cfg["train"]["checkpoint_every"]
    t_start = time.perf_counter()
    while ft.step < ft.config.iters:
        try:
            metrics = ft.train_iteration()
        except NonFiniteError as exc:
            if not main:
                raise
            path = save_checkpoint(rd, ft)
            raise NonFiniteError(f"{exc}; saved {path.relative_to(rd.root)} — lower them and continue with "
                                 "--resume") from None
        if main:
            append_jsonl(rd.metrics, {"iteration": ft.step - 1, **{k: v for k, v in metrics.items() if k != "iteration"}})
            if metrics.get("skipped_nonfinite"):
                on_event("warning", {"message": f"iteration {ft.step - 1}: non-finite {getattr(ft, 'last_nonfinite', 'value')}, "
                                                f"update skipped ({ft.nonfinite_in_row} in a row, at most "
                                                f"{ft.config.max_nonfinite})"})
        on_event("iteration", {"step": ft.step, **metrics})
        if main and every and ft.step % every == 0 and ft.step < ft.config.iters:
            save_checkpoint(rd, ft)
    if not main:
        return {}
    save_checkpoint(rd, ft)
    train_time = time.perf_counter() - t_start

    on_event("phase", {"message": "evaluating base vs fine-tuned"})
    ev = cfg["eval"]
    summary, img_b, img_f = evaluate_pair(b, ev["n_samples"], ev["seed"])
    summary.update(train_seconds=train_time, iterations=ft.step, process=cfg["process"]["name"],
                   solver=cfg["solver"]["name"], reward=cfg["reward"], model=resolved["model"]["path"],
                   world_size=info.world_size)
    g = ev["grid"]
    rb, ra = summary["before"]["reward_mean"], summary["after"]["reward_mean"]
    save_grid(img_b[:g], rd.root / "samples_before.png", title=f"base  (reward {rb:.3f})")
    save_grid(img_f[:g], rd.root / "samples_after.png", title=f"fine-tuned  (reward {ra:.3f})")
    save_side_by_side(img_b[:g], img_f[:g], rd.root / "samples_compare.png",
                      (f"before: reward {rb:.3f}", f"after: reward {ra:.3f}"))
    hist = _read_metrics(rd.metrics)
    plot_curve([h["iteration"] for h in hist], [h.get("reward_mean", float("nan")) for h in hist],
               rd.root / "reward.png", "reward (training batch)", band=[h.get("reward_std", 0.0) for h in hist],
               title=f"{cfg['solver']['name']} on {cfg['process']['name']}, reward {cfg['reward']}")
    # the model is never wrapped (no DistributedDataParallel), so adapter keys carry no "module." prefix
    if cfg["model"]["full_finetune"]:
        b.loaded.network.save_pretrained(rd.root / "model")
    else:
        b.loaded.save_lora(rd.lora)
    atomic_write_text(rd.summary, json.dumps(summary, indent=2))
    on_event("done", summary)
    return summary


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


# ------------------------------------------------------------------------------- sample
def sample_run(*, model: str | None, process: str, loras: list[tuple[str, float]], num_steps: int,
               noise_scale: float | None, n: int, seed: int, out: str | Path, prompts: list[str] | None = None,
               guidance_scale: float = 1.0, on_event: EventFn = _noop) -> Path:
    """Sample ``n`` states with optional LoRAs (each with a scale; several are mixed) and write
    ``samples.npz`` (key ``x``: float32 [N, C, H, W] images in [−1, 1]) and ``grid.png``.
    ``noise_scale=0`` solves the probability-flow ODE with torchdiffeq."""
    from .models.diffusers_model import load_model
    from .sde.gaussian import GaussianPathProcess, sample_ode

    path = model or default_model_for(process)
    loaded = load_model(path, lora_rank=0, guidance_scale=guidance_scale)
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
    gen = torch.Generator().manual_seed(seed)
    cond_sampler = loaded.cond_sampler(prompts) if prompts else None
    outs = []
    for start in range(0, n, 256):
        m = min(256, n - start)
        cond = cond_sampler(m, gen) if cond_sampler is not None else None
        with torch.no_grad():
            if noise_scale == 0:
                if not isinstance(proc, GaussianPathProcess):
                    raise SoctuneError(f"--noise-scale 0 (the ODE) needs a Gaussian-path process, not '{process}'")
                x0 = proc.prior((m, *loaded.sample_shape), generator=gen)
                x = sample_ode(proc, loaded.model, x0, cond)
            else:
                x = rollout(proc, loaded.model, batch_size=m, sample_shape=tuple(loaded.sample_shape), cond=cond,
                            generator=gen, callback=lambda k, _x: on_event("step", {"k": k + 1, "of": proc.num_steps})
                            ).x_final
            outs.append(loaded.decode(x).float().clamp(-1, 1))
        on_event("batch", {"done": start + m, "of": n})
    images = torch.cat(outs)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    tmp = outp / ".samples.npz.tmp.npz"
    np.savez(tmp, x=images.numpy().astype(np.float32))
    os.replace(tmp, outp / "samples.npz")
    save_grid(images[:256], outp / "grid.png")
    if images.shape[1:] == (1, 8, 8):
        atomic_write_text(outp / "summary.json", json.dumps(digit_report(images), indent=2))
    return outp


def digit_report(images: Tensor) -> dict[str, Any]:
    """What a digits sample set holds, judged by the independent pixel classifier
    (:func:`~soctune.evaluation.digit_probabilities`, not the reward's CNN): images [N, 1, 8, 8]
    -> class counts and shares [10], mean confidence, and per class the pixel spread (mean
    pairwise L2 distance among that class's samples, 0 if fewer than 2)."""
    from .evaluation import digit_probabilities
    from .metrics import diversity

    probs = digit_probabilities(images)
    labels = probs.argmax(1)
    counts = torch.bincount(labels, minlength=10)
    spread = [diversity(images[labels == c].flatten(1)) if int(counts[c]) > 1 else 0.0 for c in range(10)]
    return {"n": int(images.shape[0]), "class_counts": counts.tolist(),
            "class_shares": (counts.double() / images.shape[0]).tolist(),
            "confidence": float(probs.max(1).values.mean()), "class_spread_pixels": spread}
