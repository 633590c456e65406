"""Data-parallel training across processes, set up from the environment torchrun creates.

The recipe (DDP):

* ``torchrun --nproc-per-node N ...`` starts N copies of the program with ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup`
  reads them and joins the process group (gloo on the CPU, nccl on CUDA, one GPU per
  process, ``cuda:LOCAL_RANK``). Without ``WORLD_SIZE`` (or with 1) nothing is set up.
* The global batch is fixed by the config, not by the process count: the data layer hands
  each rank an equal slice of every global batch. Each rank's loss is the mean over its
  own slice; DDP averages gradients across ranks, so the gradient equals the one a single
  process computes on the whole global batch, and results do not depend on N.
* Each trainable module is wrapped in ``DistributedDataParallel``; the phase calls the
  wrappers (``phase.nets``) in its loss so that DDP's gradient hooks run, while checkpoints
  save the unwrapped modules (no ``module.`` prefix in the keys).
* Only rank 0 writes checkpoints, logs, samples and exported weights; logged losses and
  metrics are averaged across ranks first.

FSDP (not implemented): for models whose weights, gradients and optimizer state do not fit
one device, ``torch.distributed.fsdp.fully_shard`` would replace the DDP wrapper in
:func:`wrap`. Checkpoints would then need ``torch.distributed.checkpoint`` (every rank
writes its shard) or a gather of the full state dict to rank 0 before saving, and the
optimizer would have to be built after sharding. Stable Diffusion's U-Net (~860M
parameters) fits a single modern GPU with AdamW, so DDP covers the three phases here.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentkit.errors import ConfigError

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# torch 2.13 renamed DDP's broadcast_buffers (now deprecated) to forward_sync_buffers.
_BUFFER_SYNC_ARGUMENT = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else "broadcast_buffers"
)


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # True when setup() joined the process group, so teardown() should leave it again.
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str | torch.device | None = None) -> World:
    """Join the process group described by torchrun's variables (or run alone without them)."""
    size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device(device) if device is not None else _default_device(local_rank)
    if device.type == "cuda" and device.index is None:  # a bare "cuda": this process's GPU
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size <= 1:
        return World(device=device)
    if dist.is_initialized():  # the caller set it up and will tear it down
        return World(dist.get_rank(), dist.get_world_size(), local_rank, device)
    missing = [name for name in _REQUIRED if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {size} but {', '.join(missing)} is not set; start the run "
            "with torchrun or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=_env_int("RANK", 0), world_size=size)
    return World(dist.get_rank(), size, local_rank, device, owns_group=True)


def teardown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(modules: dict[str, nn.Module], world: World) -> dict[str, nn.Module]:
    """The modules the phase should call: DDP wrappers when distributed, else themselves."""
    if not world.distributed:
        return dict(modules)
    ids = [world.device.index] if world.device.type == "cuda" else None
    # No buffer sync in forward: a forward pass on rank 0 alone (evaluate, sample) must not
    # wait for a collective the other ranks never join; SD models use GroupNorm, which has
    # no running buffers to keep in step. (Buffers are still synced once, at wrapping.)
    no_buffer_sync = {_BUFFER_SYNC_ARGUMENT: False}
    return {
        name: nn.parallel.DistributedDataParallel(module, device_ids=ids, **no_buffer_sync)
        for name, module in modules.items()
    }


def unwrap(nets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules inside DDP wrappers (others as they are)."""
    return {
        name: net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        for name, net in nets.items()
    }


def mean_across(values: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``values`` over all ranks (each rank passes a tensor of the same shape)."""
    if not world.distributed:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (small JSON-like values only)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (small JSON-like values only)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(rows: torch.Tensor, world: World) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``rows`` (any number each), concatenated in rank order on every rank,
    and how many came from each rank. Gradients flow back: each rank's rows get the sum of
    the gradients that every rank's loss sends them, so when every rank computes the same
    loss over the gathered rows, DDP's average of the parameter gradients is that loss's
    gradient (``world.size`` times each rank's share, divided by ``world.size``)."""
    if not world.distributed:
        return rows, [len(rows)]
    sizes = [int(n) for n in gather(len(rows), world)]
    most = max(sizes)
    if most == 0:
        return rows, sizes
    padded = torch.cat([rows, rows.new_zeros((most - len(rows), *rows.shape[1:]))])
    stacked = _GatherWithGradients.apply(padded, world.rank, world.size)
    return torch.cat([stacked[r, :n] for r, n in enumerate(sizes)]), sizes


class _GatherWithGradients(torch.autograd.Function):
    """all_gather whose backward sums the gradients over ranks and keeps this rank's."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        ctx.rank = rank
        out = [torch.empty_like(rows) for _ in range(size)]
        dist.all_gather(out, rows.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank], None, None


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (also inside dicts, lists, tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name} is {value!r}; it must be an integer."
        ) from None
