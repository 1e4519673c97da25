"""Export a soctune LoRA for other tools: kohya-ss (sd-scripts / A1111), ComfyUI, diffusers.

A finetune run keeps its LoRA in the diffusers format (``<run>/lora/pytorch_lora_weights.safetensors``,
written by :func:`soctune.models.lora.save_lora`: peft keys ``unet.<module>.lora_A.weight`` /
``.lora_B.weight`` plus the peft LoraConfig as metadata). :func:`export_lora` converts it:

``kohya`` (UNet LoRAs: SD1.x/SD2.x/SDXL)
    the kohya-ss key format ``lora_unet_<module_path_with_underscores>.lora_down.weight``
    (= peft ``lora_A``), ``.lora_up.weight`` (= ``lora_B``) and ``.alpha`` (a scalar per module),
    built with diffusers' own ``convert_state_dict_to_kohya``. Module paths are the diffusers
    UNet's (``down_blocks_0_attentions_0_…``), as kohya-ss writes them for SD1.x; for SDXL this
    is the diffusers-named variant of kohya keys. Readers scale the update by ``alpha / rank``, so
    ``alpha`` is the LoRA's α per module: ``lora_alpha`` (or its ``alpha_pattern`` entry) of the
    peft LoraConfig that save_lora stores in the file's metadata (with rsLoRA, α·√r, so that
    ``alpha / r`` equals peft's scale α/√r). Files without that metadata (not written by soctune)
    get α = r, i.e. scale 1 — the diffusers convention for LoRAs without α. Every exported file
    is converted back with diffusers' kohya loader (``_convert_non_diffusers_lora_to_diffusers``)
    and must map onto the same modules, else a :class:`SoctuneError` names the module that would
    be lost. ``StableDiffusionPipeline.load_lora_weights(file)`` (and SDXL's) load it; A1111's
    Lora extension maps these diffusers-named keys onto its SD1.x UNet
    (``convert_diffusers_name_to_compvis``).

``comfyui``
    For UNet LoRAs the same file as ``kohya``: ComfyUI's LoRA loader (``comfy/lora.py``,
    ``model_lora_keys_unet``) maps ``lora_unet_<diffusers module path with "_">`` onto SD1.5 and
    SDXL UNets and reads ``<key>.alpha`` as α. For SD3 / Flux transformer LoRAs (which diffusers
    has no kohya writer for) it is the diffusers key layout ``transformer.<module>.lora_A/B.weight``
    that ComfyUI maps for SD3 and Flux models, with the scale α/r folded into ``lora_B`` and no
    metadata, so every reader that assumes scale 1 without an ``alpha`` entry (ComfyUI, diffusers)
    computes the trained update.

``diffusers``
    the diffusers/peft file itself (old ``lora.down``/``lora_linear_layer`` naming normalised to
    peft's with diffusers' ``convert_all_state_dict_to_peft``), metadata kept:
    ``pipe.load_lora_weights(file)`` / :func:`soctune.models.lora.load_lora` load it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..registry import SoctuneError

#: export formats, in the order the CLI lists them
FORMATS = ("kohya", "comfyui", "diffusers")
_PREFIXES = ("unet", "transformer")
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_DEFAULT_NAMES = {"kohya": "lora_kohya.safetensors", "comfyui": "lora_comfyui.safetensors",
                  "diffusers": "pytorch_lora_weights.safetensors"}


def _source_file(folder: str | Path) -> Path:
    """The LoRA file of a finetune run folder (``<run>/lora/``), a LoRA folder or the file itself."""
    from .lora import LORA_WEIGHT_NAME, _lora_file

    path = Path(folder)
    if not path.exists():
        raise SoctuneError(f"'{folder}' does not exist; pass a finetune output folder, its lora/ folder "
                           "or a .safetensors LoRA file")
    if path.is_dir() and not (path / LORA_WEIGHT_NAME).is_file() and (path / "lora").is_dir():
        path = path / "lora"  # a run folder
    src = _lora_file(path, None)
    if src.suffix != ".safetensors":
        raise SoctuneError(f"'{src}' is not a .safetensors file; export reads LoRAs written by save_lora")
    return src


def _read(src: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(src), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(src)), meta
    except Exception as exc:  # noqa: BLE001 — a corrupt file is a user mistake: one line
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise SoctuneError(f"cannot read LoRA file '{src}' ({msg})") from None


def _split_prefix(state: dict[str, Any], src: Path) -> tuple[str, dict[str, Any]]:
    """("unet" | "transformer", keys without that prefix); one-line errors for other layouts."""
    keys = list(state)
    if keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise SoctuneError(f"'{src}' is already a kohya-format LoRA (lora_unet_* keys); use it as it is, "
                           "or pass the diffusers-format LoRA of a finetune run")
    prefixes = {k.split(".", 1)[0] for k in keys}
    found = [p for p in _PREFIXES if p in prefixes]
    if len(found) != 1 or prefixes - {found[0]}:
        te = "; text-encoder LoRAs are not exported" if any(p.startswith("text_encoder") for p in prefixes) else ""
        raise SoctuneError(f"'{src}' is not a soctune/diffusers LoRA of one network (key prefixes "
                           f"{sorted(prefixes)[:4]}{te}); expected keys 'unet.…' or 'transformer.…' "
                           "as save_lora writes them")
    prefix = found[0]
    return prefix, {k[len(prefix) + 1:]: v for k, v in state.items()}


def _to_peft(state: dict[str, Any], src: Path) -> dict[str, Any]:
    """Keys in peft's ``<module>.lora_A.weight`` / ``.lora_B.weight`` naming (diffusers' converter
    for the older diffusers namings)."""
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        return state  # peft naming already (other tensors, e.g. DoRA magnitudes, are caught later)
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    try:
        out = convert_all_state_dict_to_peft(dict(state))
    except Exception as exc:  # noqa: BLE001
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise SoctuneError(f"cannot read the LoRA keys of '{src}' ({msg}); "
                           "expected a LoRA written by save_lora") from None
    if not all(".lora_A." in k or ".lora_B." in k for k in out):
        odd = next(k for k in out if ".lora_A." not in k and ".lora_B." not in k)
        raise SoctuneError(f"'{src}' holds tensors other than plain LoRA pairs (e.g. '{odd}': DoRA / LoRA biases "
                           "are not exported); use --format diffusers")
    return out


def _config(meta: dict[str, str], prefix: str) -> dict[str, Any]:
    """The peft LoraConfig save_lora stored (``lora_adapter_metadata``, keys ``<prefix>.r`` …); {} if none."""
    raw = meta.get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        return {}
    pre = prefix + "."
    return {k[len(pre):]: v for k, v in cfg.items() if k.startswith(pre)} or cfg


def _modules(state: dict[str, Any], src: Path) -> dict[str, tuple[Any, Any]]:
    """module path -> (lora_A, lora_B)."""
    mods: dict[str, tuple[Any, Any]] = {}
    for k in state:
        if k.endswith(".lora_A.weight"):
            m = k[: -len(".lora_A.weight")]
            b = state.get(m + ".lora_B.weight")
            if b is None:
                raise SoctuneError(f"'{src}' has lora_A but no lora_B for module '{m}'; the file is incomplete")
            mods[m] = (state[k], b)
    extra = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:
        raise SoctuneError(f"'{src}' holds tensors other than LoRA pairs (e.g. '{extra[0]}': DoRA magnitudes or "
                           "LoRA biases have no kohya equivalent); use --format diffusers")
    if not mods:
        raise SoctuneError(f"'{src}' holds no LoRA weights")
    return mods


def _scale(module: str, rank: int, cfg: dict[str, Any]) -> float:
    """peft's scale of one module: α/r (α/√r with rsLoRA), α and r from the patterns as peft
    resolves them (``get_pattern_key``). Without a stored config: 1 (α = r)."""
    if not cfg or cfg.get("lora_alpha") is None:
        return 1.0
    from peft.utils.other import get_pattern_key

    alpha_pattern = cfg.get("alpha_pattern") or {}
    alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"]))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _kohya(mods: dict[str, tuple[Any, Any]], cfg: dict[str, Any], src: Path) -> tuple[dict[str, Any], dict[str, str]]:
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    out: dict[str, Any] = {}
    alphas: list[float] = []
    ranks: list[int] = []
    for m, (a, b) in mods.items():
        rank = int(a.shape[0])
        part = convert_state_dict_to_kohya({f"unet.{m}.lora_A.weight": a, f"unet.{m}.lora_B.weight": b})
        (alpha_key,) = [k for k in part if k.endswith(".alpha")]
        alpha = _scale(m, rank, cfg) * rank  # readers scale by alpha / rank
        part[alpha_key] = torch.tensor(alpha, dtype=torch.float32)
        alphas.append(alpha)
        ranks.append(rank)
        out.update(part)
    _check_roundtrip(out, mods, src)
    # kohya-ss' own metadata (informative: readers take rank and α from the tensors)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(Counter(ranks).most_common(1)[0][0]),
            "ss_network_alpha": _num(Counter(alphas).most_common(1)[0][0]), "soctune_source": src.name}
    return {k: v.contiguous() for k, v in out.items()}, meta


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _check_roundtrip(kohya: dict[str, Any], mods: dict[str, tuple[Any, Any]], src: Path) -> None:
    """diffusers' kohya loader must map every exported key back onto its module (its renaming of
    ``_`` to ``.`` is heuristic: a module it misreads would be lost in diffusers and elsewhere)."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # pragma: no cover — a diffusers without these private helpers: skip the check
        return
    try:
        back, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
        back = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in back.items() if k.startswith("unet.")})
    except Exception as exc:  # noqa: BLE001
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise SoctuneError(f"diffusers' kohya loader cannot read the export of '{src}' ({msg}); "
                           "use --format diffusers") from None
    got = {k.rsplit(".lora_", 1)[0] for k in back}
    lost = sorted(set(mods) - got)
    if lost:
        raise SoctuneError(f"module '{lost[0]}' of '{src}' does not survive the kohya key format "
                           f"({len(lost)} of {len(mods)} modules); use --format diffusers")


def _folded(mods: dict[str, tuple[Any, Any]], cfg: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, (a, b) in mods.items():
        s = _scale(m, int(a.shape[0]), cfg)
        out[f"{prefix}.{m}.lora_A.weight"] = a.contiguous()
        out[f"{prefix}.{m}.lora_B.weight"] = (b * s if s != 1.0 else b).contiguous()
    return out


def _out_path(out: str | Path, fmt: str, src: Path) -> Path:
    path = Path(out)
    if path.is_dir():
        path = path / _DEFAULT_NAMES[fmt]
    if path.exists() and path.resolve() == src.resolve():
        raise SoctuneError(f"--out '{out}' is the LoRA being exported; pass another file")
    if path.suffix != ".safetensors":
        raise SoctuneError(f"--out '{out}' must end in .safetensors (the exported LoRA is a safetensors file)")
    return path


def _write(tensors: dict[str, Any], meta: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", **meta})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_lora(folder: str | Path, fmt: str, out: str | Path) -> Path:
    """Convert the diffusers-format LoRA of a finetune run into another tool's format.

    Args:
        folder: a ``soctune finetune`` output folder (uses ``lora/``), a LoRA folder written by
            :func:`soctune.models.lora.save_lora`, or its ``.safetensors`` file.
        fmt: ``kohya`` (kohya-ss / sd-scripts / A1111 keys ``lora_unet_….lora_down.weight``,
            ``.lora_up.weight``, ``.alpha``; UNet LoRAs), ``comfyui`` (ComfyUI's LoRA loader
            accepts these kohya keys for SD1.5/SDXL UNets, so for UNet LoRAs this is the kohya
            file; for SD3/Flux it is the diffusers layout with α/r folded into ``lora_B``) or
            ``diffusers`` (the peft-format file with its metadata). See the module docstring.
        out: the ``.safetensors`` file to write (an existing folder: a default file name in it).
    Returns:
        the path written.
    Raises:
        SoctuneError: one line — missing input, unknown format, a file that is not a soctune /
        diffusers LoRA, ``kohya`` for a transformer (SD3/Flux) LoRA, or a module the kohya key
        format cannot carry.
    """
    name = str(fmt).strip().lower()
    if name not in FORMATS:
        raise SoctuneError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    src = _source_file(folder)
    path = _out_path(out, name, src)
    state, meta = _read(src)
    prefix, state = _split_prefix(state, src)
    state = _to_peft(state, src)
    cfg = _config(meta, prefix)
    if name == "diffusers":
        tensors = {f"{prefix}.{k}": v.contiguous() for k, v in state.items()}
        keep = {k: v for k, v in meta.items() if k != "format"}
        _write(tensors, keep, path)
        return path
    if cfg.get("use_dora"):
        raise SoctuneError(f"'{src}' is a DoRA adapter; kohya/ComfyUI exports hold plain LoRA only: "
                           "use --format diffusers")
    mods = _modules(state, src)
    if prefix == "unet":
        tensors, kmeta = _kohya(mods, cfg, src)
        _write(tensors, kmeta, path)
    elif name == "comfyui":
        _write(_folded(mods, cfg, prefix), {"soctune_source": src.name}, path)
    else:
        raise SoctuneError(f"'{src}' is a transformer (SD3/Flux) LoRA: diffusers has no converter from it to "
                           "kohya keys; use --format comfyui (ComfyUI loads diffusers-format SD3/Flux LoRAs) "
                           "or --format diffusers")
    return path


__all__ = ["FORMATS", "export_lora"]
