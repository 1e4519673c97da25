"""Rebuild every shipped digits artefact (``soctune pretrain-digits``): the ε-prediction DDPM,
the rectified-flow model and the classifier, bit-for-bit on the same machine and thread count
(:func:`pretrain_all`). Progress goes to the ``soctune.examples.digits.pretrain`` logger (the
library never prints; the CLI shows it); results are returned and written next to the weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import ASSETS_DIR
from .classifier import DigitClassifier
from .data import heldout_split, load_digits_tensor

logger = logging.getLogger(__name__)

#: UNet of the embedded defaults: 8×8 → 4×4, ~0.65M parameters (2.6 MB in float32).
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)

NUM_TRAIN_TIMESTEPS = 1000


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless epochs of shuffled index batches [batch_size]; the ragged tail of each epoch is
    dropped so every step sees the same batch size (constant gradient noise, fixed shapes)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


#: Intra-op threads while training. CPU reductions split work by thread count, so pinning it
#: makes the weights independent of the machine's core count; at 8×8 a second thread buys
#: little, and a single thread does not stall when other processes share the cores.
TRAIN_THREADS = 1


@contextmanager
def _seeded(seed: int) -> Iterator[torch.Generator]:
    """Deterministic scope: seeds the global RNG (used by parameter init) without leaking into
    the caller's RNG state, turns on deterministic kernels, pins the thread count, and yields
    the generator that drives data order and noise."""
    previous = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(TRAIN_THREADS)
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            torch.use_deterministic_algorithms(previous)
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------- UNet


def make_unet(**overrides: Any):
    """The UNet2DModel of the embedded defaults (config :data:`UNET_CONFIG`, overridable).

    Forward: ``unet(x [B,1,8,8], timestep [B] or scalar).sample -> [B,1,8,8]``.
    """
    from diffusers import UNet2DModel

    return UNet2DModel(**{**UNET_CONFIG, **overrides})


def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_unet(loss_fn: Callable[[nn.Module, Tensor, torch.Generator], Tensor], *, seed: int, steps: int,
                batch_size: int, lr: float, ema_decay: float, log_every: int, tag: str):
    """Shared loop: AdamW + warmup/cosine decay, grad-clip 1, EMA of the weights.

    ``loss_fn(unet, x0 [B,1,8,8], generator) -> scalar``. Returns the EMA copy of the UNet.
    """
    with _seeded(seed) as gen:
        images, _ = load_digits_tensor()
        unet = make_unet()
        ema = copy.deepcopy(unet).requires_grad_(False)
        opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
        warmup = min(100, max(1, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_with_warmup(s, steps, warmup))
        params = list(unet.parameters())
        ema_params = list(ema.parameters())
        batches = _batches(images.shape[0], batch_size, gen)
        t0, running = time.perf_counter(), 0.0
        unet.train()
        for step in range(steps):
            loss = loss_fn(unet, images[next(batches)], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay)
            running += loss.item()
            if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                n = (step % log_every) + 1
                logger.info("[%s] step %d/%d loss %.4f lr %.2e %.0fs", tag, step + 1, steps, running / n,
                            sched.get_last_lr()[0], time.perf_counter() - t0)
                running = 0.0
        return ema.eval()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _declare_evaluator(model_dir: Path) -> None:
    """``model_dir/soctune.json``: the folder names its registered evaluator (data, never code),
    so runs and ``soctune evaluate`` judge these models with the ``digits`` evaluator."""
    _write_json(model_dir / "soctune.json", {"evaluator": "digits"})


def pretrain_ddpm(out_dir: str | Path, seed: int = 0, steps: int = 2500, batch_size: int = 128,
                  lr: float = 2e-3, ema_decay: float = 0.99, log_every: int = 250) -> Path:
    """Train the ε-prediction DDPM on all 1797 digits and save a ``DDPMPipeline`` folder.

    Writes ``out_dir/{model_index.json, unet/, scheduler/}`` so
    ``diffusers.DDPMPipeline.from_pretrained(out_dir)`` loads it. Returns ``out_dir``.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                              prediction_type="epsilon", clip_sample=False)

    def loss_fn(unet: nn.Module, x0: Tensor, gen: torch.Generator) -> Tensor:
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        return F.mse_loss(unet(xt, t).sample, noise)

    ema = _train_unet(loss_fn, seed=seed, steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                      log_every=log_every, tag="ddpm")
    out = Path(out_dir)
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    _declare_evaluator(out)
    _write_json(out / "training_args.json", dict(kind="ddpm", seed=seed, steps=steps, batch_size=batch_size,
                                                 lr=lr, ema_decay=ema_decay))
    return out


def pretrain_flow(out_dir: str | Path, seed: int = 0, steps: int = 2500, batch_size: int = 128,
                  lr: float = 2e-3, ema_decay: float = 0.99, sigma_sampling: str = "uniform",
                  log_every: int = 250) -> Path:
    """Train a rectified-flow velocity model in FlowMatchEulerDiscreteScheduler conventions.

    x_σ = (1 − σ)·x₀ + σ·ε, the network sees timestep 1000σ and regresses ε − x₀
    (so dx/dσ, i.e. minus the generation-time velocity). σ ~ U(0, 1) or, with
    ``sigma_sampling="logit_normal"``, sigmoid(N(0, 1)). Writes ``out_dir/{unet/, scheduler/}``
    (scheduler: ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if sigma_sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"sigma_sampling must be 'uniform' or 'logit_normal', not {sigma_sampling!r}")

    def loss_fn(unet: nn.Module, x0: Tensor, gen: torch.Generator) -> Tensor:
        b = x0.shape[0]
        if sigma_sampling == "uniform":
            sigma = torch.rand(b, generator=gen)
        else:
            sigma = torch.sigmoid(torch.randn(b, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        s = rearrange(sigma, "b -> b 1 1 1")
        xs = (1.0 - s) * x0 + s * noise
        return F.mse_loss(unet(xs, sigma * NUM_TRAIN_TIMESTEPS).sample, noise - x0)

    ema = _train_unet(loss_fn, seed=seed, steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                      log_every=log_every, tag="flow")
    out = Path(out_dir)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0).save_pretrained(out / "scheduler")
    _declare_evaluator(out)
    _write_json(out / "training_args.json", dict(kind="flow", seed=seed, steps=steps, batch_size=batch_size,
                                                 lr=lr, ema_decay=ema_decay, sigma_sampling=sigma_sampling))
    return out


# --------------------------------------------------------------------------------- classifier


def pretrain_classifier(out_dir: str | Path, seed: int = 0, epochs: int = 60, batch_size: int = 64,
                        lr: float = 2e-3, input_noise: float = 0.1) -> Path:
    """Train :class:`DigitClassifier` on a seeded 80 % split, with N(0, input_noise²) added to
    every input so the classifier is well-behaved slightly off the data manifold, where
    fine-tuned samples and their reward gradients live.

    Writes ``out_dir/classifier.safetensors`` and ``out_dir/classifier.json`` (architecture
    config + held-out accuracy, also logged). Returns the path of the ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    with _seeded(seed) as gen:
        images, labels = load_digits_tensor()
        train_idx, test_idx = heldout_split(images.shape[0], seed=seed)
        x_tr, y_tr = images[train_idx], labels[train_idx]
        model = DigitClassifier()
        steps_per_epoch = x_tr.shape[0] // batch_size
        total = epochs * steps_per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_with_warmup(s, total, 50))
        batches = _batches(x_tr.shape[0], batch_size, gen)
        model.train()
        for step in range(total):
            idx = next(batches)
            x = x_tr[idx] + input_noise * torch.randn(x_tr[idx].shape, generator=gen)
            loss = F.cross_entropy(model(x), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(images[test_idx]).argmax(-1) == labels[test_idx]).float().mean().item()
            noisy = images[test_idx] + input_noise * torch.randn(images[test_idx].shape, generator=gen)
            acc_noisy = (model(noisy).argmax(-1) == labels[test_idx]).float().mean().item()
    logger.info("[classifier] held-out accuracy %.4f (with input noise %s: %.4f)", acc, input_noise, acc_noisy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _write_json(path.with_suffix(".json"), dict(
        config=model.config, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, input_noise=input_noise,
        heldout_fraction=0.2, heldout_accuracy=round(acc, 4), heldout_accuracy_noisy=round(acc_noisy, 4)))
    return path


# ----------------------------------------------------------------------------------- shipping


def pretrain_all(out_root: str | Path = ASSETS_DIR, seed: int = 0, steps: int = 2500,
                 workers: int = 2) -> dict[str, Path]:
    """Rebuild every embedded default: ``out_root/{ddpm/, flow/, classifier.*}``.

    Each job seeds itself and trains single-threaded (:data:`TRAIN_THREADS`), so running the
    jobs in ``workers`` parallel processes gives bit-identical weights to running them one
    after another, in about half the wall time on two cores (~2 × 15 CPU-minutes at 2500 steps).

    Returns ``{"classifier": file, "ddpm": dir, "flow": dir}``; progress goes to this module's
    logger.
    """
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, tuple[Callable[..., Path], tuple[Any, ...], dict[str, Any]]] = {
        "ddpm": (pretrain_ddpm, (root / "ddpm",), dict(seed=seed, steps=steps)),
        "flow": (pretrain_flow, (root / "flow",), dict(seed=seed, steps=steps)),
        "classifier": (pretrain_classifier, (root,), dict(seed=seed)),
    }
    t0 = time.perf_counter()
    if workers <= 1:
        paths = {kind: fn(*args, **kwargs) for kind, (fn, args, kwargs) in jobs.items()}
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child would inherit the parent's torch thread pools.
        # a spawned worker starts with unconfigured logging: give it the caller's level for this
        # module's logger, so the progress the caller asked for still reaches stderr
        level = logger.getEffectiveLevel()
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_logging, initargs=(level,)) as pool:
            futures = {kind: pool.submit(fn, *args, **kwargs) for kind, (fn, args, kwargs) in jobs.items()}
            paths = {kind: f.result() for kind, f in futures.items()}
    logger.info("[pretrain_all] done in %.0fs -> %s", time.perf_counter() - t0, root)
    return paths


def _worker_logging(level: int) -> None:
    """Logging of a spawned pretraining worker: this module's records at ``level`` to stderr."""
    if level <= logging.INFO:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logger.setLevel(level)
