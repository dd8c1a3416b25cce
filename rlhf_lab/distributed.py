"""Sums, maxima and broadcasts across the processes of a run: the one door to `torch.distributed`.

Lightning starts the processes and the process group (DDP, FSDP, DeepSpeed all use the default
group); these functions are the identity on one process, so a stage calls them unconditionally
and a one-process run computes exactly what it computed before. Every rank must call them in
the same order (they are collectives).
"""

from __future__ import annotations

import torch

__all__ = ["all_max", "all_sum", "broadcast", "collective_device", "full_state_dict", "gathered", "local", "rank",
           "shard_model", "sharded_units", "world_size"]


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


# --------------------------------------------------------------------------- sharding (FSDP2)


def shard_model(model: torch.nn.Module, mesh) -> None:
    """Shard `model`'s parameters over `mesh` with FSDP2 (`torch.distributed.fsdp.fully_shard`):
    each transformer block (a class the model names in `_no_split_modules`, as Hugging Face models
    do) is one unit, gathered for its own forward and backward, and the rest of the model (the
    embeddings, the final norm, the LM head) is the root unit. A small module whose forward is
    called (a value head) is one unit."""
    from torch.distributed.fsdp import fully_shard

    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in block_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def sharded_units(module: torch.nn.Module) -> list:
    """The FSDP2 units inside `module` (empty when nothing is sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def full_state_dict(module: torch.nn.Module) -> dict:
    """The state dict of a sharded `module` with every tensor whole, on the CPU, on rank 0 (empty
    on the others). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: its shard of a sharded tensor (DTensor), else `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class gathered:  # noqa: N801  (a context manager, used like a function)
    """Within the block, every FSDP2 unit of `module` holds its full parameters (one all-gather per
    unit on entry, on every rank) and its forwards communicate nothing; on exit they are sharded
    again. Generation uses it: each rank then decodes as many tokens as its own rows need, without
    keeping the others in step. The identity when nothing in `module` is sharded."""

    def __init__(self, module: torch.nn.Module):
        self.units = sharded_units(module)

    def __enter__(self):
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        return self

    def __exit__(self, *exc) -> None:
        for unit in self.units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
