"""The trainer: one accelerate-driven update loop for every solver.

A solver turns trajectories into loss parts (:class:`~soctune.solvers.base.LossOutput`); the
:class:`Trainer` owns everything about the update, so every solver runs unchanged on any
device, precision and number of processes:

* **device and precision** through :class:`accelerate.Accelerator`: the network's forwards run
  under its autocast (bf16/fp16); trainable weights and the optimiser state stay float32; the
  reward (with a VAE decode inside its gradient) runs in float32 with autocast off; fp16 goes
  through accelerate's gradient scaler with exactly one optimiser step per update (a step the
  scaler skips on overflow is not a failure, it lowers the scale);
* **updates**: each closing loss part the solver yields is one optimiser step (PPO-style inner
  epochs are several); ``accumulate`` parts are backpropagated as they come (per-step backward:
  memory flat in K); ``grad_accum`` micro-batches run in lockstep and sum into one update;
* **data parallel** over the processes of ``accelerate launch`` / ``torchrun``: every process
  draws the noise of the whole global batch from one identically seeded generator and keeps its
  rows (:mod:`soctune.distributed`), so W processes (and A micro-batches) roll out exactly the
  trajectories of one process with the global batch; gradients are averaged with accelerate's
  collective before clipping.

Why the network is not wrapped in ``DistributedDataParallel``: DDP ties the gradient all-reduce
to the autograd hooks of one forward/backward pair, but an update here evaluates the network
many times in different roles — the base with adapters off, lean-adjoint VJPs that need no
parameter gradient, per-step backward parts of one update — so the reducer would sync too
often or not at all, and its ``module.`` prefix would leak into saved LoRA keys (DESIGN.md §7).
The trainer averages the gradients of the trainable tensors once per update instead.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist_
from .config import TrainConfig
from .models.base import Denoiser, base_if
from .registry import SoctuneError
from .sde.base import Process
from .solvers.base import CondSampler, FinetuneContext, LossOutput, Solver
from .trajectory import RewardFn, rollout

MetricsCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT_FORMAT = 3


class NonFiniteError(SoctuneError):
    """Too many consecutive non-finite losses or gradients."""


# ------------------------------------------------------------------------------- accelerator
def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is visible, else ``cpu``; anything else is checked
    and returned (one-line :class:`SoctuneError` when the device is not there)."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SoctuneError(f"--device {device}: no CUDA device is visible to torch (torch.cuda.is_available() "
                               "is False); use --device cpu, or install a CUDA build of torch")
        if ":" in device:
            idx = device.partition(":")[2]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise SoctuneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                   f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
        return device
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SoctuneError("--device mps: Apple's MPS backend is not available here; use --device cpu")
        return device
    if device == "cpu":
        return device
    raise SoctuneError(f"--device {device} is not a device; use auto, cpu, cuda, cuda:N or mps")


def _check_precision(precision: str, device: str) -> None:
    if precision not in ("fp32", "bf16", "fp16"):
        raise SoctuneError(f"--precision {precision} is not one of fp32, bf16, fp16")
    if precision == "fp16" and device == "cpu":
        raise SoctuneError("--precision fp16 needs a GPU (accelerate's gradient scaler runs on CUDA/MPS/XPU, not on a "
                           "CPU); on a CPU use --precision bf16 or fp32")
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise SoctuneError("--precision bf16: this GPU has no bfloat16 support; use --precision fp16")


def _check_tracker(log: str) -> None:
    if log == "none":
        return
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if log == "tensorboard" and not is_tensorboard_available():
        raise SoctuneError("--log tensorboard needs the tensorboard package: pip install tensorboard")
    if log == "wandb" and not is_wandb_available():
        raise SoctuneError("--log wandb needs the wandb package: pip install wandb")
    if log not in ("tensorboard", "wandb"):
        raise SoctuneError(f"--log {log} is not a tracker; use none, tensorboard or wandb")


def make_accelerator(device: str = "auto", precision: str = "fp32", log: str = "none",
                     project_dir: str | os.PathLike[str] | None = None) -> Any:
    """An :class:`accelerate.Accelerator` for ``device`` / ``precision`` / tracker ``log``.

    Under a multi-process launch (``accelerate launch`` or ``torchrun``) accelerate joins the
    process group from the launcher's environment (gloo on CPUs, nccl on GPUs) and each process
    takes ``cuda:LOCAL_RANK``. In one process, a new trainer may ask for another device or
    precision than an earlier one (accelerate keeps one global state; it is reset here).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    dev = resolve_device(device)
    _check_precision(precision, dev.partition(":")[0])
    _check_tracker(log)
    world = dist_.env_world_size()
    if world > 1 and ":" in dev:
        raise SoctuneError(f"--device {dev} with {world} processes: each process uses cuda:LOCAL_RANK; pass "
                           "--device cuda (or select GPUs with CUDA_VISIBLE_DEVICES)")
    if dev.startswith("cuda:"):
        torch.cuda.set_device(int(dev.partition(":")[2]))
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if world <= 1 and AcceleratorState._shared_state:
        # one process, a new device or precision: accelerate's singleton state would refuse it
        AcceleratorState._reset_state(reset_partial_state=True)
    elif world <= 1 and PartialState._shared_state:
        PartialState._reset_state()
    try:
        acc = Accelerator(mixed_precision=mixed, cpu=dev == "cpu", log_with=None if log == "none" else log,
                          project_dir=None if project_dir is None else str(project_dir))
    except ValueError as exc:  # accelerate's own refusals (e.g. a launch config that disagrees)
        raise SoctuneError(f"accelerate refused device={dev}, precision={precision}: {' '.join(str(exc).split())}") \
            from None
    kind = str(acc.distributed_type).rpartition(".")[2]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # sharded engines need the network wrapped; the trainer keeps every process's network whole
        raise SoctuneError(f"the accelerate config asks for {kind}, which soctune does not support yet (each process "
                           "holds the whole network: data parallel); use a multi-GPU config (`accelerate config`, "
                           "distributed_type MULTI_GPU) or torchrun")
    return acc


class Float32Reward(nn.Module):
    """r(x, cond) evaluated in float32 with autocast off (rewards and the VAE decode inside
    their gradient are precision-sensitive; DESIGN.md §9). x [B, *S] -> [B] float32."""

    def __init__(self, reward: RewardFn, device_type: str) -> None:
        super().__init__()
        self.reward = reward
        self.device_type = device_type
        self.maximum = getattr(reward, "maximum", None)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        with torch.autocast(device_type=self.device_type, enabled=False):
            return self.reward(x.float(), cond).float()


# ------------------------------------------------------------------------------- trainer
class Trainer:
    """Fine-tunes ``model``'s adaptation with ``solver`` on ``process`` towards ``reward``.

    The trainable parameters are the model's (LoRA adapters, a correction network, or every
    weight with full fine-tuning) plus the solver's auxiliary networks (e.g. ∇-DB's flow head).
    :meth:`sample` draws from the fine-tuned (or base) model with any process.

    Args:
        process, model, solver, reward: what to train; reward r(x [B,*S], cond) -> [B].
        sample_shape: S, the state shape.
        config: :class:`~soctune.config.TrainConfig` (device, precision, batch, …).
        cond_sampler: (n, generator) -> conditioning of n samples, or None.
        accelerator: an existing :class:`accelerate.Accelerator` (else one is made from config).
    """

    def __init__(self, process: Process, model: Denoiser, solver: Solver, reward: RewardFn,
                 sample_shape: tuple[int, ...], config: TrainConfig | None = None,
                 cond_sampler: CondSampler | None = None, accelerator: Any = None) -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        self.accelerator = accelerator or make_accelerator(self.config.device, self.config.precision)
        acc = self.accelerator
        self.device = acc.device
        self.world_size, self.rank = acc.num_processes, acc.process_index
        self.is_main = acc.is_main_process
        B, A = self.config.batch_size, self.config.grad_accum
        if B % (self.world_size * A):
            raise SoctuneError(f"train.batch_size={B} must be divisible by processes × grad_accum = "
                               f"{self.world_size} × {A} (it is the global batch, split evenly)")
        self.micro = B // (self.world_size * A)
        process.check_model(model)
        solver.check(process, model)
        self.process = process.to(self.device)
        self.model = model.to(self.device)
        self.solver = solver
        self.raw_reward = reward
        self.reward = Float32Reward(reward, self.device.type).to(self.device)
        self.sample_shape = tuple(sample_shape)
        # identical on every process: each draws the global batch's noise and keeps its rows
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        if self.world_size * A > 1:
            cond_sampler = dist_.sharded_cond_sampler(cond_sampler)
        self.ctx = FinetuneContext(process=self.process, model=self.model, reward=self.reward,
                                   sample_shape=self.sample_shape, batch_size=self.micro, generator=self.generator,
                                   cond_sampler=cond_sampler, device=self.device)
        torch.manual_seed(self.config.seed)
        solver.setup(self.ctx)
        solver.to(self.device)
        params = self.parameters()
        if not params:
            raise SoctuneError("nothing to train: the model has no trainable adaptation parameters")
        with torch.no_grad():
            for p in params:  # trainable weights (and so Adam's moments) in float32, whatever the base's dtype
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        self._broadcast(params)
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.optimizer = acc.prepare_optimizer(optimizer, device_placement=True)
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.last_nonfinite = ""
        self.history: list[dict[str, float]] = []

    # ---- parameters ----------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (model adaptation, then the solver's networks), each once."""
        seen: set[int] = set()
        out = []
        for p in [*self.model.trainable_parameters(), *self.solver.parameters()]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"model.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _broadcast(self, params: list[nn.Parameter]) -> None:
        """Every process starts from process 0's values (adapters initialised identically)."""
        if self.world_size == 1:
            return
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))

    # ---- one iteration -------------------------------------------------------------------
    def autocast(self) -> Any:
        """The accelerator's autocast (a no-op at fp32)."""
        return self.accelerator.autocast()

    def train_iteration(self) -> dict[str, float]:
        """One iteration: the solver's closing loss parts are one optimiser step each.

        With ``grad_accum`` = A the per-process batch is A micro-batches run in lockstep: each
        uses a copy of the iteration's generator, draws the global batch's noise and keeps its
        rows, so every other random choice (loss steps, transitions) is the same in all of them
        and equals one batch's; the u-th closing part of every micro-batch closes update u.

        A non-finite reward (the batch's ``reward_mean``), loss or gradient norm — on any
        process — skips that update; it is counted (``skipped_nonfinite``, ``nonfinite_total``)
        and, after ``max_nonfinite`` in a row, :class:`NonFiniteError` names the likely causes.
        """
        A = self.config.grad_accum
        t0 = time.perf_counter()
        if A == 1:
            gens = [self.generator]
        else:
            gens = [torch.Generator(device=self.device) for _ in range(A)]
            for g in gens:
                g.set_state(self.generator.get_state())
        for group in self.optimizer.param_groups:  # a function of the iteration: exact on resume
            group["lr"] = lr_at(self.config, self.step)
        ctxs = [replace(self.ctx, generator=g, iteration=self.step) for g in gens]
        self.ctx.iteration = self.step
        its = [self.solver.iteration(c) for c in ctxs]
        base = self.rank * self.micro * A
        shards = [(base + j * self.micro, base + (j + 1) * self.micro) for j in range(A)]
        merged: dict[str, float] = {}
        n_updates = 0
        while True:
            closing = [self._advance(it, rows) for it, rows in zip(its, shards)]
            done = [c is None for c in closing]
            if all(done):
                break
            if any(done):
                raise RuntimeError(f"solver '{self.solver.registered_name}' yielded a different number of updates "
                                   "for equally sized micro-batches")
            metrics = self._update(closing)  # type: ignore[arg-type]
            n_updates += int(metrics.get("skipped_nonfinite", 0.0) == 0.0)
            merged.update(metrics)
        if A > 1:
            self.generator.set_state(gens[0].get_state())
        self.optimizer.zero_grad(set_to_none=True)
        merged["updates"] = float(n_updates)
        merged["lr"] = lr_at(self.config, self.step)
        merged["time"] = time.perf_counter() - t0
        merged = self._average_over_processes(merged)
        merged["iteration"] = float(self.step)
        self.step += 1
        self.history.append(merged)
        return merged

    def _advance(self, it: Iterator[LossOutput], rows: tuple[int, int]) -> dict[str, Any] | None:
        """Run one micro-batch's solver up to its next closing part, backpropagating the parts
        on the way (scaled by 1/A). Returns {loss, ok, metrics} of the update, None when done."""
        A = self.config.grad_accum
        acc = {"loss": 0.0, "ok": True, "metrics": {}}
        started = False
        while True:
            with dist_.batch_shard(rows[0], rows[1], self.config.batch_size), self.autocast():
                out = next(it, None)
            if out is None:
                if started:
                    raise RuntimeError(f"solver '{self.solver.registered_name}' ended an iteration with an "
                                       "accumulating loss part and no closing one")
                return None
            started = True
            loss = out.loss
            ok = bool(torch.isfinite(loss))
            acc["loss"] += float(loss.detach())
            acc["ok"] &= ok
            if ok and loss.requires_grad:  # a closing part may be a constant (its terms all off)
                self.accelerator.backward(loss / A if A > 1 else loss)
            if not out.accumulate:
                acc["metrics"] = dict(out.metrics)
                return acc

    def _update(self, parts: list[dict[str, Any]]) -> dict[str, float]:
        """Average → (finite?) → clip → one optimiser step, or skip; returns the update's metrics."""
        metrics = _mean_metrics([p["metrics"] for p in parts])
        reward_ok = all(math.isfinite(p["metrics"].get("reward_mean", 0.0)) for p in parts)
        loss_ok = all(p["ok"] for p in parts)
        # every process must take the same decision, or the collectives below would deadlock
        cause = None
        if not self._all_true(reward_ok):
            cause = "reward"
        elif not self._all_true(loss_ok):
            cause = "loss"
        if cause is None:
            params = self.parameters()
            self._average_gradients(params)
            clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
            gn = self.accelerator.clip_grad_norm_(params, clip)  # unscales fp16 gradients first
            metrics["grad_norm"] = float(gn)
            if torch.isfinite(gn):
                self.optimizer.step()
            elif self.accelerator.scaler is not None:
                # fp16 overflow: the scaler skips this step and lowers its scale (expected early on)
                self.optimizer.step()
                metrics["skipped_overflow"] = 1.0
            else:  # identical on every process: the gradients were averaged
                cause = "gradient"
        self.optimizer.zero_grad(set_to_none=True)
        if cause is None:
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            metrics["skipped_nonfinite"] = 1.0
            metrics["nonfinite_in_row"] = float(self.nonfinite_in_row)
            self.last_nonfinite = cause
            if self.nonfinite_in_row >= self.config.max_nonfinite:
                raise NonFiniteError(
                    f"{self.nonfinite_in_row} non-finite updates in a row (last: non-finite {cause}) at iteration "
                    f"{self.step}; the reward scale (λ, --reward-scale) or the learning rate (--lr) is likely too "
                    "high, or the reward returns NaN/inf for some samples")
        metrics["loss"] = sum(p["loss"] for p in parts) / len(parts)
        metrics["nonfinite_total"] = float(self.nonfinite_total)
        return metrics

    # ---- collectives (accelerate's; no-ops in one process) -------------------------------
    def _all_true(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum")) == 0.0

    def _average_gradients(self, params: list[nn.Parameter]) -> None:
        """g ← (1/W) Σ_r g_r for every trainable tensor, in one flat all-reduce. A tensor
        without a gradient on some process counts as zero there; one without a gradient on
        every process keeps ``grad = None`` (so AdamW skips it, as in one process)."""
        if self.world_size == 1:
            return
        has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        has = self.accelerator.reduce(has, reduction="sum")
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        if not live:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in live])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in live:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def _average_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        from accelerate.utils import gather_object

        return _mean_metrics(gather_object([metrics]))

    # ---- the loop ----------------------------------------------------------------------
    def train(self, callback: MetricsCallback | None = None) -> list[dict[str, float]]:
        """Run the remaining iterations up to ``config.iters``; returns the metrics history."""
        while self.step < self.config.iters:
            m = self.train_iteration()
            if callback is not None:
                callback(self.step, m)
        return self.history

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, process: Process | None = None, base: bool = False,
               cond: Any = None) -> Tensor:
        """n samples [n, *S] from the fine-tuned (or with ``base=True`` the base) model, on the
        trainer's device, with any process (e.g. another noise level)."""
        proc = (process or self.process).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if cond is None and self.ctx.cond_sampler is not None:
            cond = self.ctx.cond_sampler(n, gen)
        with base_if(self.model, base), self.autocast():
            traj = rollout(proc, self.model, batch_size=n, sample_shape=self.sample_shape, cond=cond,
                           generator=gen, device=self.device)
        return traj.x_final.float()

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as tensors and plain values (saved with
        :func:`soctune.io.save_state`, never pickled): trainable weights (LoRA and the solver's
        networks), the solver's extra state, optimiser moments, the fp16 gradient scaler, the
        iteration, the non-finite counters, every RNG state (the training generator, torch
        CPU/CUDA, numpy, random) and the metrics history."""
        scaler = self.accelerator.scaler
        return {
            "format": CHECKPOINT_FORMAT,
            "trainable": {name: p.detach().clone() for name, p in self._named_trainable()},
            "solver": self.solver.state_dict(),
            "solver_extra": self.solver.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": self.step,
            "nonfinite": {"in_row": self.nonfinite_in_row, "total": self.nonfinite_total},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "history": list(self.history),
            "config": asdict(self.config),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The learning rate of the current config wins over the
        saved one (so a run stopped by non-finite updates can resume with a lower ``lr``)."""
        named = dict(self._named_trainable())
        missing = set(named) - set(state["trainable"])
        if missing:
            raise SoctuneError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                               "it was written by a different model or adapter configuration")
        saved_batch = state.get("config", {}).get("batch_size", self.config.batch_size)
        if saved_batch != self.config.batch_size:
            raise SoctuneError(f"the checkpoint was written with train.batch_size={saved_batch}, this run has "
                               f"{self.config.batch_size}; resume with the same (global) batch size")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(state["trainable"][name])
        try:
            self.solver.load_state_dict(state["solver"])
        except RuntimeError as exc:
            raise SoctuneError(f"the checkpoint's solver state does not fit solver "
                               f"'{self.solver.registered_name}' ({str(exc).splitlines()[0]}); resume with the "
                               "solver options it was written with") from None
        self.solver.load_extra_state(state["solver_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this run's lr, not the saved one (set per iteration)
            group["lr"] = self.config.lr
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        nf = state.get("nonfinite", {})
        self.nonfinite_in_row, self.nonfinite_total = int(nf.get("in_row", 0)), int(nf.get("total", 0))
        self.generator.set_state(state["generator"].to("cpu"))
        torch.set_rng_state(state["torch_rng"].to("cpu"))
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.to("cpu") for s in state["cuda_rng"]])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        self.history = [dict(h) for h in state["history"]]


def lr_at(config: TrainConfig, step: int) -> float:
    """The learning rate of iteration ``step`` (0-based) of ``config.iters``: ``constant`` → lr,
    ``cosine`` → lr·½(1 + cos(π·step/iters)) (lr at the first iteration, → 0 at the last)."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, config.iters) / config.iters))
    return config.lr


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Metrics of a whole batch from equal-sized parts' (micro-batches, processes): means are
    averaged; ``reward_std`` is combined exactly from the parts' means and stds,
    σ² = mean_r(σ_r² + μ_r²) − μ² (population variance)."""
    if len(rows) == 1:
        return dict(rows[0])
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    out = {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}
    if "reward_mean" in out and "reward_std" in out:
        mu = out["reward_mean"]
        second = sum(float(r["reward_std"]) ** 2 + float(r["reward_mean"]) ** 2 for r in rows) / len(rows)
        out["reward_std"] = max(second - mu * mu, 0.0) ** 0.5
    return out
