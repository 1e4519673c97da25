"""Data-parallel training over ``torch.distributed`` (gloo; nccl via ``SOCTUNE_DIST_BACKEND``).

Launched by ``torchrun --nproc-per-node N --no-python soctune finetune ...`` (any launcher that
sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` works). The design:

* **One global batch, split by rows.** The global batch of B trajectories is split into W
  contiguous shards of b = B/W rows; rank r owns rows [r·b, (r+1)·b). Every rank draws the noise
  of the *whole* global batch from one identically seeded generator and keeps its rows
  (:func:`batch_shard`, consulted by :func:`soctune.trajectory.rollout`), so each sample's
  noise depends only on its global index: W ranks produce exactly the trajectories of one
  process with batch B, and every other random choice of the solver (loss steps, transition
  subsets) is drawn identically on all ranks. The extra cost is drawing B·D normal numbers per
  step instead of b·D — negligible next to a network evaluation.
* **Gradients averaged, not wrapped.** The model is not wrapped in DistributedDataParallel
  (whose ``module.`` prefix would leak into saved LoRA keys); after each backward the gradients
  of all trainable tensors are all-reduced and divided by W (:func:`all_reduce_gradients`),
  before clipping and the optimiser step. For a loss that is a mean over samples this is the
  gradient of the global-batch loss: ∇L_B = (1/W) Σ_r ∇L_{b,r}.
* **Rank 0 writes**: metrics, checkpoints, evaluation, LoRA, summary. On resume rank 0 reads the
  newest valid checkpoint and broadcasts it, so nodes need no shared file system.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .registry import SoctuneError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank r ∈ [0, W), world size W, local rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: this process group was created by :func:`init_from_env` (so :func:`shutdown` destroys it)
    owns_group: bool = field(default=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()


def env_world_size() -> int:
    """W from the launcher's environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SoctuneError(f"WORLD_SIZE must be an integer, got '{os.environ['WORLD_SIZE']}'") from None


def init_from_env(backend: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by the launcher's environment variables.

    Returns :data:`SINGLE` when ``WORLD_SIZE`` ≤ 1. ``backend`` defaults to ``$SOCTUNE_DIST_BACKEND``
    or gloo. Idempotent: an already initialised group is reused (and left to its owner).
    """
    world = env_world_size()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise SoctuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed; install a build with it")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise SoctuneError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                           "`torchrun --nproc-per-node N --no-python soctune finetune ...`")
    owns = not dist.is_initialized()
    if owns:
        # gloo unless asked: soctune's runs build their models on the CPU (nccl needs CUDA tensors)
        backend = backend or os.environ.get("SOCTUNE_DIST_BACKEND", "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def current_info() -> DistInfo:
    """DistInfo of an initialised process group, else :data:`SINGLE`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def shard_rows(global_batch: int, info: DistInfo) -> tuple[int, int]:
    """[start, stop) of this rank's rows in a global batch of B = ``global_batch`` (B % W == 0)."""
    if global_batch % info.world_size:
        raise SoctuneError(f"train.batch_size={global_batch} must be divisible by the number of processes "
                           f"{info.world_size} (it is the global batch, split evenly over the ranks)")
    b = global_batch // info.world_size
    return info.rank * b, (info.rank + 1) * b


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
    """The active shard, if any and (when given) if its size matches ``batch_size``."""
    shard = _SHARD.get()
    if shard is None or shard.total == shard.size:
        return None
    if batch_size is not None and int(batch_size) != shard.size:
        return None
    return shard


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
        return _take_rows(cond_sampler(shard.total, gen), shard)

    return sample


def _take_rows(c: Any, shard: BatchShard) -> Any:
    if isinstance(c, dict):
        return {k: _take_rows(v, shard) for k, v in c.items()}
    if isinstance(c, Tensor) and c.dim() >= 1 and c.shape[0] == shard.total:
        return shard.take(c)
    if isinstance(c, (list, tuple)) and len(c) == shard.total:
        return type(c)(c[shard.start:shard.stop])
    return c


# ------------------------------------------------------------------------------- collectives
def all_reduce_gradients(params: Sequence[torch.nn.Parameter], info: DistInfo) -> None:
    """Replace every gradient by its average over the W ranks: g ← (1/W) Σ_r g_r.

    A tensor whose gradient is None on some ranks counts as zero there; one that has no
    gradient on any rank keeps ``grad = None`` (so the optimiser skips it exactly as in a
    single process). One flat all-reduce for all tensors (coalesced: one message, not one per
    LoRA matrix).
    """
    if not info.enabled or not params:
        return
    import torch.distributed as dist

    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    if not live:
        return
    # float32 on the parameters' device (gloo: CPU, nccl: GPU); the sum is the same for bf16 params
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in live])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p in live:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
        p.grad = g.clone()
        offset += n


def all_true(flag: bool, info: DistInfo) -> bool:
    """Logical AND of a per-rank flag over all ranks (e.g. "my loss is finite")."""
    if not info.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def average_metrics(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Metrics of the global batch from each rank's: means averaged over ranks (equal shard
    sizes); ``reward_std`` combined exactly from per-rank means and stds,
    σ² = mean_r(σ_r² + μ_r²) − μ² (population variance)."""
    if not info.enabled:
        return metrics
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, metrics)
    keys = [k for k in metrics if all(k in g for g in gathered)]
    out = {k: sum(float(g[k]) for g in gathered) / info.world_size for k in keys}
    if "reward_mean" in out and "reward_std" in out:
        mu = out["reward_mean"]
        second = sum(float(g["reward_std"]) ** 2 + float(g["reward_mean"]) ** 2 for g in gathered) / info.world_size
        out["reward_std"] = max(second - mu * mu, 0.0) ** 0.5
    return out


def broadcast_parameters(params: Sequence[Tensor], info: DistInfo) -> None:
    """Copy rank 0's values into every rank's tensors (identical initialisation)."""
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            buf = p.detach().clone()
            dist.broadcast(buf, src=0)
            p.copy_(buf)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for checkpoints and small records)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo, wait: bool = True) -> None:
    """Leave a process group that :func:`init_from_env` created: after a final barrier (so no
    rank exits while others still talk) unless ``wait=False`` (error path: peers may be gone)."""
    if info.enabled and info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
