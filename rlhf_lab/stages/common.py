"""Small helpers shared by the stages: the optimiser, budget counters, resumable data and state,
the hand-off callback."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from rlhf_lab.checks import check_positive
from rlhf_lab.data.sampler import GlobalBatchSampler
from rlhf_lab.distributed import all_max, all_sum, collective_device, world_size

__all__ = ["Budget", "EpochMeans", "ResumableStage", "SavePolicy", "ShardableStage", "StepBudget", "adamw",
           "adamw_optimizer", "check_fits_positions", "check_micro_batch_size", "global_mean", "global_means",
           "mean_of_parts", "micro_batches"]


def adamw_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, its fused kernel where every parameter allows it (plain floating-point
    tensors on CPU or CUDA), else the default implementation (sharded DTensors, other devices).

    The same update rule either way. On CPU the default runs a loop of small ops per parameter:
    18 ms a step for the benchmark's 3.7M parameters, against 6 ms fused."""
    groups = list(params)
    flat = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fusable = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
                  and p.is_floating_point() for p in flat)
    if fusable:
        try:
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # a torch without fused AdamW for this device
            pass
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def adamw(params, lr: float, weight_decay: float, warmup_steps: int = 0):
    """AdamW (`adamw_optimizer`) with an optional linear warm-up; returns Lightning's optimiser
    config dict."""
    optimizer = adamw_optimizer(params, lr=lr, weight_decay=weight_decay)
    if warmup_steps <= 0:
        return optimizer
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def check_fits_positions(policy, field: str, length: int) -> None:
    """Fail at construction, naming `config.<field>`, when rows of `length` tokens exceed the
    model's position table (the forward pass would otherwise die with an index error)."""
    positions = getattr(policy.model.config, "max_position_embeddings", None)
    if positions and length > positions:
        raise ValueError(f"config.{field} = {length} is longer than the model's {positions} positions "
                         f"(use a model with more positions, e.g. n_positions / max_position_embeddings "
                         f"in its config, or a shorter {field})")


def global_mean(loss: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor]:
    """For `loss`, a mean over this rank's `n` items (rows, pairs or tokens): the loss to
    backpropagate and the mean over every rank's items, to log.

    DDP averages gradients over the W ranks, so rank r backpropagates loss_r · n_r · W / N
    (N = Σ n_r): the update is the gradient of Σ_r loss_r · n_r / N, the mean over the global
    batch, however unevenly it is split. On one process both are `loss` itself.
    """
    w = world_size()
    if w == 1:
        return loss, loss.detach()
    n_local = torch.as_tensor(n, dtype=torch.float64, device=loss.device)
    n_global = all_sum(n_local)
    scale = (n_local * w / n_global).to(loss.dtype)
    return loss * scale, (all_sum(loss.detach().double() * n_local) / n_global).to(loss.dtype)


def global_means(values: dict[str, torch.Tensor | float], n) -> dict[str, float]:
    """Means over the global batch of per-rank means over `n` items (one all-reduce); on one
    process the values themselves."""
    if world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = list(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    n_local = torch.tensor([float(n)], dtype=torch.float64)
    sums = all_sum(torch.cat([local * n_local, n_local]).to(collective_device())).cpu().tolist()
    return {k: sums[i] / sums[-1] if sums[-1] else 0.0 for i, k in enumerate(keys)}


class EpochMeans:
    """n-weighted sums of metric values over an epoch's batches, for exact means over the whole
    epoch on every rank (a short last batch weighs what its rows weigh, not a full batch's)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0.0

    def add(self, values: dict[str, torch.Tensor | float], n) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * float(n)
        self.n += float(n)

    def means(self) -> dict[str, float]:
        """Means over every rank's rows (one all-reduce; every rank calls it); {} if no row."""
        keys = sorted(self.sums)
        totals = all_sum(torch.tensor([*(self.sums[k] for k in keys), self.n], dtype=torch.float64)
                         .to(collective_device())).cpu().tolist()
        if totals[-1] == 0:
            return {}
        return {k: totals[i] / totals[-1] for i, k in enumerate(keys)}


class Budget:
    """Counters for the budget axes logged beside every metric (`budget/*` in DESIGN.md)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.samples = 0
        self.generated_tokens = 0
        self.reward_calls = 0
        self.optimizer_steps = 0

    def count(self, **increments: float) -> dict[str, int]:
        """Add this rank's `samples`, `generated_tokens`, `reward_calls`: the counters are global
        sums over every rank (one all-reduce; a collective, so every rank calls it). Returns the
        global increments."""
        keys = list(increments)
        if world_size() > 1:
            local = torch.tensor([float(increments[k]) for k in keys], dtype=torch.float64)
            totals = all_sum(local.to(collective_device())).cpu().tolist()
            increments = {k: int(round(v)) for k, v in zip(keys, totals, strict=True)}
        for key, value in increments.items():
            setattr(self, key, getattr(self, key) + int(value))
        return {k: int(v) for k, v in increments.items()}

    def state_dict(self) -> dict:
        return {"samples": self.samples, "generated_tokens": self.generated_tokens,
                "reward_calls": self.reward_calls, "optimizer_steps": self.optimizer_steps,
                "seconds": time.perf_counter() - self.start}

    def load_state_dict(self, state: dict) -> None:
        for key in ("samples", "generated_tokens", "reward_calls", "optimizer_steps"):
            setattr(self, key, state[key])
        self.start = time.perf_counter() - state["seconds"]  # seconds go on from the checkpoint's

    def metrics(self) -> dict[str, float]:
        return {
            "budget/samples": float(self.samples),
            "budget/generated_tokens": float(self.generated_tokens),
            "budget/reward_calls": float(self.reward_calls),
            "budget/optimizer_steps": float(self.optimizer_steps),
            "budget/seconds": time.perf_counter() - self.start,
        }


class ShardableStage:
    """Mixed into every stage (before `LightningModule`): under `trainer.strategy: fsdp2`
    (Lightning's `ModelParallelStrategy`), Lightning calls `configure_model` on every rank once
    the processes are connected, and the stage shards its policy over the data-parallel mesh
    (`Policy.shard`). Under any other strategy the module has no device mesh and nothing happens."""

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or self.policy.is_sharded:
            return
        self.policy.shard(mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)


class ResumableStage:
    """What every stage adds to Lightning's checkpoint, and its resumable training data.

    Mixed into each stage's LightningModule (call `_init_resumable()` in `__init__`, after the
    seeded builder has drawn everything before). The training loader shuffles with a
    `GlobalBatchSampler` seeded once from the global random stream, so the data order does not
    depend on what else draws from that stream, and a resumed run starts after the batches its
    checkpoint had done (`resume_data_position`, called by `rlhf_lab.runs.checkpoint.RunState`).
    `stage_state` / `load_stage_state` hold the rest: the budget counters here; stages extend them.
    """

    def _init_resumable(self) -> None:
        self.data_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self._resume_at: tuple[int, int] | None = None

    def make_loader(self, data, batch_size: int, shuffle: bool, collate_fn, drop_last: bool = False) -> DataLoader:
        """A DataLoader of this rank's share of global batches of `batch_size` rows
        (`GlobalBatchSampler`), drawing nothing from the global random stream (its own generator).

        Training loaders (`shuffle=True`) keep every rank in every step; evaluation loaders keep
        every row. A one-process run takes the same batches as a plain `DataLoader`.
        """
        generator = torch.Generator().manual_seed(self.data_seed)
        rank, world = self.rank_and_world()
        sampler = GlobalBatchSampler(len(data), batch_size, self.data_seed, shuffle=shuffle, drop_last=drop_last,
                                     rank=rank, world_size=world, even=shuffle)
        if shuffle and self._resume_at is not None:
            sampler.skip(*self._resume_at)
            self._resume_at = None
        return DataLoader(data, batch_sampler=sampler, collate_fn=collate_fn, generator=generator)

    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size) of the run this stage trains in; (0, 1) outside a Trainer."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def resume_data_position(self, epoch: int, batches_done: int) -> None:
        """The next training loader starts epoch `epoch` after its first `batches_done` batches."""
        self._resume_at = (epoch, batches_done)

    def stage_state(self) -> dict:
        return {"budget": self.budget.state_dict(), "data_seed": self.data_seed}

    def load_stage_state(self, state: dict) -> None:
        self.budget.load_state_dict(state["budget"])
        self.data_seed = state["data_seed"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stage_state"] = self.stage_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_stage_state(checkpoint["stage_state"])


def check_micro_batch_size(value) -> None:
    """`micro_batch_size` is None (one pass per batch) or a positive number of rows (pairs)."""
    if value is not None:
        check_positive("micro_batch_size", value)


def micro_batches(fn, batch: dict, n: int, size: int | None, pairs: bool = False) -> list[tuple[int, object]]:
    """`fn(part)` over parts of at most `size` rows of `batch` (or, with `pairs`, `size` pairs:
    rows i and n + i of a chosen-then-rejected batch of n pairs); returns (rows of the part, fn's
    output) for each part.

    With `size` set and below n, each part runs under activation checkpointing: the forward keeps
    only the part's inputs and outputs, and the backward recomputes one part at a time, so the
    memory of a step is one part's activations however large the batch, for one more forward of
    compute. The parts' outputs add up to the whole batch's (a loss summed over rows, then divided
    once): the update is the one-pass update, to float rounding.
    """
    if size is None:
        return [(n, fn(batch))]
    from torch.utils.checkpoint import checkpoint

    def part(items: torch.Tensor) -> dict:
        rows = torch.cat([items, items + n]) if pairs else items
        # A per-row tensor (2n rows of a pair batch), or a per-pair one (n rows: e.g. its index).
        return {k: v[(items if pairs and v.shape[0] == n else rows).to(v.device)] if torch.is_tensor(v) else v
                for k, v in batch.items()}

    parts = -(-n // size)
    most = int(all_max(torch.tensor(parts).to(collective_device())))  # the most of any rank
    if most == 1:
        return [(n, fn(batch))]
    out = [(min(size, n - start), checkpoint(fn, part(torch.arange(start, min(start + size, n))),
                                             use_reentrant=False)) for start in range(0, n, size)]
    # Every rank runs as many parts as the rank with the most: zero-weighted passes over its first
    # row (0 rows, every output times 0, still in the graph), since a sharded strategy gathers each
    # block in every forward and backward, on every rank together.
    for _ in range(parts, most):
        out.append((0, _times_zero(checkpoint(fn, part(torch.arange(1)), use_reentrant=False))))
    return out


def _times_zero(out):
    """`out` (tensors, numbers, and tuples, lists and dicts of them) with every value times 0."""
    if isinstance(out, dict):
        return {k: _times_zero(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_times_zero(v) for v in out)
    return out * 0 if torch.is_tensor(out) or isinstance(out, (int, float)) else out


def mean_of_parts(parts: list[tuple[int, tuple]], n: int) -> tuple[torch.Tensor, dict]:
    """The (loss, metrics) of n rows from the `micro_batches` parts of a function that returns
    (loss, metrics) as means over its rows: the parts' means weighted by their rows."""
    if len(parts) == 1:
        return parts[0][1]
    loss = sum(rows * part_loss for rows, (part_loss, _) in parts) / n
    return loss, {k: sum(rows * m[k] for rows, (_, m) in parts) / n for k in parts[0][1][1]}


class StepBudget:
    """For the automatically optimised stages (mixed in before `LightningModule`): the budget
    counts optimiser steps, not batches (`trainer.accumulate_grad_batches` makes several batches
    one step), and its row is logged after each batch, once that batch's step is counted."""

    def on_before_optimizer_step(self, optimizer) -> None:
        self.budget.optimizer_steps += 1

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.log_dict(self.budget.metrics())


class SavePolicy(Callback):
    """Write the stage's policy as an HF folder (plus the stage's hyperparameters) when fit ends.

    This is how stages hand off: the next stage loads the folder with `Policy.load`.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module) -> None:
        # Every rank: a sharded policy is gathered whole first; rank 0 writes.
        pl_module.policy.save(self.dirpath, extra={"stage_config": dict(pl_module.hparams)},
                              write=trainer.is_global_zero)
