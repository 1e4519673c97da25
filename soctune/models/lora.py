"""LoRA adapters on diffusers networks through peft, in files diffusers pipelines load.

The fine-tuned model is the pretrained network with low-rank adapters: a target layer
y = W x becomes y = W x + w·(α/r)·B A x with A [r, d_in], B [d_out, r] (B = 0 at init, so
the adapted model starts exactly at the base) and a per-adapter weight w (1 by default).
The base model is the same network with the adapters switched off (:func:`adapters_disabled`);
no second copy of the weights exists.

Files: :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` with the keys and metadata
of the matching pipeline's ``save_lora_weights`` (prefix ``unet.`` or ``transformer.``, the peft
LoraConfig as metadata so rank/alpha survive), so ``pipe.load_lora_weights(folder)`` of that
diffusers pipeline loads it. :func:`load_lora` reads such files (and other diffusers-format
LoRAs) back as a named adapter; :func:`set_adapter_weights` mixes several adapters, e.g. DRaFT's
interpolation w ∈ [0, 1] between base (0) and fine-tuned (1), or composition of two LoRAs.
"""

from __future__ import annotations

import inspect
import json
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from ..registry import SoctuneError

#: file name diffusers' ``save_lora_weights`` / ``load_lora_weights`` use by default
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: adapter name of the adapter soctune trains
TRAIN_ADAPTER = "soctune"

# Candidate module-name suffixes per network family (peft matches a name equal to or ending
# in ".<suffix>"); only the ones present in the network are used. Attention projections and
# feed-forward layers as in the DRaFT/AlignProp SD fine-tuning and diffusers' SD3/Flux LoRA
# scripts; resnet convolutions + time projection for attention-free pixel UNets.
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_JOINT_ATTENTION = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
_FLUX_SINGLE = ["proj_mlp", "proj_out"]
_RESNET = ["conv1", "conv2", "time_emb_proj"]

DEFAULT_TARGETS: dict[str, list[str]] = {
    "UNet2DConditionModel": _ATTENTION + _FEED_FORWARD,
    "SD3Transformer2DModel": _ATTENTION + _JOINT_ATTENTION + _FEED_FORWARD,
    "FluxTransformer2DModel": _ATTENTION + _JOINT_ATTENTION + _FEED_FORWARD + _FLUX_SINGLE,
    "UNet2DModel": _RESNET,
}


def _network_of(model: Any) -> nn.Module:
    """The diffusers network inside a LoadedModel / DiffusersDenoiser / CFG wrapper / network."""
    for _ in range(4):
        if hasattr(model, "network") and isinstance(getattr(model, "network"), nn.Module):
            return model.network
        if hasattr(model, "denoiser"):
            model = model.denoiser
        elif hasattr(model, "model") and isinstance(getattr(model, "model"), nn.Module):
            model = model.model
        else:
            break
    if isinstance(model, nn.Module):
        return model
    raise SoctuneError(f"expected a diffusers network or a soctune model, got {type(model).__name__}")


def _pipeline_class_of(model: Any) -> str | None:
    return getattr(model, "pipeline_class", None) or getattr(getattr(model, "denoiser", None), "pipeline_class", None)


def default_target_modules(network: nn.Module) -> list[str]:
    """The default LoRA targets of ``network`` (see :data:`DEFAULT_TARGETS`), restricted to the
    suffixes that occur in it. Unknown families: attention projections, else resnet layers."""
    names = [n for n, _ in network.named_modules()]
    candidates = DEFAULT_TARGETS.get(type(network).__name__, _ATTENTION + _FEED_FORWARD + _RESNET)
    present = [c for c in candidates if any(n == c or n.endswith("." + c) for n in names)]
    if not present:
        raise SoctuneError(
            f"none of the default LoRA targets {candidates} exist in {type(network).__name__}; "
            "pass target_modules=[...] with module names of this network")
    return present


def adapter_names(model: Any) -> list[str]:
    """Names of the adapters present in the network (trained and loaded)."""
    return list(getattr(_network_of(model), "peft_config", {}) or {})


def _tuner_layers(network: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in network.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_params(network: nn.Module, name: str) -> list[nn.Parameter]:
    """Parameters of one adapter: peft names them ``…lora_A.<name>.weight`` etc."""
    pattern = re.compile(rf"\.lora_\w+?\.{re.escape(name)}\.")
    return [p for n, p in network.named_parameters() if pattern.search(n)]


def _frozen_set(network: nn.Module) -> set[str]:
    if not hasattr(network, "_soctune_frozen_adapters"):
        network._soctune_frozen_adapters = set()  # type: ignore[attr-defined]
    return network._soctune_frozen_adapters  # type: ignore[attr-defined]


def _apply_trainability(network: nn.Module) -> None:
    """peft marks every *active* adapter trainable whenever adapters are (re)activated; undo
    that for adapters loaded as frozen (a composed reference LoRA must not be trained)."""
    frozen = _frozen_set(network)
    for name in adapter_names(network):
        for p in _adapter_params(network, name):
            p.requires_grad_(name not in frozen)


def add_lora(model: Any, *, rank: int = 8, alpha: float | None = None, target_modules: Sequence[str] | None = None,
             adapter_name: str = TRAIN_ADAPTER, dropout: float = 0.0) -> str:
    """Inject a trainable LoRA adapter (B = 0 at init: the model is unchanged) and freeze the
    rest of the network.

    Args:
        model: a diffusers network or a soctune model holding one.
        rank: r ≥ 1. alpha: α (default r, i.e. scale α/r = 1).
        target_modules: module-name suffixes; default :func:`default_target_modules`.
    Returns:
        the adapter name.
    """
    from peft import LoraConfig

    network = _network_of(model)
    if int(rank) < 1:
        raise SoctuneError(f"lora_rank must be a positive integer, got {rank}")
    if adapter_name in adapter_names(network):
        raise SoctuneError(f"adapter '{adapter_name}' already exists; pick another adapter_name")
    targets = list(target_modules) if target_modules else default_target_modules(network)
    names = [n for n, _ in network.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if len(missing) == len(targets):
        raise SoctuneError(f"no module of {type(network).__name__} matches target_modules {targets}; "
                           f"examples of module names: {', '.join(names[1:6])}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=targets, lora_dropout=float(dropout), init_lora_weights=True)
    network.requires_grad_(False)
    _inject(config, network, adapter_name)
    if getattr(network, "_hf_peft_config_loaded", None) is False:
        network._hf_peft_config_loaded = True  # lets diffusers' adapter methods see the adapter
    # keep adapters in float32 even on a half-precision network: tiny LoRA updates vanish in fp16
    for p in _adapter_params(network, adapter_name):
        p.data = p.data.float()
    active = _active_adapters(network)
    names_now = [*active, adapter_name] if adapter_name not in active else active
    set_adapter_weights(network, {n: _current_weight(network, n) if n != adapter_name else 1.0 for n in names_now})
    return adapter_name


def _inject(config: Any, network: nn.Module, name: str) -> None:
    import warnings

    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # peft warns that a second adapter makes "multiple adapters": intended
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
        inject_adapter_in_model(config, network, name)


def lora_parameters(model: Any, adapter_name: str = TRAIN_ADAPTER) -> list[nn.Parameter]:
    """The parameters of one adapter (what the optimiser updates)."""
    return _adapter_params(_network_of(model), adapter_name)


def _active_adapters(network: nn.Module) -> list[str]:
    for m in _tuner_layers(network):
        act = m.active_adapters
        return list(act) if not isinstance(act, str) else [act]
    return []


def _current_weight(network: nn.Module, name: str) -> float:
    return float(getattr(network, "_soctune_adapter_weights", {}).get(name, 1.0))


def set_adapter_weights(model: Any, weights: dict[str, float]) -> None:
    """Activate exactly the adapters in ``weights`` with per-adapter weights w:
    y = W x + Σ_a w_a (α_a/r_a) B_a A_a x.

    ``{"soctune": 0.5}`` interpolates half-way between base and fine-tuned (DRaFT's LoRA
    scaling), ``{"soctune": 0}`` is exactly the base model, ``{"a": 1, "b": 1}`` composes two.
    """
    network = _network_of(model)
    known = adapter_names(network)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise SoctuneError(f"unknown adapter(s) {unknown}; loaded adapters: {known or 'none'}")
    if not weights:
        raise SoctuneError("set_adapter_weights needs at least one adapter; use `with model.base():` for none")
    names, ws = list(weights), [float(w) for w in weights.values()]
    if hasattr(network, "set_adapters"):
        network.set_adapters(names, ws)
    else:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(network, names, ws)
    network._soctune_adapter_weights = dict(zip(names, ws))  # type: ignore[attr-defined]
    _apply_trainability(network)


def adapter_weights(model: Any) -> dict[str, float]:
    """The active adapters and their weights."""
    network = _network_of(model)
    return {n: _current_weight(network, n) for n in _active_adapters(network)}


def adapters_disabled(model: Any) -> "_AdapterState":
    """Context in which every adapter is off: the network computes the pretrained model.

    Uses peft's per-layer switch (no copy); requires_grad flags are restored on exit because
    peft's switch also toggles them. Nothing to do (no adapters, or already off): a no-op."""
    return _AdapterState(_network_of(model), disabled=True)


@contextmanager
def _adapters_switched(network: nn.Module, enabled: bool) -> Iterator[None]:
    """Every adapter layer switched on/off for the context, then back. requires_grad flags are
    restored on exit because peft's switch also toggles them."""
    layers = _tuner_layers(network)
    flags = [(p, p.requires_grad) for n, p in network.named_parameters() if ".lora_" in n]
    for m in layers:
        m.enable_adapters(enabled)
    network._soctune_disabled = not enabled  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(not enabled)
        for p, f in flags:
            p.requires_grad_(f)
        network._soctune_disabled = enabled  # type: ignore[attr-defined]


def checkpointing_function(network: nn.Module) -> Callable[..., Any]:
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` that
    recomputes each block in the adapter state of its forward.

    Solvers evaluate the base (``with model.base():``, adapters off) and may backpropagate after
    leaving that context (the lean adjoint's VJPs, ∇-DB's reverse scores); plain checkpointing
    would recompute those blocks with the adapters on and fail torch's metadata check (or, with
    matching shapes, give a wrong gradient)."""
    from torch.utils.checkpoint import checkpoint

    def run(module: nn.Module, *args: Any) -> Any:
        disabled = bool(getattr(network, "_soctune_disabled", False))

        def context_fn() -> tuple[Any, Any]:
            return nullcontext(), _AdapterState(network, disabled)

        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)

    return run


class _AdapterState:
    """Re-enterable context: the network's adapters in a given on/off state (a graph kept with
    ``retain_graph`` may be recomputed more than once with the same context)."""

    def __init__(self, network: nn.Module, disabled: bool) -> None:
        self.network, self.disabled = network, disabled
        self._stack: list[Any] = []

    def __enter__(self) -> None:
        now = bool(getattr(self.network, "_soctune_disabled", False))
        ctx: Any = nullcontext()
        if now != self.disabled and _tuner_layers(self.network):
            ctx = _adapters_switched(self.network, enabled=not self.disabled)
        ctx.__enter__()
        self._stack.append(ctx)

    def __exit__(self, *exc: Any) -> None:
        self._stack.pop().__exit__(*exc)


# ------------------------------------------------------------------------------- file format


def _saver_class(network: nn.Module, pipeline_class: str | None) -> Any:
    """The diffusers pipeline class whose ``save_lora_weights``/``load_lora_weights`` format
    matches the network: the model's own pipeline when it has a LoRA loader, else by family."""
    import diffusers

    if pipeline_class:
        cls = getattr(diffusers, pipeline_class, None)
        if cls is not None and hasattr(cls, "save_lora_weights"):
            return cls
    kind = type(network).__name__
    if kind == "UNet2DConditionModel":
        xl = getattr(network.config, "addition_embed_type", None) == "text_time"
        return diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    if kind == "FluxTransformer2DModel":
        return diffusers.FluxPipeline
    if kind == "SD3Transformer2DModel":
        return diffusers.StableDiffusion3Pipeline
    if "UNet" in kind:
        return diffusers.StableDiffusionPipeline  # "unet." prefix; loaded back by load_lora
    return diffusers.StableDiffusion3Pipeline  # "transformer." prefix


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, set):
            v = sorted(v)
        elif isinstance(v, dict):
            v = _json_safe(v)
        out[k] = v
    return out


def save_lora(model: Any, folder: str | Path, adapter_name: str = TRAIN_ADAPTER,
              pipeline_class: str | None = None) -> Path:
    """Write one adapter as ``folder/pytorch_lora_weights.safetensors`` in the diffusers LoRA
    format (the matching pipeline's ``save_lora_weights``; peft LoraConfig as metadata).

    Returns the file path. ``StableDiffusionPipeline.load_lora_weights(folder)`` (or the SDXL /
    SD3 / Flux pipeline of the model) loads it; :func:`load_lora` does for any network.
    """
    from peft.utils import get_peft_model_state_dict

    network = _network_of(model)
    if adapter_name not in adapter_names(network):
        raise SoctuneError(f"no adapter '{adapter_name}' to save; loaded adapters: {adapter_names(network) or 'none'}")
    state = get_peft_model_state_dict(network, adapter_name=adapter_name)
    # a DDP / torch.compile wrapper prefixes names; such keys would load as silent no-ops
    state = {_strip_wrappers(k): v.detach().to("cpu").contiguous() for k, v in state.items()}
    cls = _saver_class(network, pipeline_class or _pipeline_class_of(model))
    prefix = cls._lora_loadable_modules[0]  # "unet" or "transformer"
    # Keys stay in peft's lora_A/lora_B naming (what diffusers' SD3/Flux LoRA scripts write).
    # convert_state_dict_to_diffusers renames only attention layers to lora.down/lora.up; with
    # other targets (resnet convs, feed-forward, proj_in) the file mixes both namings, and
    # load_lora_weights — which picks the conversion from the FIRST key — then drops part of
    # the adapter silently (measured: proj_in + to_q targets, UNet output off by 1e-2).
    metadata = _json_safe(network.peft_config[adapter_name].to_dict())
    kwargs: dict[str, Any] = {f"{prefix}_lora_layers": state}
    if f"{prefix}_lora_adapter_metadata" in inspect.signature(cls.save_lora_weights).parameters:
        kwargs[f"{prefix}_lora_adapter_metadata"] = metadata
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(out), safe_serialization=True, **kwargs)
    return out / LORA_WEIGHT_NAME


def _strip_wrappers(key: str) -> str:
    for p in ("module.", "_orig_mod."):
        while key.startswith(p):
            key = key[len(p):]
    return key


def _lora_file(folder: str | Path, weight_name: str | None) -> Path:
    path = Path(folder)
    if path.is_file():
        return path
    if not path.exists():
        raise SoctuneError(f"LoRA path '{folder}' does not exist; pass the folder written by save_lora")
    if weight_name:
        cand = path / weight_name
    else:
        files = sorted(path.glob("*.safetensors"))
        cand = path / LORA_WEIGHT_NAME
        if not cand.is_file() and files:
            cand = files[0]
    if not cand.is_file():
        raise SoctuneError(f"no LoRA weights in '{folder}' (expected {LORA_WEIGHT_NAME}); "
                           "pass the folder written by save_lora")
    return cand


def load_lora(model: Any, folder: str | Path, scale: float = 1.0, adapter_name: str | None = None,
              trainable: bool = False, weight_name: str | None = None) -> str:
    """Load a diffusers-format LoRA (e.g. from :func:`save_lora`) as a new adapter and activate
    it with weight ``scale`` next to the already active adapters.

    Args:
        folder: the folder (or the .safetensors file).
        adapter_name: default ``lora_<n>``. trainable: keep training it (resume); loaded
            adapters are frozen by default, so they act as fixed components of the model.
    Returns:
        the adapter name.
    """
    from safetensors import safe_open

    network = _network_of(model)
    path = _lora_file(folder, weight_name)
    existing = adapter_names(network)
    name = adapter_name or f"lora_{len(existing)}"
    if name in existing:
        raise SoctuneError(f"adapter '{name}' already exists; pass another adapter_name")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
    prefixes = {k.split(".", 1)[0] for k in keys}
    prefix = "unet" if "unet" in prefixes else ("transformer" if "transformer" in prefixes else None)
    active_before = {n: _current_weight(network, n) for n in _active_adapters(network)}
    try:
        if hasattr(network, "load_lora_adapter"):
            network.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=prefix, adapter_name=name)
        else:
            _load_generic(network, path, prefix, name, meta)
        n_file = sum(1 for k in keys if ".lora" in k and (prefix is None or k.startswith(prefix + ".")))
        n_loaded = len(_adapter_params(network, name)) if name in adapter_names(network) else 0
        if n_loaded < n_file:  # diffusers only warns about unmatched keys: they would be silent no-ops
            raise SoctuneError(f"LoRA '{path}' matched {n_loaded} of its {n_file} tensors in "
                               f"{type(network).__name__} (prefix '{prefix}'); was it saved for this model?")
    except Exception as exc:  # noqa: BLE001 — a wrong file is a user mistake: one line, nothing half-loaded
        if name in adapter_names(network):
            delete_lora(network, name)
            if active_before:
                set_adapter_weights(network, active_before)
        if isinstance(exc, SoctuneError):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SoctuneError(f"cannot load LoRA '{path}' into {type(network).__name__} ({msg}); "
                           "was it saved for this model?") from None
    for p in _adapter_params(network, name):
        p.data = p.data.float()
    if not trainable:
        _frozen_set(network).add(name)
    set_adapter_weights(network, {**active_before, name: float(scale)})
    return name


def _load_generic(network: nn.Module, path: Path, prefix: str | None, name: str, meta: dict[str, str]) -> None:
    """LoRA loading for networks without diffusers' PeftAdapterMixin (e.g. UNet2DModel)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if any(".lora.down." in k or ".lora.up." in k for k in state):
        state = convert_unet_state_dict_to_peft(state)
    raw = json.loads(meta.get("lora_adapter_metadata", "{}"))
    cfg = {k[len(prefix) + 1:]: v for k, v in raw.items() if prefix and k.startswith(prefix + ".")} or raw
    if cfg:
        config = LoraConfig(**{k: v for k, v in cfg.items() if k in inspect.signature(LoraConfig).parameters})
    else:  # no metadata: rank from the B matrices, α = r, targets from the keys
        ranks = {v.shape[1] for k, v in state.items() if "lora_B" in k}
        targets = sorted({k.split(".lora_")[0] for k in state})
        r = max(ranks)
        config = LoraConfig(r=r, lora_alpha=r, target_modules=targets)
    config.inference_mode = False
    _inject(config, network, name)
    result = set_peft_model_state_dict(network, state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora" in k]
    if unexpected:
        raise SoctuneError(f"LoRA '{path}' has {len(unexpected)} keys this network lacks (e.g. {unexpected[0]}); "
                           "was it saved for this model?")


def delete_lora(model: Any, adapter_name: str) -> None:
    """Remove an adapter from the network."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    network = _network_of(model)
    if adapter_name not in adapter_names(network):
        raise SoctuneError(f"no adapter '{adapter_name}'; loaded adapters: {adapter_names(network) or 'none'}")
    remaining = {n: _current_weight(network, n) for n in _active_adapters(network) if n != adapter_name}
    delete_adapter_layers(network, adapter_name)
    network.peft_config.pop(adapter_name, None)
    _frozen_set(network).discard(adapter_name)
    getattr(network, "_soctune_adapter_weights", {}).pop(adapter_name, None)
    if remaining:
        set_adapter_weights(network, remaining)


def full_finetune_copy(network: nn.Module) -> nn.Module:
    """Full fine-tuning: make every weight of ``network`` trainable and return a frozen copy
    that serves as the base model. Memory: the copy doubles the weights, and Adam adds two
    more moments per weight, so ≈ 4× the network's size (vs. ≈ 1× + a few % for LoRA)."""
    import copy

    frozen = copy.deepcopy(network).requires_grad_(False).eval()
    network.requires_grad_(True)
    return frozen


__all__ = [
    "DEFAULT_TARGETS", "LORA_WEIGHT_NAME", "TRAIN_ADAPTER", "adapter_names", "adapter_weights", "adapters_disabled",
    "add_lora", "default_target_modules", "delete_lora", "full_finetune_copy", "load_lora", "lora_parameters",
    "save_lora", "set_adapter_weights",
]
