"""Files a run writes: image grids, curves, JSON lines, atomic checkpoints."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
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


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes` (serialised in memory first)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


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
