"""Rewards: differentiable r(x [B,*S], cond) -> [B] (a log-reward), registered by name.

``get_reward("linear:0.5,0")`` style specs: the name, then an optional argument string after
the first ``:`` that the reward class parses (``from_arg``). Plug-ins: ``"pkg.module:fn"`` —
a function r(x, cond) or a class.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..registry import Registry, import_submodules, SoctuneError

REWARDS: Registry[Any] = Registry("reward")
register_reward = REWARDS.register


class Reward(nn.Module):
    """Base class: ``forward(x [B,*S], cond=None) -> [B]`` in float32. ``maximum`` is an upper
    bound of r where one is known (rejection sampling of the exact tilt needs it)."""

    maximum: float | None = None

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def from_arg(cls, arg: str | None) -> "Reward":
        if arg:
            raise SoctuneError(f"reward '{getattr(cls, 'registered_name', cls.__name__)}' takes no argument (got '{arg}')")
        return cls()


def _floats(arg: str, what: str) -> list[float]:
    try:
        return [float(v) for v in arg.split(",")]
    except ValueError:
        raise SoctuneError(f"{what} expects comma-separated numbers, got '{arg}'") from None


@register_reward("linear", "r(x) = aᵀx on flat x; arg: a as comma-separated numbers (default 1,0,…)")
class LinearReward(Reward):
    """r(x) = aᵀ flat(x). Tilting a Gaussian mixture by exp(λr) has a closed form."""

    def __init__(self, a: Any = (1.0,)) -> None:
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float32).flatten())

    @classmethod
    def from_arg(cls, arg: str | None) -> "LinearReward":
        return cls(_floats(arg, "linear") if arg else (1.0,))

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        flat = x.reshape(x.shape[0], -1).float()
        a = self.a if self.a.numel() == flat.shape[1] else torch.nn.functional.pad(self.a, (0, flat.shape[1] - self.a.numel()))
        return flat @ a


@register_reward("quadratic", "r(x) = −½‖x − c‖²·scale on flat x; arg: c as comma-separated numbers")
class QuadraticReward(Reward):
    """r(x) = −½ (x − c)ᵀ A (x − c) with A = scale·I (or a given PSD matrix)."""

    maximum = 0.0

    def __init__(self, c: Any = (0.0,), A: Any = None, scale: float = 1.0) -> None:
        super().__init__()
        c_t = torch.as_tensor(c, dtype=torch.float32).flatten()
        self.register_buffer("c", c_t)
        A_t = scale * torch.eye(c_t.numel()) if A is None else torch.as_tensor(A, dtype=torch.float32)
        self.register_buffer("A", A_t)

    @classmethod
    def from_arg(cls, arg: str | None) -> "QuadraticReward":
        return cls(_floats(arg, "quadratic") if arg else (0.0,))

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        d = x.reshape(x.shape[0], -1).float() - self.c
        return -0.5 * torch.einsum("bi,ij,bj->b", d, self.A, d)


class FunctionReward(Reward):
    """Wraps a plain function r(x, cond) -> [B] (plug-ins)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        try:
            return self.fn(x, cond)
        except TypeError:
            return self.fn(x)


def get_reward(spec: str | Callable[..., Tensor], **options: Any) -> Reward:
    """Build a reward from ``"name[:arg]"``, ``"pkg.module:fn[:arg]"`` or a callable."""
    _load_builtin()
    if callable(spec) and not isinstance(spec, str):
        return spec if isinstance(spec, Reward) else FunctionReward(spec)
    name, _, arg = spec.partition(":")
    if name not in REWARDS and arg and ("." in name or _is_module(name)):  # plug-in "pkg.module:fn[:arg]"
        attr, _, arg = arg.partition(":")
        obj = REWARDS.get(f"{name}:{attr}")
    else:
        obj = REWARDS.get(name)
    if isinstance(obj, type) and issubclass(obj, Reward):
        return obj.from_arg(arg or None) if not options else obj(**options)
    if isinstance(obj, type):
        return FunctionReward(obj(**options))
    if callable(obj):
        return FunctionReward(obj)
    raise SoctuneError(f"reward '{spec}' is neither a Reward class nor a function")


def _is_module(name: str) -> bool:
    """A top-level importable module (a plug-in path "my_rewards:fn" without a dot)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def list_rewards() -> list[tuple[str, str]]:
    _load_builtin()
    return [(e.name, e.description) for e in REWARDS.entries()]


def _load_builtin() -> None:
    import_submodules("soctune.rewards")
