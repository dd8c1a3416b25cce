"""Samplers whose order is a function of (seed, epoch), so a run can resume mid-epoch, sharded
over the ranks of a multi-process run so that batch sizes are global.

`torch.utils.data.RandomSampler` draws each epoch's order from the global random stream when
its iterator is created, which ties the data order to everything else that draws from that
stream and makes a checkpoint's position meaningless. `ResumableSampler` shuffles epoch `e`
with its own generator seeded from `(seed, e)`; Lightning calls `set_epoch` before each epoch.
`skip(epoch, n)` makes the next pass over `epoch` start after its first `n` indices: that is how a
resumed run goes on from the batch after its checkpoint (see `rlhf_lab.runs.checkpoint`).

`GlobalBatchSampler` cuts that one order into global batches of `batch_size` rows and gives each
of `world_size` ranks its contiguous share of every batch (sizes differ by at most one). So the
union of the ranks' k-th batches is the k-th batch of a one-process run with the same seed: 1
process and N ranks see the same data in the same steps. Lightning's own distributed sampler
would instead deal each rank every N-th index of a per-rank batch size; runs built here set
`use_distributed_sampler=False`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["GlobalBatchSampler", "ResumableSampler", "shard_bounds"]

log = logging.getLogger(__name__)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """`[start, end)` of rank `rank`'s contiguous share of `n` items; the first `n % world_size`
    ranks take one more (the split of `torch.tensor_split`)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ResumableSampler(Sampler[int]):
    """Indices 0..n-1 in an order set by (`seed`, epoch): shuffled, or in order (`shuffle=False`).

    `len()` is always n (a full epoch), so Lightning counts an epoch's batches the same before and
    after a resume; a skipped start only makes the resumed pass end sooner.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, indices to skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, epoch: int, n: int) -> None:
        """Start the next pass over `epoch` after its first `n` indices (once)."""
        self._skip = (int(epoch), int(n))

    def order(self, epoch: int) -> list[int]:
        """The full order of `epoch`."""
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
            self._skip = None
        return iter(order)

    def __len__(self) -> int:
        return self.n


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch of a `ResumableSampler` order (a batch sampler).

    Args:
        n: dataset size. batch_size: rows per global batch (all ranks together).
        seed, shuffle: the order (`ResumableSampler`). drop_last: drop a short last batch.
        rank, world_size: this process's place in the run.
        even: training (True) needs every rank to take part in every step (a rank without a
            batch would leave the others waiting in the gradient all-reduce), so a batch with
            fewer rows than ranks is dropped, counted in the log. Evaluation (False) keeps every
            row: such a batch joins the one before it (the means are weighted by rows anyway).
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, even: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        # `sampler` by name: Lightning sets the epoch of a batch sampler's `.sampler` each epoch.
        self.sampler = ResumableSampler(n, seed, shuffle)
        self.batch_size, self.drop_last = int(batch_size), drop_last
        self.rank, self.world_size, self.even = rank, world_size, even
        self._skip: tuple[int, int] | None = None  # (epoch, global batches to skip)
        self._reported = False

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip(self, epoch: int, batches: int) -> None:
        """Start the next pass over `epoch` after its first `batches` batches (once)."""
        self._skip = (int(epoch), int(batches))

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of `epoch`, as the rows a one-process run would take."""
        order = self.sampler.order(epoch)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if batches and (self.drop_last and len(batches[-1]) < self.batch_size
                        or self.even and len(batches[-1]) < self.world_size):
            batches.pop()
        elif len(batches) > 1 and len(batches[-1]) < self.world_size:
            # Evaluation keeps every row: a last batch too short for every rank joins the one before,
            # so every rank runs the same number of batches (a sharded model needs them all in step).
            batches[-2:] = [batches[-2] + batches[-1]]
        return batches

    def _dropped_rows(self) -> int:
        kept = sum(len(b) for b in self.global_batches(self.epoch))
        return self.sampler.n - kept

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        if not self.drop_last and not self._reported and (dropped := self._dropped_rows()):
            self._reported = True
            log.info("%d row(s) of the last batch are left out of each epoch: fewer than the %d ranks",
                     dropped, self.world_size)
        if self._skip is not None and self._skip[0] == self.epoch:
            batches = batches[self._skip[1]:]
            self._skip = None
        for batch in batches:
            start, end = shard_bounds(len(batch), self.rank, self.world_size)
            if end > start:
                yield batch[start:end]

    def __len__(self) -> int:
        batches = self.global_batches(self.epoch)
        if self.even:
            return len(batches)
        return sum(shard_bounds(len(b), self.rank, self.world_size)[1]
                   > shard_bounds(len(b), self.rank, self.world_size)[0] for b in batches)
