"""Rewards: differentiable r(x [B,*S], cond) -> [B] (a log-reward), registered by name.

``get_reward("linear:0.5,0")`` style specs: the name, then an optional argument string after
the first ``:`` that the reward class parses (``from_arg``). Plug-ins: ``"pkg.module:fn"`` —
a function r(x, cond) or a class. Weighted sums (DRaFT's reward mixing):
``"aesthetic+0.5*hpsv2"`` — see :func:`get_reward` for the grammar and :class:`WeightedSum`.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, Sequence

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


@register_reward("linear", "r(x) = aᵀx on flat x; arg: a as comma-separated numbers, one per state entry "
                           "(default: the first entry, r(x) = x₁)")
class LinearReward(Reward):
    """r(x) = aᵀ flat(x) for x [B, *S] -> [B]. Tilting a Gaussian mixture by exp(λr) has a closed form.

    Args:
        a: the D = prod(S) weights (any shape, flattened), or ``None`` for r(x) = x₁ (the first
            entry of flat x, whatever D is). A vector of another length than D is refused at the
            first call: padding or cropping it would silently score a different reward.
    """

    def __init__(self, a: Any = None) -> None:
        super().__init__()
        self.register_buffer("a", None if a is None else torch.as_tensor(a, dtype=torch.float32).flatten())

    @classmethod
    def from_arg(cls, arg: str | None) -> "LinearReward":
        return cls(_floats(arg, "linear") if arg else None)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        flat = x.reshape(x.shape[0], -1).float()
        if self.a is None:
            return flat[:, 0]
        _check_length(self.a, x, "linear", "a", "none for r(x) = x₁")
        return flat @ self.a


@register_reward("quadratic", "r(x) = −½‖x − c‖²·scale on flat x; arg: c as comma-separated numbers, one per "
                              "state entry (default: the origin)")
class QuadraticReward(Reward):
    """r(x) = −½ (x − c)ᵀ A (x − c) on flat x [B, D] -> [B], with A = scale·I (or a given PSD
    matrix [D, D]).

    Args:
        c: the centre, D numbers, or ``None`` for the origin of any D.
        A: a PSD matrix [D, D], or ``None`` for scale·I.
        scale: the curvature when ``A`` is not given.
    A ``c`` or ``A`` whose size is not the state's D is refused at the first call (no broadcasting).
    """

    maximum = 0.0

    def __init__(self, c: Any = None, A: Any = None, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("c", None if c is None else torch.as_tensor(c, dtype=torch.float32).flatten())
        self.register_buffer("A", None if A is None else torch.as_tensor(A, dtype=torch.float32))
        self.scale = float(scale)

    @classmethod
    def from_arg(cls, arg: str | None) -> "QuadraticReward":
        return cls(_floats(arg, "quadratic") if arg else None)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        d = x.reshape(x.shape[0], -1).float()
        if self.c is not None:
            _check_length(self.c, x, "quadratic", "c", "none for the origin")
            d = d - self.c
        if self.A is None:
            return -0.5 * self.scale * d.pow(2).sum(1)
        _check_length(self.A, x, "quadratic", "A", "none for scale·I", square=True)
        return -0.5 * torch.einsum("bi,ij,bj->b", d, self.A, d)


def _check_length(v: Tensor, x: Tensor, reward: str, name: str, alternative: str, square: bool = False) -> None:
    """One-line error unless ``v`` has one entry per number of a sample of x [B, *S] (shape
    [D, D] for a square matrix): padding, cropping or broadcasting it would silently score
    another reward."""
    d = math.prod(x.shape[1:])
    if (tuple(v.shape) == (d, d)) if square else (v.numel() == d):
        return
    got = f"shape {tuple(v.shape)}" if square else f"{v.numel()} entr{'y' if v.numel() == 1 else 'ies'}"
    want = f"a [{d}, {d}] matrix" if square else f"exactly {d} numbers"
    raise SoctuneError(f"{reward} reward: {name} has {got} but each sample has {d} numbers "
                       f"(shape {tuple(x.shape[1:])}); give {want}" + (f", or {alternative}" if alternative else ""))


class FunctionReward(Reward):
    """Wraps a plain function r(x [B,*S], cond) -> [B] or r(x) -> [B] (plug-ins).

    Whether ``fn`` takes ``cond`` is read once from its signature (a second positional
    parameter, ``*args``, or a keyword parameter named ``cond``), never by catching a
    ``TypeError``: one raised inside ``fn`` is the user's bug and propagates unchanged.
    """

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.cond_arg = _cond_argument(fn)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        if self.cond_arg == "positional":
            return self.fn(x, cond)
        if self.cond_arg == "keyword":
            return self.fn(x, cond=cond)
        return self.fn(x)


def _cond_argument(fn: Callable[..., Tensor]) -> str:
    """How ``fn`` receives the conditioning: ``"positional"`` (r(x, cond) or r(*args)),
    ``"keyword"`` (r(x, *, cond)) or ``"none"`` (r(x)); a one-line error for any other signature."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    # an nn.Module's __call__ is (*args, **kwargs): what it accepts is its forward's signature
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        raise SoctuneError(f"cannot read the signature of reward function {name}; wrap it in a Python "
                           "function r(x, cond=None) -> [B]") from None
    P = inspect.Parameter
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    if any(p.kind == P.VAR_POSITIONAL for p in params) or len(positional) >= 2:
        mode = "positional"
    elif any(p.kind == P.KEYWORD_ONLY and p.name == "cond" for p in params):
        mode = "keyword"
    else:
        mode = "none"
    # the parameters we fill: x, and cond where the signature takes it
    filled = {p.name for p in positional[: 2 if mode == "positional" else 1]} | ({"cond"} if mode == "keyword" else set())
    missing = [p.name for p in required if p.name not in filled]
    if (not positional and not any(p.kind == P.VAR_POSITIONAL for p in params)) or missing:
        raise SoctuneError(f"reward function {name}{sig} must take the samples x [B, *S] and optionally the "
                           "conditioning: r(x) or r(x, cond) -> [B]")
    return mode


def get_reward(spec: str | Callable[..., Tensor], **options: Any) -> Reward:
    """Build a reward from ``"name[:arg]"``, ``"pkg.module:fn[:arg]"``, a weighted sum of those, or a
    callable.

    Weighted sums (``soctune list rewards`` shows this as the ``sum`` entry)::

        spec   := term ( "+" term )*
        term   := [ WEIGHT "*" ] single
        WEIGHT := a float literal, sign included: 2, 0.5, -0.1, 1e-3, -2.5e+2
        single := name[:arg] | pkg.module:fn[:arg]      (an ordinary single-reward spec)

    e.g. ``aesthetic+0.5*hpsv2:/w/hps``, ``brightness+-0.1*contrast`` (a negative weight is written
    ``+-W*``; ``-`` alone never separates terms), ``2*digit:3`` (a scaled single reward). Spaces
    around ``+`` and ``*`` are allowed. A missing weight is 1.

    A ``+`` separates terms only where what follows starts a term: a weight ``W*`` (any word
    before a ``*`` counts, and must then be a finite number), the name of a registered reward
    (``name`` / ``name:arg``) or an importable plug-in ``pkg.module:attr``. Any other ``+``
    (and a ``+`` in an exponent) stays inside the current term, so numbers (``linear:1e+3,0``)
    and paths such as ``aesthetic:clip=/w/clip,head=/w/sac+logos+ava1-l14-linearMSE.pth`` need
    no quoting. A path in which ``+`` IS followed by such a term start (``/w/a+brightness``)
    cannot be written in a sum spec: pass that reward as an object or as a single spec, e.g.
    ``WeightedSum([(1.0, "aesthetic:/w/a+brightness"), (0.5, "hpsv2:/w/hps")])`` (term strings
    given to :class:`WeightedSum` are never split). ``"sum:SPEC"`` is the same as ``"SPEC"`` but
    always returns a :class:`WeightedSum`. ``options`` (keyword arguments of the reward class)
    apply to single rewards only.
    """
    _load_builtin()
    if callable(spec) and not isinstance(spec, str):
        return spec if isinstance(spec, Reward) else FunctionReward(spec)
    if spec.partition(":")[0].strip() != "sum":
        terms = split_terms(spec)
        if len(terms) > 1 or _LOOSE_WEIGHT.match(terms[0]):
            if options:
                raise SoctuneError(f"reward options {sorted(options)} apply to a single reward, "
                                   f"not to the sum '{spec}'")
            return WeightedSum.parse(spec, terms)
    return _get_single(spec, **options)


def _get_single(spec: str, **options: Any) -> Reward:
    """A single-reward spec ``"name[:arg]"`` / ``"pkg.module:fn[:arg]"`` (never split at ``+``)."""
    _load_builtin()
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


# ------------------------------------------------------------------------------ weighted sums
#: "W*" at the start of a term: a float literal (sign, decimals, exponent), then "*"
_WEIGHT = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*(.*)\Z", re.DOTALL)
#: something meant as "W*" (a word, then "*"), e.g. "nan*" or "x*": starts a term, then fails
_LOOSE_WEIGHT = re.compile(r"\s*([^\s:*/\\,=+]+)\s*\*")
#: a "+" inside a number's exponent ("1e+3") never separates terms
_EXPONENT_PLUS = re.compile(r"(?<=\d[eE])\+(?=\d)")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def split_terms(spec: str) -> list[str]:
    """The top-level terms of a sum spec (see :func:`get_reward`), each stripped of surrounding
    spaces: ``"a+0.5*b:x+y"`` -> ``["a", "0.5*b:x+y"]`` (``y`` starts no term, so it stays in
    ``b``'s argument). A spec without a separating ``+`` is one term."""
    _load_builtin()
    pieces = _EXPONENT_PLUS.sub("\0", spec).split("+")
    terms: list[str] = []
    for piece in pieces:
        piece = piece.replace("\0", "+")
        if terms and not _starts_term(piece):
            terms[-1] += "+" + piece
        else:
            terms.append(piece)
    return [t.strip() for t in terms]


def _starts_term(piece: str) -> bool:
    if _LOOSE_WEIGHT.match(piece):
        return True
    piece = piece.strip()
    name, colon, _ = piece.partition(":")
    name = name.strip()
    if name in REWARDS:
        return True
    return bool(colon) and _DOTTED.fullmatch(name) is not None and _is_module(name)


@register_reward("sum", "weighted sum Σ wᵢ·rᵢ, written W1*SPEC1+W2*SPEC2 (no 'sum:' needed), e.g. "
                        "aesthetic+0.5*hpsv2 or brightness+-0.1*contrast; weights default to 1")
class WeightedSum(Reward):
    """r(x, c) = Σᵢ wᵢ·rᵢ(x, c), each term evaluated in float32 (float64 stays float64) and
    brought to x's device; DRaFT's reward mixing. The terms are submodules, so ``.to(device)``
    moves them all. ``maximum`` = Σ wᵢ·maxᵢ when every term with wᵢ ≠ 0 has a finite ``maximum``
    and wᵢ > 0 (an upper bound of r then), else ``None``.

    Args:
        terms: (weight, reward) pairs; a reward is a :class:`Reward`, a function r(x, cond), or a
            single-reward spec string (never split at ``+``: the way to use a path that a sum
            spec would split).
        names: labels of the terms (default: the specs, or the classes' names).
    """

    def __init__(self, terms: Sequence[tuple[float, Any]], names: Sequence[str] | None = None) -> None:
        super().__init__()
        if not terms:
            raise SoctuneError("a reward sum needs at least one term, e.g. aesthetic+0.5*hpsv2")
        weights, rewards, labels = [], [], []
        for i, (w, r) in enumerate(terms):
            w = float(w)
            if not math.isfinite(w):
                raise SoctuneError(f"reward sum: term {i + 1} has a non-finite weight {w}")
            label = names[i] if names is not None else (r if isinstance(r, str) else type(r).__name__)
            weights.append(w)
            rewards.append(_get_single(r) if isinstance(r, str) else get_reward(r))
            labels.append(str(label))
        self.weights: list[float] = weights
        self.terms = nn.ModuleList(rewards)
        self.names: list[str] = labels
        maxima = [getattr(r, "maximum", None) for r in rewards]
        bounded = all(w == 0 or (w > 0 and m is not None and math.isfinite(float(m))) for w, m in zip(weights, maxima))
        self.maximum = float(sum(w * float(m) for w, m in zip(weights, maxima) if w != 0)) if bounded else None

    @classmethod
    def parse(cls, spec: str, terms: Sequence[str] | None = None) -> "WeightedSum":
        """Build from a sum spec (see :func:`get_reward`); a bad term raises a one-line
        :class:`SoctuneError` naming it."""
        pairs, names = [], []
        for term in terms if terms is not None else split_terms(spec):
            m = _WEIGHT.match(term)
            loose = _LOOSE_WEIGHT.match(term)
            if m is None and loose is not None:
                raise SoctuneError(f"reward sum '{spec}': term '{term}' has a bad weight '{loose.group(1)}'; "
                                   "a weight is a finite number, e.g. 0.5*hpsv2 or -0.1*contrast")
            weight, single = (float(m.group(1)), m.group(2).strip()) if m else (1.0, term.strip())
            if not single:
                raise SoctuneError(f"reward sum '{spec}': term '{term}' names no reward; write terms as "
                                   "[WEIGHT*]NAME[:ARG] joined by '+', e.g. aesthetic+0.5*hpsv2")
            try:
                reward = _get_single(single)
            except SoctuneError as exc:
                raise SoctuneError(f"reward sum '{spec}': bad term '{term}': {exc}") from None
            pairs.append((weight, reward))
            names.append(single)
        return cls(pairs, names)

    @classmethod
    def from_arg(cls, arg: str | None) -> "WeightedSum":
        if not arg or not arg.strip():
            raise SoctuneError("reward 'sum' needs terms: sum:W1*SPEC1+W2*SPEC2 (or just W1*SPEC1+W2*SPEC2), "
                               "e.g. aesthetic+0.5*hpsv2")
        return cls.parse(arg)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        total: Tensor | None = None
        for w, reward in zip(self.weights, self.terms):
            r = reward(x, cond)
            r = r.to(device=x.device, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)
            total = w * r if total is None else total + w * r
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{n}" for w, n in zip(self.weights, self.names))


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
