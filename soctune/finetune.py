"""The training loop (:class:`Finetuner`) and the one-call entry point :func:`finetune`."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

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
    """

    def __init__(self, process: Process, model: Denoiser, solver: Solver, reward: RewardFn,
                 sample_shape: tuple[int, ...], config: TrainConfig | None = None,
                 cond_sampler: CondSampler | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        process.check_model(model)
        solver.check(process, model)
        self.process, self.model, self.solver, self.reward = process, model, solver, reward
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.ctx = FinetuneContext(process=process, model=model, reward=reward, sample_shape=tuple(sample_shape),
                                   batch_size=self.config.batch_size, generator=self.generator,
                                   cond_sampler=cond_sampler, device=self.device)
        torch.manual_seed(self.config.seed)
        solver.setup(self.ctx)
        params = self.parameters()
        if not params:
            raise SoctuneError("nothing to train: the model has no trainable adaptation parameters")
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.step = 0
        self.nonfinite_in_row = 0
        self.history: list[dict[str, float]] = []

    def parameters(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        out = []
        for p in [*self.model.trainable_parameters(), *self.solver.parameters()]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def train_iteration(self) -> dict[str, float]:
        """One iteration: every loss the solver yields gets its own optimiser step."""
        self.ctx.iteration = self.step
        t0 = time.perf_counter()
        merged: dict[str, float] = {}
        n_updates = 0
        for out in self.solver.iteration(self.ctx):
            self.optimizer.zero_grad(set_to_none=True)
            loss = out.loss
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                params = self.parameters()
                gn = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip if self.config.grad_clip > 0 else math.inf)
                finite = bool(torch.isfinite(gn))
                out.metrics["grad_norm"] = float(gn)
            if finite:
                self.optimizer.step()
                n_updates += 1
                self.nonfinite_in_row = 0
            else:
                self.nonfinite_in_row += 1
                out.metrics["skipped_nonfinite"] = 1.0
                if self.nonfinite_in_row >= self.config.max_nonfinite:
                    raise NonFiniteError(
                        f"{self.nonfinite_in_row} non-finite losses/gradients in a row at iteration {self.step}; "
                        "lower the reward scale or the learning rate")
            out.metrics["loss"] = float(loss.detach())
            merged.update(out.metrics)
        self.optimizer.zero_grad(set_to_none=True)
        merged["updates"] = float(n_updates)
        merged["iteration"] = float(self.step)
        merged["time"] = time.perf_counter() - t0
        self.step += 1
        self.history.append(merged)
        return merged

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
        """Everything needed to resume exactly: trainable weights, solver state, optimiser,
        iteration count, RNG states and the metrics history."""
        return {
            "trainable": {name: p.detach().clone() for name, p in self._named_trainable()},
            "solver": self.solver.state_dict(),
            "solver_extra": self.solver.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": list(self.history),
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        named = dict(self._named_trainable())
        missing = set(named) - set(state["trainable"])
        if missing:
            raise SoctuneError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                               "it was written by a different model or adapter configuration")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(state["trainable"][name])
        self.solver.load_state_dict(state["solver"])
        self.solver.load_extra_state(state["solver_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
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
