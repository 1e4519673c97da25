"""What data-parallel training needs beyond the engine: a global batch split by rows.

Processes are launched by ``accelerate launch`` or ``torchrun``; accelerate joins the process
group and supplies the collectives (see :mod:`soctune.trainer`). What it does not do — and what
makes N processes sample exactly the trajectories of one — lives here:

* **One global batch, split by rows.** The global batch of B trajectories is split into
  contiguous shards (W processes × A gradient-accumulation micro-batches); a shard owns rows
  [start, stop). Every shard draws the noise of the *whole* global batch from one identically
  seeded generator and keeps its rows (:func:`batch_shard`, consulted by
  :func:`soctune.trajectory.rollout`), so each sample's noise depends only on its global index,
  and every other random choice of the solver (loss steps, transition subsets) is drawn
  identically in all shards. The extra cost is drawing B·D normal numbers per step instead of
  b·D — negligible next to a network evaluation.
* Conditioning is drawn the same way (:func:`sharded_cond_sampler`).
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .models.base import index_batch
from .registry import SoctuneError


def env_world_size() -> int:
    """W from the launcher's environment (1 when not launched by accelerate/torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SoctuneError(f"WORLD_SIZE must be an integer, got '{os.environ['WORLD_SIZE']}'") from None


# ------------------------------------------------------------------------------- batch shard
@dataclass(frozen=True)
class BatchShard:
    """Rows [start, stop) of a global batch of ``total`` samples."""

    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def global_shape(self, local_shape: Sequence[int]) -> tuple[int, ...]:
        """[b, *S] -> [B, *S]."""
        return (self.total, *local_shape[1:])

    def take(self, x: Tensor) -> Tensor:
        """This rank's rows of a batch-leading tensor [B, ...] -> [b, ...]."""
        return x[self.start:self.stop]


_SHARD: contextvars.ContextVar[BatchShard | None] = contextvars.ContextVar("soctune_batch_shard", default=None)


@contextmanager
def batch_shard(start: int, stop: int, total: int) -> Iterator[BatchShard]:
    """While active, :func:`soctune.trajectory.rollout` calls that draw a fresh batch of
    ``stop − start`` samples from the prior draw the noise of all ``total`` samples and keep
    rows [start, stop) — noise indexed by global sample, independent of the number of ranks."""
    shard = BatchShard(int(start), int(stop), int(total))
    token = _SHARD.set(shard)
    try:
        yield shard
    finally:
        _SHARD.reset(token)


def current_shard(batch_size: int | None = None) -> BatchShard | None:
    """The active shard for a draw of ``batch_size`` samples (None outside :func:`batch_shard`
    or when one shard is the whole batch).

    A draw of the shard's own size gets the shard. A draw of n ≠ b samples (a solver sampling a
    second, differently sized batch) is the same shard of a global batch drawn n per shard:
    shard i of the equal-size split owns rows [i·n, (i+1)·n) of total/b·n, so its noise still
    depends only on the global sample index. Shards of unequal size have no such rescaling and
    raise a one-line :class:`SoctuneError` rather than silently drawing unsharded noise (every
    rank would then draw the same samples).
    """
    shard = _SHARD.get()
    if shard is None or shard.total == shard.size:
        return None
    if batch_size is None or int(batch_size) == shard.size:
        return shard
    n, b = int(batch_size), shard.size
    if shard.total % b or shard.start % b:
        raise SoctuneError(f"a draw of {n} samples inside batch shard rows [{shard.start}, {shard.stop}) of "
                           f"{shard.total}: shards of unequal size cannot be rescaled; draw {b} samples (the "
                           "shard's size) or split the global batch into equal shards")
    index = shard.start // b
    return BatchShard(index * n, (index + 1) * n, shard.total // b * n)


def sharded_cond_sampler(cond_sampler: Callable[[int, torch.Generator], Any] | None
                         ) -> Callable[[int, torch.Generator], Any] | None:
    """Wrap a conditioning sampler (n, generator) -> cond so that, inside :func:`batch_shard`,
    it draws the conditioning of the global batch and returns this rank's rows (tensors with a
    leading batch dimension, lists, dicts of those)."""
    if cond_sampler is None:
        return None

    def sample(n: int, gen: torch.Generator) -> Any:
        shard = current_shard(n)
        if shard is None:
            return cond_sampler(n, gen)
        rows = torch.arange(shard.start, shard.stop)
        return index_batch(cond_sampler(shard.total, gen), rows, shard.total)

    return sample
