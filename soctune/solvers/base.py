"""The :class:`Solver` interface and its registry.

A solver turns rollouts of the fine-tuned model into losses. It sees a process only through
its step kernel (mean map, std), time grid and prior, and the reward only as r(x, cond) -> [B].
Methods are losses, the trainer owns the update: each training iteration the
:class:`~soctune.trainer.Trainer` asks the solver for loss parts via :meth:`Solver.iteration`
and decides everything else — backward (scaled under fp16), gradient averaging over processes,
accumulation over micro-batches, clipping and the optimiser step (one per closing part, so
several for PPO-style inner epochs). A solver never touches an optimiser, so its loss can be
unit-tested on its own and runs unchanged under any device, precision or process count.
Every random draw takes ``ctx.generator`` and a ``device=`` matching it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..models.base import Denoiser
from ..registry import Registry, SoctuneError, import_submodules, warn_user
from ..sde.base import Process
from ..trajectory import RewardFn

SOLVERS: Registry[type["Solver"]] = Registry("solver")
register_solver = SOLVERS.register

CondSampler = Callable[[int, torch.Generator], Any]


@dataclass
class FinetuneContext:
    """Everything a solver may use during an iteration.

    model: the denoiser with its adaptation (``with model.base():`` gives the base).
    reward: r(x [B,*S], cond) -> [B], differentiable, float32.
    sample_shape: S. batch_size: B. cond_sampler: (B, generator) -> conditioning or None.
    """

    process: Process
    model: Denoiser
    reward: RewardFn
    sample_shape: tuple[int, ...]
    batch_size: int
    generator: torch.Generator
    cond_sampler: CondSampler | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    iteration: int = 0

    def sample_cond(self) -> Any:
        return None if self.cond_sampler is None else self.cond_sampler(self.batch_size, self.generator)


@dataclass
class LossOutput:
    """loss: scalar tensor to minimise. metrics: floats for logging (reward_mean, …).

    accumulate: backpropagate this part now and take the optimiser step with the next output
    whose ``accumulate`` is False (one update from the sum of the parts). A loss that is a sum over
    steps can so free each step's graph before the next is built: memory flat in K."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    accumulate: bool = False


class Solver(nn.Module):
    """Base class of fine-tuning methods. Auxiliary networks (e.g. ∇-DB's flow-score head) are
    sub-modules, so their parameters are optimised and checkpointed with the model's.

    Args:
        reward_scale: λ in p* ∝ p_base^η · exp(λ r).
    """

    registered_name: ClassVar[str] = "?"
    #: the method samples the tilt only on memoryless processes (warn otherwise).
    wants_memoryless: ClassVar[bool] = False
    #: the method needs Gaussian steps with s_k > 0 / log-densities / model gradients.
    needs_stochastic: ClassVar[bool] = False
    #: the loss accounts for a process's running state cost (``Process.has_running_cost``); the
    #: others would silently optimise the terminal reward alone, so :meth:`check` refuses them.
    supports_running_cost: ClassVar[bool] = False

    def __init__(self, reward_scale: float = 1.0) -> None:
        super().__init__()
        if not reward_scale > 0:
            raise SoctuneError(f"reward_scale (λ) must be > 0, got {reward_scale}")
        self.reward_scale = float(reward_scale)

    @property
    def claims_tilt(self) -> bool:
        """Whether the method minimises the SOC cost J = E[Σ ½‖u_k‖² − λ r] of the chain (its optimum the
        base path measure tilted by e^{λr}): it then logs ``soc_cost`` and ``soctune evaluate`` reports J
        against the K-step lower bound (:mod:`soctune.soc`)."""
        return False

    def check(self, process: Process, model: Denoiser) -> None:
        """Raise :class:`SoctuneError` (one line) for an impossible pair; warn for a
        possible one whose result is not the tilt."""
        if getattr(process, "has_running_cost", False) and not self.supports_running_cost:
            raise SoctuneError(
                f"process '{process.registered_name}' has a running state cost, which solver '{self.registered_name}' "
                "ignores (it would optimise the terminal reward alone); use adjoint-matching")
        if self.claims_tilt and process.multistep:
            warn_user(
                f"solver '{self.registered_name}' on '{process.registered_name}' with a multistep kernel: its step means "
                "read earlier predictions, so the chain is not Markov in x and the method's optimality conditions "
                "hold only approximately (not the exact tilt); use a one-step kernel (dpmpp-sde: order=1, the default)")
        if self.needs_stochastic and all(
                float(s) == 0 for s in _probe_stds(process)):
            raise SoctuneError(
                f"solver '{self.registered_name}' needs a stochastic process, but "
                f"'{process.registered_name}' has zero noise; raise its noise (noise_scale, or diffusion for an "
                "euler-maruyama SDE) or pick another process")

    def setup(self, ctx: FinetuneContext) -> None:
        """Build auxiliary networks once shapes are known (called before the first iteration)."""

    def iteration(self, ctx: FinetuneContext) -> Iterator[LossOutput]:
        """Yield the losses of one training iteration."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Solver state beyond parameters (e.g. previous-iterate buffers) for checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def control_units(model: Denoiser) -> bool:
    """Whether the model's trainable part outputs the per-step control itself
    (:attr:`Denoiser.control_units`, e.g. :class:`~soctune.models.control.ControlGainDenoiser`)
    rather than a correction of the prediction (LoRA on a diffusers network, a plain
    :class:`~soctune.models.base.CorrectedDenoiser`). Solvers' ``step_weighting="auto"`` weighs
    each step's regression in these units, the ones in which the network's targets are O(1) at
    every step: a uniform weight in the wrong units lets the steps whose gain s_k/|c_k| is
    largest (or smallest) dominate the gradient by orders of magnitude."""
    return bool(getattr(model, "control_units", False) or getattr(model.unguided(), "control_units", False))


def _probe_stds(process: Process) -> list[float]:
    """Per-step stds of a process, independent of the model (probe with a zero prediction)."""
    stds = []
    x = torch.zeros(1, 1)
    for k in range(process.num_steps):
        pt = process.accepts[0]
        try:
            stds.append(float(process.step_kernel(x, k, torch.zeros_like(x), process.init_state(), pt).std))
        except Exception:  # a kernel that needs a real prediction: assume stochastic
            stds.append(1.0)
    return stds


def list_solvers() -> list[tuple[str, str]]:
    """[(name, one-line description)] of every registered solver."""
    _load_builtin()
    return [(e.name, e.description) for e in SOLVERS.entries()]


def get_solver(name: str, **options: Any) -> Solver:
    """Build a registered solver (or ``"pkg.module:Class"``) with keyword options."""
    _load_builtin()
    return SOLVERS.build(name, **options)


def _load_builtin() -> None:
    import_submodules("soctune.solvers")
