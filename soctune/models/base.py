"""The model interface every process and solver uses.

A :class:`Denoiser` maps a state ``x`` [B, *S] at generation time ``t`` [B] (0 = noise,
1 = data) and an optional conditioning to a prediction [B, *S] in one of four
parameterisations (:data:`PREDICTION_TYPES`). Processes convert that prediction into the
quantities they need (data estimate, noise estimate, velocity) from their schedule.

Fine-tuning never keeps a second copy of the base network: a denoiser carries its adaptation
(LoRA adapters for diffusers networks, a correction network for analytic/user models) and
``with model.base():`` switches the adaptation off.
"""

from __future__ import annotations

import copy
import math
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..registry import SoctuneError

#: ``epsilon`` (noise), ``v_prediction`` (VP v = αε − βx₁), ``sample`` (x̂₁, the data),
#: ``velocity`` (dx/dt in generation time, flow matching; diffusers' flow models predict −velocity).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "velocity")


class Denoiser(nn.Module):
    """Base class: ``forward(x [B,*S], t [B], cond) -> prediction [B,*S]``."""

    prediction_type: str = "epsilon"
    #: the state shape S the model works on, where the model fixes it (a Gaussian mixture's
    #: (D,), a correction network's); ``None`` when it takes any shape. ``soctune.finetune``
    #: reads it, so the shape is given once.
    sample_shape: tuple[int, ...] | None = None
    #: True when the trainable part outputs the per-step control u_k itself (not a prediction
    #: correction): solvers' ``step_weighting="auto"`` then regresses in control units.
    control_units: bool = False
    #: training defaults of this model class (:class:`~soctune.trainer.TrainConfig` fields): a layer
    #: under whatever the caller passes to :func:`soctune.finetune` — the in-memory counterpart of the
    #: ``train`` section a model folder declares in its soctune.json
    train_defaults: ClassVar[dict[str, Any]] = {}

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def base(self) -> AbstractContextManager[None]:
        """Context in which the model predicts with its adaptation switched off (a model
        without adaptation: nothing to switch)."""
        return nullcontext()

    def unguided(self) -> "Denoiser":
        """The same model without classifier-free guidance (the lean adjoint needs it)."""
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class FourierTimeEmbedding(nn.Module):
    """Random-free Fourier features of t ∈ [0,1]: [B] -> [B, 2·n]; fixed log-spaced frequencies,
    so the embedding resolves both the slow and the fast changes of a control in time."""

    def __init__(self, n: int = 16, max_freq: float = 64.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), n) * math.pi)

    def forward(self, t: Tensor) -> Tensor:
        arg = t[:, None].float() * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class CorrectionNet(nn.Module):
    """A small MLP control/correction c_φ(x, t) on flat states: [B, D], [B] -> [B, D_out]
    (D_out = ``out_dim``, default D; solvers also use it for flow heads, e.g. D_out = 1).

    The last layer is zero-initialised, so the fine-tuned model starts exactly at the base.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_features: int = 16,
                 context: int = 0, out_dim: int | None = None) -> None:
        super().__init__()
        self.time = FourierTimeEmbedding(time_features)
        layers: list[nn.Module] = []
        width = dim + context + 2 * time_features + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim if out_dim is None else out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        parts = [x] if context is None else [x, context.to(x.dtype)]
        h = torch.cat([*parts, self.time(t).to(x.dtype), t[:, None].to(x.dtype)], dim=-1)
        return self.out(self.body(h))


class SwitchableDenoiser(Denoiser):
    """A denoiser whose whole adaptation is one switch: ``forward`` predicts with the base model
    while ``self._adapt`` is False, and :meth:`base` turns it off for the context (restoring
    the previous value, so contexts nest)."""

    def __init__(self) -> None:
        super().__init__()
        self._adapt = True

    @contextmanager
    def base(self) -> Iterator[None]:
        previous, self._adapt = self._adapt, False
        try:
            yield
        finally:
            self._adapt = previous


class CorrectedDenoiser(SwitchableDenoiser):
    """An analytic or user model with a learnable additive correction:
    pred_θ(x, t) = pred_base(x, t) + c_φ(x, t). ``base()`` drops the correction.

    Args:
        base_model: a frozen :class:`Denoiser` (e.g. an exact Gaussian-mixture model).
        dim: flattened state size D (the correction works on [B, D]); may be left out when
            ``sample_shape`` is given or the base model knows its shape.
        sample_shape: the state shape S (D = ∏S). Given here (or known by the base model), it is
            the model's :attr:`~Denoiser.sample_shape` and ``soctune.finetune`` needs no
            ``sample_shape``; with ``dim`` alone the layout of the D numbers is not known.
        base_features: also feed the base prediction to c_φ, c_φ(x, t, pred_base(x, t)). Like LoRA
            reusing the pretrained network's features, this hands the correction the base model's
            sharp structure (e.g. mode responsibilities) instead of relearning it from raw x:
            on the 2-mode mixture's linear tilt a 3×256 MLP regressed on the exact optimal control
            for 300 iterations reaches weights 0.116/0.884 (exact 0.119/0.881) with it, 0.159/0.841
            without.
    """

    def __init__(self, base_model: Denoiser, dim: int | None = None, base_features: bool = False, *,
                 sample_shape: Sequence[int] | int | None = None, **net_options: Any) -> None:
        super().__init__()
        shape = base_model.sample_shape
        if sample_shape is not None:
            mine = as_shape(sample_shape)
            if shape is not None and mine != shape:
                raise SoctuneError(f"sample_shape={mine} contradicts the base model's state shape {shape}; "
                                   "drop sample_shape")
            shape = mine
        if shape is not None:
            if dim is not None and int(dim) != math.prod(shape):
                raise SoctuneError(f"dim={dim} contradicts the state shape {shape} ({math.prod(shape)} numbers); "
                                   "drop dim")
            dim = math.prod(shape)
        if dim is None:
            raise SoctuneError("CorrectedDenoiser needs the state shape: pass sample_shape=(...) (or dim=D)")
        self.sample_shape = shape
        self.base_model = base_model
        self.prediction_type = base_model.prediction_type
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        self.base_features = bool(base_features)
        self.correction = CorrectionNet(dim, context=dim if self.base_features else 0, **net_options)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        out = self.base_model(x, t, cond)
        if not self._adapt:
            return out
        flat = x.reshape(x.shape[0], -1)
        context = out.reshape(x.shape[0], -1) if self.base_features else None
        return out + self.correction(flat, t, context).reshape(x.shape)


class ZeroDenoiser(Denoiser):
    """Predicts 0 everywhere: the base "model" of a pure SOC problem, whose process drift
    b(x, t) + σ(t)·pred reduces to the uncontrolled drift. Wrap in :class:`CorrectedDenoiser`
    to learn a control u(x, t)."""

    prediction_type = "control"

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return torch.zeros_like(x)


class ClassifierFreeGuidance(Denoiser):
    """ε̃ = ε(x, ∅) + w·(ε(x, c) − ε(x, ∅)), batching both calls into one forward.

    ``cond`` and ``null_cond`` are tensors with a leading batch dimension (or dicts of them);
    conditioning passes through the process untouched and is only combined here.
    """

    def __init__(self, model: Denoiser, scale: float, null_cond: Any) -> None:
        super().__init__()
        self.model = model
        self.scale = float(scale)
        self.null_cond = null_cond
        self.prediction_type = model.prediction_type

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if cond is None or self.scale == 1.0:
            return self.model(x, t, cond)
        b = x.shape[0]
        both = _cat_cond(_expand_cond(self.null_cond, b), cond)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), both)
        uncond, cond_out = out[:b], out[b:]
        return uncond + self.scale * (cond_out - uncond)

    @contextmanager
    def base(self) -> Iterator[None]:
        with self.model.base():
            yield

    def unguided(self) -> Denoiser:
        return self.model

    @property  # type: ignore[override]
    def sample_shape(self) -> tuple[int, ...] | None:
        return self.model.sample_shape


def as_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    """A state shape as a tuple of positive ints (an int D means (D,))."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not dims or any(int(n) < 1 or int(n) != n for n in dims):
        raise SoctuneError(f"a state shape is a tuple of positive integers, got {shape!r}")
    return tuple(int(n) for n in dims)


def resolve_sample_shape(model: Denoiser, sample_shape: Sequence[int] | int | None) -> tuple[int, ...]:
    """The state shape S of a run on ``model``: the model's :attr:`Denoiser.sample_shape` when it
    knows it, else ``sample_shape``. Both given and different is a one-line error (the shape is
    said once); neither given is a one-line error naming both ways to say it."""
    known = model.sample_shape
    if sample_shape is None:
        if known is None:
            raise SoctuneError(f"{type(model).__name__} does not know its state shape: pass sample_shape=(...) or "
                               "build the model with it (e.g. CorrectedDenoiser(base, sample_shape=(2,)))")
        return tuple(known)
    given = as_shape(sample_shape)
    if known is not None and given != tuple(known):
        raise SoctuneError(f"sample_shape={given} contradicts the model's state shape {tuple(known)}; "
                           "drop sample_shape (the model knows it)")
    return given


def base_if(model: Denoiser, base: bool) -> AbstractContextManager[None]:
    """``model.base()`` when ``base`` (predict with the pretrained model), else a no-op context
    (the fine-tuned model): one switch for the samplers that offer both."""
    return model.base() if base else nullcontext()


def index_batch(obj: Any, idx: Tensor, batch: int) -> Any:
    """Rows ``idx`` [n] (long) of a batched object: conditioning or a step state.

    Batch-leading means a tensor [batch, ...], a list/tuple of length ``batch``, or a dict of
    those (nested); a dict subclass keeps its type and its batch-leading attributes (e.g. the
    prompt strings of a text conditioning) are indexed with it. Anything else — ``None``,
    a 0-dim or shared tensor, a scalar — is the same for every sample and passes unchanged.
    Repeated indices tile: ``torch.arange(n·B) % B`` gives n copies laid out as (n B).
    """
    if isinstance(obj, Tensor):
        return obj[idx.to(obj.device)] if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        rows = {k: index_batch(v, idx, batch) for k, v in obj.items()}
        if type(obj) is dict:
            return rows
        out = copy.copy(obj)  # same subclass without calling its __init__; then swap in the rows
        out.clear()
        out.update(rows)
        for name, value in vars(obj).items():
            setattr(out, name, index_batch(value, idx, batch))
        return out
    if isinstance(obj, (list, tuple)) and len(obj) == batch:
        return type(obj)(obj[int(i)] for i in idx)
    return obj


def _expand_cond(c: Any, b: int) -> Any:
    if isinstance(c, dict):
        return {k: _expand_cond(v, b) for k, v in c.items()}
    if isinstance(c, Tensor) and c.shape[0] == 1 and b != 1:
        return c.expand(b, *c.shape[1:])
    return c


def _cat_cond(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b])
