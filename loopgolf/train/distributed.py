"""torch.distributed glue for data-parallel training under ``torchrun``.

Ranks run the same model on different slices of each global batch (the loader hands rank r its
slice, so the global batch does not depend on the world size). After the accumulation micro-steps
every rank holds its local mean gradient; :func:`all_reduce_gradients` averages them, so every rank
applies the same update and the parameters stay identical without a DDP wrapper. That keeps
``torch.compile`` graphs free of communication and makes parameters that a progressive-recurrence
stage does not use (gradient None on every rank) trivial to skip. Muon then splits its
orthogonalisation across ranks by itself (``loopgolf.train.optim``).

Launch: ``torchrun --nproc_per_node N -m loopgolf train ...`` (add ``--nnodes``/``--rdzv-*`` for
several nodes); torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Gradients are flattened into buckets of at most this many bytes per all-reduce: big enough to
# keep the collective efficient, small enough not to double the gradient memory.
BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints, progress bars, artifacts and summaries."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def context_from_env(env: dict[str, str] | None = None) -> DistContext:
    """Read the torchrun variables; without them this is a single process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (as torchrun sets them): {e}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def init_distributed(device: torch.device, env: dict[str, str] | None = None) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and return this
    rank's context and device (``cuda:LOCAL_RANK`` on GPUs). A single process initialises nothing."""
    ctx = context_from_env(env)
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {ctx.local_rank} but this node has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size, **kwargs)
    return ctx, device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank: the same seed already gives the
    same initialisation, this guards against anything that made them drift before training."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src)


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> Iterable[list[Tensor]]:
    """Consecutive runs of same-dtype/device tensors, each at most ``bucket_bytes`` (a single
    larger tensor forms its own bucket)."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > bucket_bytes or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce_gradients(params: Iterable[nn.Parameter], world_size: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average gradients across ranks in place. Parameters without a gradient are skipped: which
    ones have none depends only on the recurrence stage, which every rank agrees on, so all ranks
    flatten the same tensors in the same order."""
    grads = [p.grad for p in params if p.grad is not None]
    handles = []
    flats = []
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flat.mul_(1.0 / world_size)  # sum of pre-scaled gradients: gloo has no AVG reduction
        handles.append(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
        flats.append((flat, bucket))
    for handle, (flat, bucket) in zip(handles, flats):
        handle.wait()
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_mean(values: Tensor, world_size: int) -> Tensor:
    """Mean of a small tensor over ranks (metrics, clocks): in place and returned."""
    values.mul_(1.0 / world_size)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (small things: a run directory name)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
