"""The training loop (:class:`Finetuner`) and the one-call entry point :func:`finetune`."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import distributed as dist_
from .distributed import DistInfo
from .models.base import Denoiser
from .registry import SoctuneError
from .sde.base import Process
from .solvers.base import CondSampler, FinetuneContext, Solver
from .trajectory import RewardFn, rollout

MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainConfig:
    """Optimisation settings shared by every solver.

    iters: training iterations. batch_size: trajectories per iteration. lr: Adam(W) step size.
    grad_clip: max global gradient norm (0 = off). max_nonfinite: consecutive non-finite
    losses/gradients tolerated (each skips its update) before the run stops.
    """

    iters: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    max_nonfinite: int = 5

    def validate(self) -> None:
        for name in ("iters", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SoctuneError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SoctuneError(f"lr must be > 0, got {self.lr}")
        if self.grad_clip < 0:
            raise SoctuneError(f"grad_clip must be ≥ 0, got {self.grad_clip}")


class NonFiniteError(SoctuneError):
    """Too many consecutive non-finite losses or gradients."""


class Finetuner:
    """Fine-tunes ``model``'s adaptation with ``solver`` on ``process`` towards ``reward``.

    The trainable parameters are the model's (LoRA adapters / correction network) plus the
    solver's auxiliary networks. After :meth:`train`, :meth:`sample` draws from the fine-tuned
    model (any process can be passed, e.g. another noise level or the ODE).

    ``dist``: data-parallel training (see :mod:`soctune.distributed`). ``config.batch_size`` is
    then the *global* batch B; this rank rolls out its B/W rows, with the noise of those rows of
    the global batch, and gradients are averaged over the ranks before clipping and the step.
    """

    def __init__(self, process: Process, model: Denoiser, solver: Solver, reward: RewardFn,
                 sample_shape: tuple[int, ...], config: TrainConfig | None = None,
                 cond_sampler: CondSampler | None = None, device: str | torch.device = "cpu",
                 dist: DistInfo | None = None) -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        self.dist = dist or dist_.SINGLE
        self.rows = dist_.shard_rows(self.config.batch_size, self.dist)
        process.check_model(model)
        solver.check(process, model)
        self.process, self.model, self.solver, self.reward = process, model, solver, reward
        self.device = torch.device(device)
        # identical on every rank: each draws the global batch's noise and keeps its rows
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        if self.dist.enabled:
            cond_sampler = dist_.sharded_cond_sampler(cond_sampler)
        self.ctx = FinetuneContext(process=process, model=model, reward=reward, sample_shape=tuple(sample_shape),
                                   batch_size=self.rows[1] - self.rows[0], generator=self.generator,
                                   cond_sampler=cond_sampler, device=self.device)
        torch.manual_seed(self.config.seed)
        solver.setup(self.ctx)
        params = self.parameters()
        if not params:
            raise SoctuneError("nothing to train: the model has no trainable adaptation parameters")
        dist_.broadcast_parameters(params, self.dist)
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.history: list[dict[str, float]] = []
        self._parts: dict[str, Any] | None = None  # gradient accumulation across LossOutput parts

    def parameters(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        out = []
        for p in [*self.model.trainable_parameters(), *self.solver.parameters()]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def train_iteration(self) -> dict[str, float]:
        """One iteration: every loss the solver yields gets its own optimiser step.

        A non-finite reward (the batch's ``reward_mean``), loss or gradient norm — on any rank —
        skips that update; it is counted (``skipped_nonfinite``, ``nonfinite_total``) and, after
        ``max_nonfinite`` in a row, :class:`NonFiniteError` names the likely causes.
        """
        self.ctx.iteration = self.step
        t0 = time.perf_counter()
        merged: dict[str, float] = {}
        n_updates = 0
        with dist_.batch_shard(*self.rows, self.config.batch_size):
            for out in self.solver.iteration(self.ctx):
                self._update(out)
                if out.accumulate:
                    continue
                n_updates += int(out.metrics.get("skipped_nonfinite", 0.0) == 0.0)
                merged.update(out.metrics)
            if self._parts is not None:
                raise RuntimeError(f"solver '{self.solver.registered_name}' ended an iteration with an "
                                   "accumulating loss part and no closing one")
        self.optimizer.zero_grad(set_to_none=True)
        merged["updates"] = float(n_updates)
        merged["time"] = time.perf_counter() - t0
        merged = dist_.average_metrics(merged, self.dist)
        merged["iteration"] = float(self.step)
        self.step += 1
        self.history.append(merged)
        return merged

    def _update(self, out: Any) -> None:
        """zero_grad → (finite?) backward → average gradients over ranks → clip → step, or skip.

        Parts with ``out.accumulate`` are backpropagated into the same gradients (a non-finite
        part is not, and spoils the whole update); the step happens on the closing part, whose
        logged loss is the sum of the parts."""
        loss = out.loss
        if self._parts is None:
            self.optimizer.zero_grad(set_to_none=True)
            self._parts = {"loss": 0.0, "ok": True}
        part_ok = bool(torch.isfinite(loss))
        self._parts["loss"] += float(loss.detach())
        self._parts["ok"] &= part_ok
        if part_ok and loss.requires_grad:  # a closing part may be a constant (its terms all off)
            loss.backward()
        if out.accumulate:
            return
        parts, self._parts = self._parts, None
        reward_ok = math.isfinite(out.metrics.get("reward_mean", 0.0))
        # every rank must take the same decision, or the gradient all-reduce would deadlock
        cause = None
        if not dist_.all_true(reward_ok, self.dist):
            cause = "reward"
        elif not dist_.all_true(parts["ok"], self.dist):
            cause = "loss"
        if cause is None:
            params = self.parameters()
            dist_.all_reduce_gradients(params, self.dist)
            clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
            gn = torch.nn.utils.clip_grad_norm_(params, clip)
            out.metrics["grad_norm"] = float(gn)
            if not torch.isfinite(gn):  # identical on all ranks: the gradients were averaged
                cause = "gradient"
        if cause is None:
            self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            out.metrics["skipped_nonfinite"] = 1.0
            out.metrics["nonfinite_in_row"] = float(self.nonfinite_in_row)
            self.last_nonfinite = cause
            if self.nonfinite_in_row >= self.config.max_nonfinite:
                raise NonFiniteError(
                    f"{self.nonfinite_in_row} non-finite updates in a row (last: non-finite {cause}) at iteration "
                    f"{self.step}; the reward scale (λ, --reward-scale) or the learning rate (--lr) is likely too "
                    "high, or the reward returns NaN/inf for some samples")
        out.metrics["loss"] = parts["loss"]
        out.metrics["nonfinite_total"] = float(self.nonfinite_total)

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
        """n samples [n, *S] from the fine-tuned (or with ``base=True`` the base) model."""
        proc = process or self.process
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if cond is None and self.ctx.cond_sampler is not None:
            cond = self.ctx.cond_sampler(n, gen)
        ctx_mgr = self.model.base() if base else _nullcontext()
        with ctx_mgr:
            traj = rollout(proc, self.model, batch_size=n, sample_shape=self.ctx.sample_shape, cond=cond,
                           generator=gen, device=self.device)
        return traj.x_final

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: trainable weights (LoRA and the solver's
        auxiliary networks, e.g. ∇-DB's flow head, via ``solver``), the solver's extra state
        (e.g. DDPO's per-condition reward buffers), optimiser moments, iteration count, the
        non-finite counters, every RNG state (sampling generator, torch CPU/CUDA, numpy, random)
        and the metrics history."""
        return {
            "format": 2,
            "trainable": {name: p.detach().clone() for name, p in self._named_trainable()},
            "solver": self.solver.state_dict(),
            "solver_extra": self.solver.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "nonfinite": {"in_row": self.nonfinite_in_row, "total": self.nonfinite_total},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "history": list(self.history),
            "config": asdict(self.config),
            "world_size": self.dist.world_size,
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
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr
        self.step = int(state["step"])
        nf = state.get("nonfinite", {})
        self.nonfinite_in_row, self.nonfinite_total = int(nf.get("in_row", 0)), int(nf.get("total", 0))
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if "numpy_rng" in state:
            np.random.set_state(state["numpy_rng"])
        if "python_rng" in state:
            random.setstate(state["python_rng"])
        self.history = list(state["history"])

    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"model.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad]


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def finetune(*, model: Denoiser, process: Process | str, solver: Solver | str, reward: RewardFn,
             sample_shape: tuple[int, ...], process_options: dict[str, Any] | None = None,
             solver_options: dict[str, Any] | None = None, cond_sampler: CondSampler | None = None,
             callback: MetricsCallback | None = None, **train: Any) -> Finetuner:
    """Fine-tune ``model`` in one call and return the trained :class:`Finetuner`
    (``.sample(n)`` draws from the fine-tuned model, ``.history`` holds the metrics).

    ``process``/``solver`` are objects or registered names (options via ``*_options``);
    remaining keyword arguments are :class:`TrainConfig` fields (iters, batch_size, lr, …).
    """
    from .sde import get_process
    from .solvers import get_solver

    proc = get_process(process, **(process_options or {})) if isinstance(process, str) else process
    solv = get_solver(solver, **(solver_options or {})) if isinstance(solver, str) else solver
    bad = set(train) - set(TrainConfig.__dataclass_fields__)
    if bad:
        raise SoctuneError(f"unknown training option(s) {sorted(bad)}; valid: {sorted(TrainConfig.__dataclass_fields__)}")
    ft = Finetuner(proc, model, solv, reward, sample_shape, TrainConfig(**train), cond_sampler=cond_sampler)
    ft.train(callback)
    return ft
