"""Data-parallel training plumbing shared by every ``torchfpi train`` command.

Under ``torchrun --nproc_per_node N`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), :func:`setup` joins the process group (gloo on CPU, nccl on
CUDA); without them it returns a single-process context, so the same command runs either way.

Fixed-point layers work inside ``DistributedDataParallel`` as they are: the backward FPI's inner
``torch.autograd.grad`` calls never accumulate into ``.grad`` (they only differentiate the layer's
own recorded graph), and each parameter's gradient reaches it once, through the layer's node, so
DDP's reducer sees every parameter exactly once per backward.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates on test data and writes checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op when single-process)."""
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the processes (returns a new tensor)."""
        if not self.distributed:
            return t
        out = t.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def reduce_mean(self, values: Dict[str, float], weight: float = 1.0) -> Dict[str, float]:
        """Weighted mean of scalar metrics over the processes (``weight``: e.g. samples seen)."""
        if not self.distributed:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64, device=self.device)
        t = self.all_reduce_sum(t)
        return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}

    def shard(self, n: int, *, epoch: int, seed: int, shuffle: bool = True) -> Tensor:
        """This process's indices of an ``n``-sample epoch: a seeded permutation (same on every
        process), cut into ``world_size`` interleaved shards (``rank::world_size``).

        With one process this is the plain (shuffled) order, so a single-process run and an
        N-process run see the same global batches in the same order.
        """
        if shuffle:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world_size]


def setup(device: Optional[torch.device] = None) -> DistContext:
    """Join the process group if launched by ``torchrun`` with ``WORLD_SIZE > 1``.

    Args:
        device: the device asked for on the command line; on CUDA each process takes
            ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device or torch.device("cpu"))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device is not None and device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device or torch.device("cpu"))


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` in a distributed run, else ``model`` itself."""
    if not ctx.distributed:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for checkpoints and evaluation)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def session(device: Optional[torch.device] = None) -> Iterator[DistContext]:
    """:func:`setup`, then :func:`teardown` at the end: with the barrier on a normal exit,
    without it when the body raises (a peer may never reach the barrier).

    Example:
        >>> with session() as ctx:
        ...     ctx.world_size
        1
    """
    ctx = setup(device)
    try:
        yield ctx
    except BaseException:
        teardown(ctx, sync=False)
        raise
    teardown(ctx)


def teardown(ctx: DistContext, sync: bool = True) -> None:
    """Leave the process group.

    With ``sync`` (the normal end of a run) every process first waits at a barrier: a process
    that destroys its gloo group while a peer still exchanges messages can make that peer abort
    (SIGABRT, "terminate called without an active exception"). Pass ``sync=False`` on an error
    path, where a peer may never reach the barrier.
    """
    if ctx.distributed and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
