"""GlobalBatchSampler: N ranks take, between them, exactly the batches one process takes."""

import logging

import pytest

from rlhf_lab.data.sampler import GlobalBatchSampler, ResumableSampler, shard_bounds


def _epoch(n, batch_size, world, **kw):
    """Each rank's batches of one epoch, as lists of indices."""
    return [list(GlobalBatchSampler(n, batch_size, seed=7, rank=r, world_size=world, **kw)) for r in range(world)]


def test_shard_bounds_split_like_tensor_split():
    # 10 rows over 3 ranks: 4, 3, 3 (the first 10 % 3 = 1 rank takes one more).
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_global_batch_of_one_process(world):
    (one,) = _epoch(21, 6, 1)
    ranks = _epoch(21, 6, world)
    # One process: the ResumableSampler order cut into batches of 6 (the last one 3 rows).
    order = ResumableSampler(21, 7).order(0)
    assert one == [order[i:i + 6] for i in range(0, 21, 6)]
    # Every rank takes part in every step, and step k's shares, put together, are batch k.
    assert all(len(r) == len(one) for r in ranks)
    for k, batch in enumerate(one):
        assert [i for r in ranks for i in r[k]] == batch
        sizes = [len(r[k]) for r in ranks]
        assert max(sizes) - min(sizes) <= 1


def test_a_last_batch_smaller_than_the_ranks_is_left_out_of_training(caplog):
    caplog.set_level(logging.INFO, logger="rlhf_lab")
    # 13 rows, batches of 4 over 3 ranks: the last batch has 1 row, too few for 3 ranks.
    ranks = _epoch(13, 4, 3)
    assert [len(r) for r in ranks] == [3, 3, 3]
    assert sum(len(b) for r in ranks for b in r) == 12
    assert "1 row(s) of the last batch are left out" in caplog.text
    # Evaluation keeps every row and gives every rank as many batches (a sharded model runs each
    # forward on every rank): the 1-row last batch joins the one before, rows 8..12 over 3 ranks.
    evaluation = _epoch(13, 4, 3, shuffle=False, even=False)
    assert sorted(i for r in evaluation for b in r for i in b) == list(range(13))
    assert [len(r) for r in evaluation] == [3, 3, 3]
    assert [r[-1] for r in evaluation] == [[8, 9], [10, 11], [12]]


def test_skip_resumes_after_the_batches_done_on_every_rank():
    full = _epoch(24, 4, 2)
    for rank in range(2):
        sampler = GlobalBatchSampler(24, 4, seed=7, rank=rank, world_size=2)
        sampler.skip(0, 2)
        assert list(sampler) == full[rank][2:]
        assert list(sampler) == full[rank]  # once: the next pass is whole again


def test_drop_last_and_epochs():
    sampler = GlobalBatchSampler(10, 4, seed=7, drop_last=True)
    assert [len(b) for b in sampler] == [4, 4]
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and len(sampler) == 2


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        GlobalBatchSampler(10, 4, seed=0, rank=2, world_size=2)


def test_lightning_reshuffles_every_epoch():
    """Through a real Trainer: Lightning sets the epoch of a batch sampler's `.sampler`, so every
    epoch of a stage's loader is that epoch's order, not the first one again."""
    import lightning as L
    import torch

    from rlhf_lab.stages.common import ResumableStage

    class Recorder(ResumableStage, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self._init_resumable()
            self.seen = []

        def train_dataloader(self):
            return self.make_loader(list(range(8)), 4, True, torch.tensor)

        def training_step(self, batch, batch_idx):
            self.seen.extend(batch.tolist())
            return self.layer(batch.float()[:, None]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    module = Recorder()
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)
    epochs = [module.seen[i:i + 8] for i in range(0, 24, 8)]
    assert epochs == [ResumableSampler(8, module.data_seed).order(e) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
