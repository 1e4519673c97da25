"""The :class:`Process` abstraction: one generative SDE, two views.

Continuous view: dX = b(X, t) dt + σ(t) dW in generation time t ∈ [0, 1] (t = 0 noise, t = 1
data), with b depending on the model prediction at (X, t).

Discrete view: on a grid t_0 < … < t_K every step is a Gaussian transition

    x_{k+1} = m_k(x_k, pred_k, state_k) + s_k · ξ_k,   ξ_k ~ N(0, I).

That (mean map, std) pair is the whole trajectory interface: rollouts, replays and every solver
use nothing else. A process whose discretisation is Euler–Maruyama only has to implement
``drift`` and ``diffusion``; others override :meth:`Process.step_kernel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..models.base import Denoiser
from ..registry import Registry, SoctuneError, constructor_options, import_submodules

PROCESSES: Registry[type["Process"]] = Registry("process")
register_process = PROCESSES.register


@dataclass
class StepOutput:
    """One Gaussian transition N(mean, std²·I).

    mean: [B, *S]. std: 0-dim tensor (the same for the whole batch). x1_hat: the data estimate
    x̂₁ implied by the prediction ([B, *S]; ``None`` for processes without one — generation time
    runs from noise x_0 to data x_1). state: what the next step needs (e.g. the previous x̂₁ of a
    multistep solver), treated as a constant. pred: the model prediction [B, *S] the kernel was
    built from (set by :func:`soctune.trajectory.model_step`; ``None`` when a kernel is called
    directly with a prediction).
    """

    mean: Tensor
    std: Tensor
    x1_hat: Tensor | None = None
    state: dict[str, Tensor] = field(default_factory=dict)
    pred: Tensor | None = None


class Process(nn.Module):
    """A discretised generative SDE. Subclasses set ``memoryless`` and the model
    parameterisations they accept, and implement ``drift``/``diffusion`` (Euler–Maruyama step
    by default) or ``step_kernel``.

    A subclass declares its own parameters as annotated class attributes with a default,
    ``A: float = 1.0``; the constructor (and so ``get_process(name, A=2.0, num_steps=20)``)
    takes them as keywords and sets them before the grid is built. An unknown keyword is a
    one-line error naming the accepted ones.

    Args:
        num_steps: K, the number of transitions of the discrete chain.
        params: values of the declared parameters (:meth:`declared_params`).
    """

    registered_name: ClassVar[str] = "?"
    #: X_0 is independent of X_1 under the base process (needed for reward tilts).
    memoryless: ClassVar[bool] = False
    #: the SOC problem has a running state cost f(x, t) besides the terminal reward (J = E[Σ(½‖u_k‖² +
    #: f(x_k)Δt) − λr(x_K)]); such a process defines ``running_cost(x [B,*S], t) -> [B]``. Only solvers
    #: with ``supports_running_cost`` accept it (soctune.soc evaluates it).
    has_running_cost: ClassVar[bool] = False
    #: prediction types the process can turn into a drift.
    accepts: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample", "velocity")

    def __init__(self, num_steps: int = 50, **params: Any) -> None:
        super().__init__()
        if int(num_steps) < 1:
            raise SoctuneError(f"num_steps must be a positive integer, got {num_steps}")
        unknown = sorted(set(params) - set(self.declared_params()))
        if unknown:
            raise SoctuneError(f"{type(self).__name__} has no option {', '.join(unknown)}; it accepts "
                               f"{', '.join(constructor_options(type(self)) or [])}")
        for name, value in params.items():  # before make_grid, which may read them
            setattr(self, name, value)
        self.num_steps = int(num_steps)
        self.register_buffer("ts", self.make_grid(self.num_steps).to(torch.float64), persistent=False)

    @classmethod
    def declared_params(cls) -> dict[str, Any]:
        """{name: default} of the parameters the subclasses declare as annotated class attributes
        with a default (``A: float = 1.0``); ``ClassVar`` and ``_private`` names are not
        parameters."""
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if klass is Process or not issubclass(klass, Process):
                continue
            own = vars(klass)
            for name, annotation in own.get("__annotations__", {}).items():
                if not name.startswith("_") and name in own and "ClassVar" not in str(annotation):
                    out[name] = own[name]
        return out

    # ---- discrete view -------------------------------------------------------------------
    def make_grid(self, num_steps: int) -> Tensor:
        """Generation times t_0 < … < t_K, [K+1] float64. Default: uniform on [0, 1]."""
        return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)

    def model_time(self, k: int) -> float:
        """Generation time at which the model is evaluated for step k (default t_k)."""
        return float(self.ts[k])

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """x_0 ~ N(0, I), [B, *S]."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def init_state(self) -> dict[str, Tensor]:
        """State entering step 0 (empty for one-step kernels)."""
        return {}

    @property
    def multistep(self) -> bool:
        """Whether some step's mean reads the state earlier steps left (e.g. a multistep solver's previous
        x̂₁): the chain is then Markov in (x_k, state), not in x_k alone, and methods whose conditions are
        written on x_k (detailed-balance flows F(x_k), the adjoint through x_k) hold only approximately."""
        return False

    def check_model(self, model: Denoiser) -> None:
        """Raise a one-line error if the process cannot use this model's prediction type."""
        pt = getattr(model, "prediction_type", None)
        if pt not in self.accepts:
            raise SoctuneError(
                f"process '{self.registered_name}' cannot use prediction type '{pt}'; "
                f"it accepts {', '.join(self.accepts)} — pick a matching process or model"
            )
        # a model that knows its training noise path (diffusers models) vetoes a process on another
        # path that the prediction type alone lets through: an x̂₁-prediction VP model on the flow
        # path, or a ddpm process built on other betas than the model's scheduler config
        hook = getattr(model, "check_process", None)
        if callable(hook):
            hook(self)

    def step_kernel(self, x: Tensor, k: int, pred: Tensor, state: dict[str, Tensor],
                    prediction_type: str) -> StepOutput:
        """Gaussian transition of step k from x_k [B,*S] given the model prediction [B,*S].

        Default: Euler–Maruyama, m = x + b(x, t_k)Δt, s = σ(t_k)√Δt.
        """
        t, t_next = float(self.ts[k]), float(self.ts[k + 1])
        dt = t_next - t
        drift = self.drift(x, t, pred, prediction_type)
        std = torch.as_tensor(float(self.diffusion(t)) * math.sqrt(dt), dtype=x.dtype, device=x.device)
        return StepOutput(mean=x + drift * dt, std=std)

    # ---- continuous view -----------------------------------------------------------------
    def drift(self, x: Tensor, t: float, pred: Tensor, prediction_type: str) -> Tensor:
        """b(x, t) [B,*S] given the model prediction at (x, t)."""
        raise NotImplementedError(f"{type(self).__name__} defines no continuous drift")

    def diffusion(self, t: float) -> float:
        """σ(t) ≥ 0 (scalar, isotropic)."""
        raise NotImplementedError(f"{type(self).__name__} defines no continuous diffusion")

    def as_torchsde(self, model: Denoiser, cond: Any = None, sample_shape: tuple[int, ...] | None = None
                    ) -> "TorchSDE":
        """An object with ``f``, ``g``, ``noise_type='diagonal'``, ``sde_type='ito'`` for
        ``torchsde.sdeint`` on flattened states y [B, D]; ``sample_shape`` restores [B, *S]."""
        return TorchSDE(self, model, cond, sample_shape)

    # ---- densities -----------------------------------------------------------------------
    @staticmethod
    def log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """log N(x_next; mean, std² I) summed over the event dims: [B,*S] -> [B]."""
        var = std.to(x_next.dtype) ** 2
        d = x_next[0].numel()
        sq = (x_next - mean).pow(2).flatten(1).sum(1)
        return -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)


class TorchSDE(nn.Module):
    """torchsde adapter: f(t, y) = b, g(t, y) = σ(t)·1 on flattened y [B, D]."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, process: Process, model: Denoiser, cond: Any, sample_shape: tuple[int, ...] | None) -> None:
        super().__init__()
        self.process, self.model, self.cond, self.sample_shape = process, model, cond, sample_shape

    def _unflat(self, y: Tensor) -> Tensor:
        return y if self.sample_shape is None else y.reshape(y.shape[0], *self.sample_shape)

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        x = self._unflat(y)
        tb = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        pred = self.model(x, tb, self.cond)
        return self.process.drift(x, float(t), pred, self.model.prediction_type).reshape(y.shape)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        return torch.full_like(y, float(self.process.diffusion(float(t))))


def list_processes() -> list[tuple[str, str]]:
    """[(name, one-line description)] of every registered process."""
    _load_builtin()
    return [(e.name, e.description) for e in PROCESSES.entries()]


def get_process(name: str, **options: Any) -> Process:
    """Build a registered process (or ``"pkg.module:Class"``) with keyword options."""
    _load_builtin()
    return PROCESSES.build(name, **options)


def _load_builtin() -> None:
    import_submodules("soctune.sde")

