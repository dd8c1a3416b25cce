"""Sums, maxima and broadcasts across the processes of a run: the one door to `torch.distributed`.

Lightning starts the processes and the process group (DDP, FSDP, DeepSpeed all use the default
group); these functions are the identity on one process, so a stage calls them unconditionally
and a one-process run computes exactly what it computed before. Every rank must call them in
the same order (they are collectives).
"""

from __future__ import annotations

import torch

__all__ = ["all_max", "all_sum", "broadcast", "collective_device", "rank", "world_size"]


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the run (1 without a process group)."""
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if _active() else 0


def _reduce(x: torch.Tensor | float, op) -> torch.Tensor:
    x = torch.as_tensor(x)
    if world_size() == 1:
        return x.detach().clone()
    out = x.detach().clone()
    torch.distributed.all_reduce(out, op=op)
    return out


def all_sum(x: torch.Tensor | float) -> torch.Tensor:
    """`x` summed over every rank (a new tensor, never part of the autograd graph)."""
    return _reduce(x, torch.distributed.ReduceOp.SUM if _active() else None)


def all_max(x: torch.Tensor | float) -> torch.Tensor:
    """The largest `x` of every rank (a new tensor)."""
    return _reduce(x, torch.distributed.ReduceOp.MAX if _active() else None)


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `x` on every rank (same shape and dtype on every rank)."""
    if world_size() == 1:
        return x
    out = x.detach().clone()
    torch.distributed.broadcast(out, src=src)
    return out


def collective_device() -> torch.device:
    """Where collectives' tensors must live: the current CUDA device under NCCL, else the CPU."""
    if world_size() > 1 and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
