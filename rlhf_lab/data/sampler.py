"""A shuffling sampler whose order is a function of (seed, epoch), so a run can resume mid-epoch.

`torch.utils.data.RandomSampler` draws each epoch's order from the global random stream when
its iterator is created, which ties the data order to everything else that draws from that
stream and makes a checkpoint's position meaningless. `ResumableSampler` shuffles epoch `e`
with its own generator seeded from `(seed, e)`; Lightning calls `set_epoch` before each epoch.
`skip(epoch, n)` makes the next pass over `epoch` start after its first `n` indices: that is how a
resumed run goes on from the batch after its checkpoint (see `rlhf_lab.runs.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


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
