"""Small helpers shared by the stages: the optimiser, budget counters, resumable data and state,
the hand-off callback."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from rlhf_lab.data.sampler import ResumableSampler

__all__ = ["Budget", "ResumableStage", "SavePolicy", "adamw", "check_fits_positions"]


def adamw(params, lr: float, weight_decay: float, warmup_steps: int = 0):
    """AdamW with an optional linear warm-up; returns Lightning's optimiser config dict."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
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


class Budget:
    """Counters for the budget axes logged beside every metric (`budget/*` in DESIGN.md)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.samples = 0
        self.generated_tokens = 0
        self.reward_calls = 0
        self.optimizer_steps = 0

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


class ResumableStage:
    """What every stage adds to Lightning's checkpoint, and its resumable training data.

    Mixed into each stage's LightningModule (call `_init_resumable()` in `__init__`, after the
    seeded builder has drawn everything before). The training loader shuffles with a
    `ResumableSampler` seeded once from the global random stream, so the data order does not
    depend on what else draws from that stream, and a resumed run starts after the batches its
    checkpoint had done (`resume_data_position`, called by `rlhf_lab.runs.checkpoint.RunState`).
    `stage_state` / `load_stage_state` hold the rest: the budget counters here; stages extend them.
    """

    def _init_resumable(self) -> None:
        self.data_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self._resume_at: tuple[int, int] | None = None

    def make_loader(self, data, batch_size: int, shuffle: bool, collate_fn, drop_last: bool = False) -> DataLoader:
        """A DataLoader that draws nothing from the global random stream (its own generator)."""
        generator = torch.Generator().manual_seed(self.data_seed)
        if not shuffle:
            return DataLoader(data, batch_size=batch_size, collate_fn=collate_fn, drop_last=drop_last,
                              generator=generator)
        sampler = ResumableSampler(len(data), self.data_seed)
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            sampler.skip(epoch, batches * batch_size)
            self._resume_at = None
        return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          drop_last=drop_last, generator=generator)

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


class SavePolicy(Callback):
    """Write the stage's policy as an HF folder (plus the stage's hyperparameters) when fit ends.

    This is how stages hand off: the next stage loads the folder with `Policy.load`.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.policy.save(self.dirpath, extra={"stage_config": dict(pl_module.hparams)})
