"""Files a run writes: image grids, curves, JSON lines, atomic checkpoints."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .registry import SoctuneError


class WriteError(SoctuneError, OSError):
    """A file a run writes could not be written (disk full, quota, permissions); its message is
    one line, so the CLI prints it without a traceback. ``errno`` is the OS error's."""


def _write_error(path: Path, exc: OSError) -> WriteError:
    reason = exc.strerror or type(exc).__name__
    hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
    err = WriteError(f"could not write {path} ({reason}); nothing partial was left under that name — {hint} "
                     "and rerun (with --resume to continue from the last checkpoint)")
    err.errno = exc.errno
    return err


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _write_file(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` and fsync (separate so tests can simulate a full disk)."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write-then-rename in the same folder, fsynced, so a crash never leaves a partial file
    under ``path`` (the old content stays until the rename). An OSError (e.g. ENOSPC) removes
    the temporary file and is raised as a one-line :class:`WriteError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        _write_file(fd, data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        raise _write_error(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 1, scale: int = 4) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] -> uint8 image [rows·(H+pad), cols·(W+pad), 3] (nearest-neighbour
    upscaled by ``scale`` so 8×8 digits are legible)."""
    x = x.detach().float().clamp(-1, 1).cpu()
    n, c = x.shape[:2]
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c > 3:
        x = x[:, :3]
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    total = rows * nrow
    if total > n:
        x = torch.cat([x, torch.ones(total - n, *x.shape[1:])])
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=1.0)
    grid = rearrange(x, "(r k) ch h w -> (r h) (k w) ch", r=rows, k=nrow)
    img = ((grid + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else img


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, title: str | None = None) -> None:
    """Save samples [N, C, H, W] in [−1, 1] as a PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = image_grid(x, nrow)
    fig = plt.figure(figsize=(img.shape[1] / 100 + 0.2, img.shape[0] / 100 + (0.5 if title else 0.2)), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 if not title else 0.92))
    ax.imshow(img, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def save_side_by_side(before: Tensor, after: Tensor, path: str | Path, titles: tuple[str, str]) -> None:
    """Two grids (same seeds) next to each other in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = image_grid(before), image_grid(after)
    fig, axes = plt.subplots(1, 2, figsize=(2 * a.shape[1] / 100 + 0.6, a.shape[0] / 100 + 0.6), dpi=100)
    for ax, img, t in zip(axes, (a, b), titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curve(xs: Iterable[float], ys: Iterable[float], path: str | Path, ylabel: str,
               band: Iterable[float] | None = None, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = list(xs), list(ys)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(xs, ys, lw=1.5)
    if band is not None:
        sd = np.asarray(list(band))
        ax.fill_between(xs, np.asarray(ys) - sd, np.asarray(ys) + sd, alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line, fsynced. A failed write raises a one-line :class:`WriteError`
    (a partial last line is dropped by the resume, see ``soctune.run._truncate_metrics``)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        raise _write_error(Path(path), exc) from exc


# --------------------------------------------------------------------------------------------
# Checkpoint state that cannot run code: one .safetensors file, tensors + a JSON skeleton.
# --------------------------------------------------------------------------------------------

_STATE_META_KEY = "soctune_state"
_STATE_FORMAT = 1
# numpy dtype kinds whose bytes are plain data (no object pointers, no lost structure)
_NP_KINDS = frozenset("biufcSUMm")


class UnsafeOrCorruptStateError(SoctuneError):
    """A run file that :func:`load_state` refuses: it holds a pickle (which can execute code
    when loaded), it is corrupt or truncated, or it is not a soctune state. One-line message."""


@functools.lru_cache(maxsize=None)
def _safetensors_dtype_ok(dtype: torch.dtype) -> bool:
    from safetensors.torch import save

    try:
        save({"x": torch.empty(0, dtype=dtype)})
    except Exception:  # noqa: BLE001
        return False
    return True


def _key_repr(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


class _StateEncoder:
    """Walks a nested state, moving tensors/arrays into ``tensors`` and the rest into JSON."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self._storages: set[tuple[str, int]] = set()
        self._stack: set[int] = set()

    def _new_key(self) -> str:
        return f"t{len(self.tensors)}"

    def _add_tensor(self, t: Tensor, path: str) -> str:
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise TypeError(f"save_state: cannot store the {t.layout}{' quantized' if t.is_quantized else ''} "
                            f"tensor on {t.device} at {path}; only dense tensors with data are supported")
        if not _safetensors_dtype_ok(t.dtype):
            raise TypeError(f"save_state: cannot store a tensor of dtype {t.dtype} at {path} "
                            "(safetensors has no such dtype)")
        t = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
        st = t.untyped_storage()
        ident = (st.device.type, st.data_ptr())
        if ident in self._storages or t.numel() == 0:
            t = t.clone()  # safetensors refuses tensors that share storage: store an independent copy
        else:
            self._storages.add(ident)
        key = self._new_key()
        self.tensors[key] = t
        return key

    def encode(self, x: Any, path: str) -> Any:
        if x is None or type(x) is bool or type(x) is str:
            return x
        if type(x) is int:
            return x
        if type(x) is float:
            if math.isfinite(x):
                return x
            return {"t": "float", "v": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if isinstance(x, Tensor):
            if type(x) is not Tensor and not isinstance(x, torch.nn.Parameter):
                raise TypeError(f"save_state: cannot store the tensor subclass {type(x).__name__} at {path}")
            return {"t": "tensor", "k": self._add_tensor(x, path)}
        if type(x) is np.ndarray or isinstance(x, np.generic):
            arr = np.asarray(x)
            if arr.dtype.kind not in _NP_KINDS or arr.dtype.hasobject or arr.dtype.fields is not None:
                what = "array" if isinstance(x, np.ndarray) else "scalar"
                raise TypeError(f"save_state: cannot store a numpy {what} "
                                f"of dtype {arr.dtype} at {path}; only bool/int/float/complex/str/datetime dtypes")
            raw = arr.tobytes(order="C")
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            key = self._new_key()
            self.tensors[key] = t
            return {"t": "ndarray" if isinstance(x, np.ndarray) else "npscalar", "k": key,
                    "dtype": arr.dtype.str, "shape": list(arr.shape)}
        if type(x) in (list, tuple, dict, OrderedDict):
            if id(x) in self._stack:
                raise TypeError(f"save_state: {path} refers back to a list/tuple/dict that contains it "
                                "(a reference cycle)")
            self._stack.add(id(x))
            try:
                if type(x) in (dict, OrderedDict):
                    items = []
                    for k, v in x.items():
                        if type(k) not in (str, int):
                            raise TypeError(f"save_state: cannot store the {type(k).__name__} dict key {k!r} "
                                            f"in {path}; dict keys must be str or int")
                        items.append([k, self.encode(v, _key_repr(path, k))])
                    if type(x) is dict:
                        return {"t": "dict", "v": items}
                    node = {"t": "odict", "v": items}
                    meta = getattr(x, "_metadata", None)  # nn.Module.state_dict()'s per-module versions
                    if meta is not None:
                        node["meta"] = self.encode(meta, f"{path}._metadata")
                    return node
                vals = [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]
                return vals if type(x) is list else {"t": "tuple", "v": vals}
            finally:
                self._stack.discard(id(x))
        raise TypeError(f"save_state: cannot store {type(x).__module__}.{type(x).__qualname__} at {path}; "
                        "supported: tensors, numpy arrays/scalars, int, float, bool, str, None, "
                        "and lists/tuples/dicts/OrderedDicts (str or int keys) of them")


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Save a nested ``state`` as ONE ``.safetensors`` file, atomically (see
    :func:`atomic_write_bytes`). Every tensor in the nesting is a safetensors tensor (moved to
    CPU, made contiguous, copied when it shares storage with another); numpy arrays are stored
    as their bytes (restored with their dtype; numpy scalars likewise); the rest (dicts and
    OrderedDicts with str/int keys — a ``state_dict()``'s ``_metadata`` kept —, lists, tuples,
    int, float incl. nan/inf, bool, str, None) goes into a JSON skeleton in the file's
    metadata. Nothing is pickled, so :func:`load_state` cannot run code. Anything else raises
    ``TypeError`` naming its key path."""
    from safetensors.torch import save

    if type(state) is not dict:
        raise TypeError(f"save_state: the state must be a dict, got {type(state).__name__}")
    enc = _StateEncoder()
    root = enc.encode(state, "state")
    skeleton = json.dumps({"format": _STATE_FORMAT, "root": root}, allow_nan=False, separators=(",", ":"))
    data = save(enc.tensors, metadata={_STATE_META_KEY: skeleton})
    atomic_write_bytes(path, data)


def one_line_reason(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a :class:`SoctuneError` message: its text with every run of
    whitespace (newlines included) collapsed to one space, cut to ``limit`` characters, or the
    exception's class name when it has no text."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


def _corrupt(path: Path, why: str) -> UnsafeOrCorruptStateError:
    return UnsafeOrCorruptStateError(f"cannot load {path}: not a valid soctune state file — it is corrupt or "
                                     f"truncated ({why}); point to an intact checkpoint or start a fresh run")


def _decode_state(node: Any, tensors: dict[str, Tensor], path: Path) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode_state(v, tensors, path) for v in node]
    if not isinstance(node, dict):
        raise _corrupt(path, f"unexpected {type(node).__name__} in the skeleton")
    tag = node.get("t")
    if tag in ("dict", "odict"):
        out = {} if tag == "dict" else OrderedDict()
        for item in node.get("v", ()):
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int)):
                raise _corrupt(path, "malformed dict entry in the skeleton")
            out[item[0]] = _decode_state(item[1], tensors, path)
        if "meta" in node:
            out._metadata = _decode_state(node["meta"], tensors, path)
        return out
    if tag == "tuple":
        return tuple(_decode_state(v, tensors, path) for v in node.get("v", ()))
    if tag == "float":
        v = node.get("v")
        if v not in ("nan", "inf", "-inf"):
            raise _corrupt(path, f"bad float {v!r} in the skeleton")
        return float(v)
    if tag in ("tensor", "ndarray", "npscalar"):
        key = node.get("k")
        if key not in tensors:
            raise _corrupt(path, f"tensor {key!r} named by the skeleton is missing")
        t = tensors[key]
        if tag == "tensor":
            return t
        try:
            dtype = np.dtype(str(node["dtype"]))
            shape = tuple(int(s) for s in node["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"bad numpy entry in the skeleton: {one_line_reason(exc)}") from None
        if dtype.kind not in _NP_KINDS or dtype.hasobject or dtype.fields is not None or any(s < 0 for s in shape):
            raise _corrupt(path, f"numpy dtype {dtype} is not plain data")
        raw = t.numpy().tobytes() if t.numel() else b""
        if t.dtype != torch.uint8 or len(raw) != math.prod(shape) * dtype.itemsize:
            raise _corrupt(path, f"numpy array {key!r} has {len(raw)} bytes, not {math.prod(shape)}×{dtype.itemsize}")
        arr = np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        return arr if tag == "ndarray" else arr[()]
    raise _corrupt(path, f"unknown skeleton entry {tag!r}")


def load_state(path: str | Path) -> dict[str, Any]:
    """The inverse of :func:`save_state`; tensors come back on the CPU. It never unpickles:
    a file that is not a valid soctune safetensors state (a ``torch.save``/``pickle`` file,
    a truncated or corrupt file) raises :class:`UnsafeOrCorruptStateError` with a one-line
    message. A missing file raises ``FileNotFoundError`` as usual."""
    from safetensors import safe_open

    path = Path(path)
    with open(path, "rb") as f:  # a missing/unreadable file raises OSError as usual
        head = f.read(9)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 — safetensors only parses; nothing here can run code
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.errno is not None:
            raise
        # a safetensors file opens with its header's length (8 bytes, little-endian) and then '{'; that length's
        # low byte can be 0x80, the pickle protocol mark, so a truncated state is told apart by its 9th byte
        safetensors_shaped = head[8:9] == b"{"
        if head.startswith(b"PK\x03\x04") or (head.startswith(b"\x80") and not safetensors_shaped):
            raise UnsafeOrCorruptStateError(
                f"cannot load {path}: refused: it holds a pickle, which can execute code when loaded; "
                "soctune never unpickles run files (start a fresh run, or point to a checkpoint "
                "written by this version)") from None
        raise _corrupt(path, one_line_reason(exc)) from None
    if _STATE_META_KEY not in meta:
        raise UnsafeOrCorruptStateError(
            f"cannot load {path}: it is a safetensors file but not a soctune state (no '{_STATE_META_KEY}' metadata)")
    try:
        skeleton = json.loads(meta[_STATE_META_KEY])
    except (ValueError, RecursionError) as exc:
        raise _corrupt(path, f"bad skeleton JSON: {one_line_reason(exc)}") from None
    if not isinstance(skeleton, dict) or skeleton.get("format") != _STATE_FORMAT:
        fmt = skeleton.get("format") if isinstance(skeleton, dict) else None
        raise _corrupt(path, f"unknown state format {fmt!r}, expected {_STATE_FORMAT}")
    try:
        state = _decode_state(skeleton.get("root"), tensors, path)
    except RecursionError:
        raise _corrupt(path, "the skeleton is nested too deeply") from None
    if not isinstance(state, dict):
        raise _corrupt(path, "the skeleton's root is not a dict")
    return state
