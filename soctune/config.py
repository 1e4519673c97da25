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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .registry import SoctuneError

DEVICES_HELP = "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps"
PRECISIONS = ("fp32", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb")
FROZEN_DTYPES = ("auto", "fp32", "bf16", "fp16")


def _opt(default: Any, help: str, check: Any = None, typ: type | None = None) -> Any:
    """A config field: its default, a one-line help and an optional range check."""
    return field(default=default, metadata={"help": help, "check": check, "type": typ})


def _valid_device(v: str) -> bool:
    return v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())


@dataclass
class ModelConfig:
    """What to fine-tune: a diffusers folder (or the shipped digits model) and its adapter."""

    path: Optional[str] = _opt(None, "diffusers folder or hub id; default: the shipped digits model for the process",
                               typ=str)
    lora_rank: int = _opt(8, "LoRA rank", lambda v: v >= 1)
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha (default = rank)", lambda v: v > 0, typ=float)
    target_modules: Optional[list] = _opt(None, "LoRA target module names (default: per architecture)", typ=list)
    full_finetune: bool = _opt(False, "train all weights instead of LoRA")
    guidance_scale: float = _opt(1.0, "classifier-free guidance scale", lambda v: v >= 0)
    prompts: Optional[list] = _opt(None, "prompts / class labels to condition on", typ=list)
    prompt_file: Optional[str] = _opt(None, "prompt set: a .txt (one per line) or .jsonl (\"prompt\" per line) file, "
                                            "or a shipped set (soctune list prompts)", typ=str)
    negative_prompt: Optional[str] = _opt(None, "the unconditional branch of classifier-free guidance (default: "
                                                "the empty prompt)", typ=str)
    gradient_checkpointing: str = _opt("auto", "recompute network (and VAE decoder) blocks in backward: auto (on for "
                                               "latent models — Stable Diffusion class —, off for small pixel models), "
                                               "true, false",
                                       lambda v: v.lower() in ("auto", "true", "false"))
    vae_tiling: bool = _opt(False, "decode large images in tiles (slicing per sample is always on)")
    frozen_dtype: str = _opt("auto", "dtype of the frozen base weights: auto = the training precision's (bf16/fp16 "
                                     "halve their memory; LoRA stays float32), or fp32 / bf16 / fp16",
                             lambda v: v in FROZEN_DTYPES)


#: learning-rate schedules over ``train.iters`` (:func:`soctune.trainer.lr_at`)
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Optimisation and placement settings shared by every solver — the ONE set of defaults of
    the CLI, the YAML presets and the Python API (:func:`soctune.finetune`).

    ``batch_size`` is the global batch B: with W processes each rolls out B/W trajectories, and
    with ``grad_accum`` = A each process does so in A micro-batches whose gradients are summed
    into one update (same trajectories and update as one batch of B, less memory).
    """

    iters: int = _opt(40, "training iterations", lambda v: v >= 1)
    batch_size: int = _opt(32, "trajectories per iteration (global, over all processes)", lambda v: v >= 1)
    lr: float = _opt(3e-4, "learning rate (a model folder may declare its own in soctune.json)", lambda v: 0 < v < math.inf)
    weight_decay: float = _opt(0.0, "AdamW weight decay", lambda v: 0 <= v < math.inf)
    lr_schedule: str = _opt("constant", "constant, or cosine: lr·½(1 + cos(π·i/iters)) at iteration i (decays to 0 at the end)",
                            lambda v: v in LR_SCHEDULES)
    grad_clip: float = _opt(1.0, "max gradient norm (0 = off)", lambda v: 0 <= v < math.inf)
    seed: int = _opt(0, "random seed")
    max_nonfinite: int = _opt(5, "consecutive non-finite updates (each skipped) before the run stops with a checkpoint",
                              lambda v: v >= 1)
    checkpoint_every: int = _opt(10, "iterations between checkpoints (0 = only at the end)", lambda v: v >= 0)
    grad_accum: int = _opt(1, "micro-batches per update (gradient accumulation; divides the per-process batch)",
                           lambda v: v >= 1)
    device: str = _opt("auto", DEVICES_HELP, _valid_device)
    precision: str = _opt("fp32", "fp32, bf16 or fp16 (network forwards under autocast; trainable weights, optimiser "
                                  "state, adjoints and rewards stay float32)", lambda v: v in PRECISIONS)
    log: str = _opt("none", "experiment tracker: none, tensorboard or wandb (metrics.jsonl is always written)",
                    lambda v: v in TRACKERS)

    def validate(self) -> None:
        """Raise a one-line :class:`SoctuneError` for an out-of-range field."""
        _check_section("train", asdict(self), TrainConfig)


@dataclass
class EvalConfig:
    """The before/after evaluation a run ends with."""

    n_samples: int = _opt(256, "samples for before/after metrics", lambda v: v >= 2)
    seed: int = _opt(1234, "seed of the evaluation samples")
    grid: int = _opt(64, "samples shown in each PNG grid", lambda v: v >= 1)
    prompt_grids: int = _opt(8, "text models: before/after pictures for this many prompts of the set (prompts/NN.png)",
                             lambda v: v >= 0)


#: the closed sections, each a dataclass (types, defaults, checks and help in one place)
SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _schema(cls: type) -> dict[str, tuple[type, Any, Any, str]]:
    out = {}
    for f in fields(cls):
        typ = f.metadata.get("type") or f.type
        typ = {"int": int, "float": float, "bool": bool, "str": str, "list": list}.get(typ, typ) if isinstance(typ, str) else typ
        out[f.name] = (typ, f.default, f.metadata.get("check"), f.metadata.get("help", ""))
    return out


#: closed sections: key -> (type, default, check or None, help), derived from the dataclasses
SCHEMA: dict[str, dict[str, tuple[type, Any, Any, str]]] = {sec: _schema(cls) for sec, cls in SECTIONS.items()}


def _check_section(section: str, values: dict[str, Any], cls: type) -> dict[str, Any]:
    keys = SCHEMA[section]
    bad = set(values) - set(keys)
    if bad:
        raise SoctuneError(f"unknown key(s) {sorted(bad)} in '{section}'; valid: {', '.join(keys)}")
    return {k: _coerce(section, k, values.get(k, spec[1]), spec[0], spec[2], spec[3]) for k, spec in keys.items()}


OPEN_SECTIONS = ("process", "solver")
ALIASES = {"solver.lambda": "solver.reward_scale"}


def defaults() -> dict[str, Any]:
    cfg: dict[str, Any] = {sec: {k: v[1] for k, v in keys.items()} for sec, keys in SCHEMA.items()}
    cfg["process"] = {"name": "fm-memoryless", "num_steps": 25}
    cfg["solver"] = {"name": "adjoint-matching"}
    cfg["reward"] = "digit:3"
    return cfg


def _presets_dir() -> Path:
    """Where the shipped YAML presets are: the repository's top-level ``configs/`` holds them,
    and an installed wheel carries them as ``soctune/configs/`` (pyproject maps the package
    ``soctune.configs`` onto that folder). A source checkout or an editable install has no
    ``soctune/configs/``, so there the folder next to the package is the one."""
    packaged = Path(__file__).parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "configs"


#: YAML presets shipped with the package (``--config NAME`` or a path)
PRESETS_DIR = _presets_dir()


def list_presets() -> dict[str, str]:
    """Shipped presets: name -> the first line of the file's leading comment."""
    out: dict[str, str] = {}
    for f in sorted(PRESETS_DIR.glob("*.yaml")):
        first = f.read_text().splitlines()[0] if f.read_text() else ""
        out[f.stem] = first.lstrip("# ").strip()
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file, or a shipped preset by name (``paper-adjoint-matching``)."""
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


def resolve(config: str | Path | dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
            sets: list[str] | tuple[str, ...] = (), extra_layers: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The validated run config: defaults ← the model folder's declared defaults
    (:func:`model_defaults`) ← ``config`` (a file or preset) ← ``flags`` ← ``sets``.

    flags: ``{"section.key": value}`` (None = not given; ``"reward"`` has no section).
    The defaults are the same for every (process, solver) pair: the solvers' own constructor
    defaults (measured on every pair, benchmarks/pairs.py) and :class:`TrainConfig`; a model folder
    may declare its own training defaults (the shipped digits models: their learning rate and its
    cosine decay)."""
    layers: list[dict[str, Any]] = []
    if config is not None:
        layers.append(copy.deepcopy(config) if isinstance(config, dict) else load_yaml(config))
    for key, val in (flags or {}).items():
        if val is None:
            continue
        sec, _, name = key.partition(".")
        layers.append({sec: val} if not name else {sec: {name: val}})
    layers.extend(layer for layer in extra_layers if any(layer.values()))
    layers.extend(parse_set(item) for item in sets)
    cfg = defaults()
    for layer in layers:
        cfg = merge(cfg, layer)
    declared = model_defaults(cfg)
    if declared:  # the model's own defaults sit under everything the user gave
        cfg = merge(defaults(), declared)
        for layer in layers:
            cfg = merge(cfg, layer)
    return validate(cfg)


#: sections a model folder's ``soctune.json`` may give defaults for (hyper-parameters that belong to
#: the model, e.g. a learning rate for its adapter's scale)
MODEL_DEFAULT_SECTIONS = ("train", "eval")


def model_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """The defaults a model folder declares in its ``soctune.json`` next to its evaluator, e.g.
    ``{"evaluator": "digits", "train": {"lr": 0.01}}``: a layer between soctune's defaults and
    anything the user gives (preset, config file, flags, ``--set``). Read as JSON, never executed.
    Only :data:`MODEL_DEFAULT_SECTIONS` and their known keys are accepted (one-line error naming the
    file). A model that cannot be found here gives no layer: loading it reports the problem."""
    import json

    from .evaluation import EVALUATOR_FILE

    path = cfg["model"].get("path")
    try:
        if not path:
            from .run import default_model_for

            path = default_model_for(str(cfg["process"].get("name")))
        from .models.diffusers_model import resolve_model_path

        folder = resolve_model_path(path)
    except SoctuneError:
        return {}
    file = Path(folder) / EVALUATOR_FILE
    if not file.is_file():
        return {}
    try:
        decl = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SoctuneError(f"{file} is not valid JSON ({exc})") from None
    out: dict[str, Any] = {}
    for sec in MODEL_DEFAULT_SECTIONS:
        values = decl.get(sec) if isinstance(decl, dict) else None
        if values is None:
            continue
        if not isinstance(values, dict) or set(values) - set(SCHEMA[sec]):
            raise SoctuneError(f"{file}: '{sec}' must map keys of the {sec} section "
                               f"({', '.join(SCHEMA[sec])}) to values")
        out[sec] = values
    return out


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


def _coerce(section: str, key: str, value: Any, typ: type, check: Any, help: str = "") -> Any:
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
        raise SoctuneError(f"{section}.{key}={value!r} is out of range" + (f"; expected: {help}" if help else ""))
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
    for sec, cls in SECTIONS.items():
        out[sec] = _check_section(sec, dict(cfg.get(sec) or {}), cls)
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
