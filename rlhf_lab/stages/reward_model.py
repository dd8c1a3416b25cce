"""The reward-model stage: pairwise Bradley–Terry training of a scalar head on any backbone."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf_lab.checks import check_positive
from rlhf_lab.data import PreferenceDataset, preference_collate
from rlhf_lab.losses import bradley_terry_loss
from rlhf_lab.policy import Policy
from rlhf_lab.stages.common import (
    Budget,
    EpochMeans,
    ResumableStage,
    ShardableStage,
    StepBudget,
    adamw,
    check_fits_positions,
    check_micro_batch_size,
    global_mean,
    global_means,
    mean_of_parts,
    micro_batches,
)


@dataclass
class RewardModelConfig:
    """Hyperparameters of reward-model training on `prompt`/`chosen`/`rejected` rows."""

    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimiser steps
    batch_size: int = 32  # pairs per optimiser step
    max_length: int = 128  # tokens per side; longer rows lose the start of the prompt (counted)
    margin: float = 0.0  # required score gap m in -log σ(r_c − r_r − m)
    center_coef: float = 0.0  # weight of the reward-centering penalty (r_c + r_r)²
    micro_batch_size: int | None = None  # pairs per forward/backward pass (memory bound); None = the batch

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("batch_size", self.batch_size)
        check_positive("max_length", self.max_length)
        check_positive("center_coef", self.center_coef, allow_zero=True)
        check_micro_batch_size(self.micro_batch_size)


class RewardModel(StepBudget, ResumableStage, ShardableStage, L.LightningModule):
    """Train `policy.scores` (a scalar head at the last real token) to rank chosen over rejected."""

    config_class = RewardModelConfig

    def __init__(self, policy: Policy, train_rows: list[dict], val_rows: list[dict] | None = None,
                 config: RewardModelConfig | None = None):
        super().__init__()
        policy._require_head("scores")
        self.policy = policy
        self.config = config or RewardModelConfig()
        c = self.config
        check_fits_positions(policy, "max_length", c.max_length)
        self.train_data = PreferenceDataset(train_rows, policy.tokenizer, c.max_length)
        self.val_data = PreferenceDataset(val_rows, policy.tokenizer, c.max_length) if val_rows else None
        self.budget = Budget()
        self._init_resumable()
        self.save_hyperparameters({"stage": "reward_model", **asdict(c)})

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        scores = self.policy.scores(batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = scores.chunk(2)  # the collator puts chosen rows first
        return bradley_terry_loss(chosen, rejected, margin=self.config.margin or None,
                                  center_coef=self.config.center_coef)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = batch["input_ids"].shape[0] // 2
        loss, m = mean_of_parts(micro_batches(self._loss, batch, n, self.config.micro_batch_size, pairs=True), n)
        loss, logged = global_mean(loss, n)  # the mean over the global batch's pairs
        m = global_means({"accuracy": m["accuracy"], "margin": m["margin"]}, n)
        self.budget.count(samples=n)
        self.log("train/loss", logged, prog_bar=True)
        self.log("train/accuracy", m["accuracy"], prog_bar=True)
        self.log("train/reward_margin", m["margin"])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = EpochMeans()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, m = self._loss(batch)
        self._val.add({"val/loss": loss, "val/accuracy": m["accuracy"]}, batch["input_ids"].shape[0] // 2)

    def on_validation_epoch_end(self) -> None:
        for key, value in self._val.means().items():  # over every rank's pairs: no sync_dist
            self.log(key, value, prog_bar=key == "val/accuracy")

    def configure_optimizers(self):
        c = self.config
        return adamw(self.policy.trainable_parameters(), c.lr, c.weight_decay, c.warmup_steps)

    def _loader(self, data: PreferenceDataset, shuffle: bool) -> DataLoader:
        collate = partial(preference_collate, pad_token_id=self.policy.tokenizer.pad_token_id)
        return self.make_loader(data, self.config.batch_size, shuffle, collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_data is None else self._loader(self.val_data, shuffle=False)
