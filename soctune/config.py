"""Run configuration: defaults ← YAML file ← command-line flags ← ``--set key=value``.

A run config is a nested dict with fixed sections. ``train``/``eval``/``model`` keys are a
closed schema (typed, range-checked); ``process`` and ``solver`` take ``name`` plus the
keyword options of the chosen class, validated against its constructor signature, so
``--set solver.reward_scale=2`` (alias ``solver.lambda``) reaches the solver unchanged.
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Any

import yaml

from .registry import SoctuneError

#: closed sections: key -> (type, default, check or None, help)
SCHEMA: dict[str, dict[str, tuple[type, Any, Any, str]]] = {
    "model": {
        "path": (str, None, None, "diffusers folder or hub id; default: the shipped digits model for the process"),
        "lora_rank": (int, 8, lambda v: v >= 1, "LoRA rank"),
        "lora_alpha": (float, None, lambda v: v > 0, "LoRA alpha (default = rank)"),
        "target_modules": (list, None, None, "LoRA target module names (default: per architecture)"),
        "full_finetune": (bool, False, None, "train all weights instead of LoRA"),
        "guidance_scale": (float, 1.0, lambda v: v >= 0, "classifier-free guidance scale"),
        "prompts": (list, None, None, "prompts / class labels to condition on"),
    },
    "train": {
        "iters": (int, 40, lambda v: v >= 1, "training iterations"),
        "batch_size": (int, 32, lambda v: v >= 1, "trajectories per iteration"),
        "lr": (float, 1e-3, lambda v: 0 < v < math.inf, "learning rate"),
        "weight_decay": (float, 0.0, lambda v: 0 <= v < math.inf, "AdamW weight decay"),
        "grad_clip": (float, 1.0, lambda v: 0 <= v < math.inf, "max gradient norm (0 = off)"),
        "seed": (int, 0, None, "random seed"),
        "max_nonfinite": (int, 5, lambda v: v >= 1,
                          "consecutive non-finite updates (each skipped) before the run stops with a checkpoint"),
        "checkpoint_every": (int, 10, lambda v: v >= 0, "iterations between checkpoints (0 = only at the end)"),
    },
    "eval": {
        "n_samples": (int, 256, lambda v: v >= 2, "samples for before/after metrics"),
        "seed": (int, 1234, None, "seed of the evaluation samples"),
        "grid": (int, 64, lambda v: v >= 1, "samples shown in each PNG grid"),
    },
}
OPEN_SECTIONS = ("process", "solver")
ALIASES = {"solver.lambda": "solver.reward_scale"}


def defaults() -> dict[str, Any]:
    cfg: dict[str, Any] = {sec: {k: v[1] for k, v in keys.items()} for sec, keys in SCHEMA.items()}
    cfg["process"] = {"name": "fm-memoryless", "num_steps": 25}
    cfg["solver"] = {"name": "adjoint-matching"}
    cfg["reward"] = "digit:3"
    return cfg


#: YAML presets shipped with the package (``--config NAME`` or a path)
PRESETS_DIR = Path(__file__).parent / "configs"


def list_presets() -> dict[str, str]:
    """Shipped presets: name -> the first line of the file's leading comment."""
    out: dict[str, str] = {}
    for f in sorted(PRESETS_DIR.glob("*.yaml")):
        first = f.read_text().splitlines()[0] if f.read_text() else ""
        out[f.stem] = first.lstrip("# ").strip()
    return out


def preset_for(process: str, solver: str) -> str | None:
    """The recommended digits preset of a (process, solver) pair, ``digits-{process}-{solver}``,
    if one is shipped (the hyper-parameters the headline commands use)."""
    name = f"digits-{process}-{solver}"
    return name if (PRESETS_DIR / f"{name}.yaml").is_file() else None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file, or a shipped preset by name (``digits-ddpm-nabla-db``)."""
    p = Path(path)
    if not p.is_file() and (PRESETS_DIR / f"{path}.yaml").is_file():
        p = PRESETS_DIR / f"{path}.yaml"
    if not p.is_file():
        raise SoctuneError(f"config file '{path}' does not exist; pass a YAML file or a preset name "
                           f"({', '.join(list_presets())})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SoctuneError(f"config file '{path}' is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise SoctuneError(f"config file '{path}' must hold a mapping of sections (model, process, solver, …)")
    return data


def resolve(config: str | Path | None = None, flags: dict[str, Any] | None = None,
            sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The validated run config: defaults ← preset ← ``config`` ← ``flags`` ← ``sets``.

    flags: ``{"section.key": value}`` (None = not given; ``"reward"`` has no section).
    Without a ``config`` file and with the shipped default model, the recommended preset of
    the chosen (process, solver) pair (:func:`preset_for`) supplies the hyper-parameters, so
    ``soctune finetune --process ddpm --solver nabla-db`` runs with settings that work."""
    layers: list[dict[str, Any]] = []
    if config is not None:
        layers.append(load_yaml(config))
    for key, val in (flags or {}).items():
        if val is None:
            continue
        sec, _, name = key.partition(".")
        layers.append({sec: val} if not name else {sec: {name: val}})
    layers.extend(parse_set(item) for item in sets)
    cfg = defaults()
    for layer in layers:
        cfg = merge(cfg, layer)
    if config is None and not cfg["model"].get("path"):
        preset = preset_for(str(cfg["process"].get("name")), str(cfg["solver"].get("name")))
        if preset is not None:
            cfg = merge(defaults(), load_yaml(preset))
            for layer in layers:
                cfg = merge(cfg, layer)
    return validate(cfg)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``; a changed process/solver name drops the
    old name's options."""
    out = copy.deepcopy(base)
    for key, val in update.items():
        if key in OPEN_SECTIONS and isinstance(val, dict) and "name" in val and val["name"] != out.get(key, {}).get("name"):
            out[key] = {}
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def parse_set(item: str) -> dict[str, Any]:
    """``"solver.lambda=2"`` -> {"solver": {"reward_scale": 2}} (values parsed as YAML)."""
    if "=" not in item:
        raise SoctuneError(f"--set expects key=value (e.g. solver.lambda=2), got '{item}'")
    key, _, raw = item.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    if len(parts) == 1:
        if key != "reward":
            raise SoctuneError(f"--set key '{key}' needs a section, e.g. train.{key}; sections: "
                               f"{', '.join([*SCHEMA, *OPEN_SECTIONS, 'reward'])}")
        return {"reward": value}
    out: dict[str, Any] = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _coerce(section: str, key: str, value: Any, typ: type, check: Any) -> Any:
    if value is None:
        return None
    try:
        if typ is bool and not isinstance(value, bool):
            raise ValueError
        if typ is list:
            value = list(value) if isinstance(value, (list, tuple)) else [value]
        elif typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        else:
            value = typ(value)
    except (TypeError, ValueError):
        raise SoctuneError(f"{section}.{key} must be a {typ.__name__}, got {value!r}") from None
    if check is not None and not check(value):
        raise SoctuneError(f"{section}.{key}={value!r} is out of range")
    return value


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Type- and range-check the closed sections, check process/solver options against the
    chosen classes' constructors. Returns the normalised config."""
    from .rewards.base import REWARDS  # noqa: F401
    from .sde.base import PROCESSES, _load_builtin as _lp
    from .solvers.base import SOLVERS, _load_builtin as _ls

    _lp()
    _ls()
    known = {*SCHEMA, *OPEN_SECTIONS, "reward"}
    unknown = set(cfg) - known
    if unknown:
        raise SoctuneError(f"unknown config section(s) {sorted(unknown)}; valid: {', '.join(sorted(known))}")
    out: dict[str, Any] = {"reward": cfg.get("reward")}
    for sec, keys in SCHEMA.items():
        given = cfg.get(sec) or {}
        bad = set(given) - set(keys)
        if bad:
            raise SoctuneError(f"unknown key(s) {sorted(bad)} in '{sec}'; valid: {', '.join(keys)}")
        out[sec] = {k: _coerce(sec, k, given.get(k, spec[1]), spec[0], spec[2]) for k, spec in keys.items()}
    for sec, registry in (("process", PROCESSES), ("solver", SOLVERS)):
        given = dict(cfg.get(sec) or {})
        name = given.get("name")
        if not name:
            raise SoctuneError(f"no {sec} name given; choose one of: {', '.join(registry.names())}")
        cls = registry.get(str(name))
        check_options(sec, str(name), cls, {k: v for k, v in given.items() if k != "name"})
        out[sec] = given
    if not isinstance(out["reward"], str) or not out["reward"]:
        raise SoctuneError("reward must be a spec like 'digit:3' (see `soctune list rewards`)")
    return out


def check_options(section: str, name: str, cls: type, options: dict[str, Any]) -> None:
    """One-line error for options the class's constructor does not take."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in ("self",) and params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise SoctuneError(f"unknown option(s) {bad} for {section} '{name}'; valid: {', '.join(valid)}")


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
