"""Language-modelling stages: `Pretrain` (every token) and `SFT` (completion tokens only).

Both minimise the masked next-token NLL (`rlhf_lab.losses.lm_loss`); they differ only in the data
they build: packed blocks of a text corpus, or prompt/completion pairs whose prompt tokens are
masked out of the loss.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from rlhf_lab.checks import check_positive
from rlhf_lab.data import PackedTextDataset, SFTDataset, pad_collate
from rlhf_lab.losses import lm_loss
from rlhf_lab.losses.masked import masked_sum
from rlhf_lab.policy import Policy, first_scored_column
from rlhf_lab.stages.common import (
    Budget,
    ResumableStage,
    ShardableStage,
    StepBudget,
    adamw,
    check_fits_positions,
    check_micro_batch_size,
    global_mean,
    micro_batches,
)


@dataclass
class PretrainConfig:
    """Hyperparameters of LM pretraining on packed blocks of text."""

    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimiser steps
    batch_size: int = 32  # blocks per optimiser step
    block_size: int = 64  # tokens per block
    micro_batch_size: int | None = None  # rows per forward/backward pass (memory bound); None = the batch

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("batch_size", self.batch_size)
        check_positive("block_size", self.block_size)
        check_micro_batch_size(self.micro_batch_size)


@dataclass
class SFTConfig:
    """Hyperparameters of supervised fine-tuning on prompt/completion pairs."""

    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimiser steps
    batch_size: int = 32  # pairs per optimiser step
    max_length: int = 128  # tokens per row; longer rows lose the start of the prompt (counted)
    micro_batch_size: int | None = None  # rows per forward/backward pass (memory bound); None = the batch

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("batch_size", self.batch_size)
        check_positive("max_length", self.max_length)
        check_micro_batch_size(self.micro_batch_size)


class LanguageModeling(StepBudget, ResumableStage, ShardableStage, L.LightningModule):
    """Masked next-token NLL on a dataset of `input_ids`/`attention_mask`/`loss_mask` rows."""

    def __init__(self, policy: Policy, train_data: Dataset, val_data: Dataset | None, config):
        super().__init__()
        self.policy = policy
        self.config = config
        self.train_data, self.val_data = train_data, val_data
        self.budget = Budget()
        self._init_resumable()
        self.save_hyperparameters({"stage": type(self).__name__.lower(), **asdict(config)})

    def _targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logprobs, mask)` of the target tokens, both (B, T)."""
        # loss_mask marks target tokens; column 0 has no context, so it never counts.
        mask = batch["loss_mask"].clone()
        mask[:, 0] = 0
        # The LM head runs only from the first target column (an SFT batch's prompts cost none).
        logprobs = self.policy.logprobs(batch["input_ids"], batch["attention_mask"],
                                        start=first_scored_column(mask))  # (B, T)
        return logprobs, mask

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = batch["input_ids"].shape[0]
        if self.config.micro_batch_size is None:
            logprobs, mask = self._targets(batch)
            loss, _ = lm_loss(logprobs, mask)
            tokens = mask.sum()
        else:  # lm_loss's token mean, summed over parts (see micro_batches)
            parts = micro_batches(self._nll_and_tokens, batch, n, self.config.micro_batch_size)
            tokens = sum(t for _, (_, t) in parts)
            loss = sum(nll for _, (nll, _) in parts) / tokens.clamp_min(1)
        # The mean over every target token of the global batch, on any number of ranks.
        loss, logged = global_mean(loss, tokens)
        self.budget.count(samples=batch["input_ids"].shape[0])
        self.log("train/loss", logged, prog_bar=True)
        self.log("train/perplexity", torch.exp(logged))
        return loss

    def _nll_and_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs, mask = self._targets(batch)
        return masked_sum(-logprobs, mask), mask.sum()

    # Validation: `val/loss` is the token-level mean NLL over every target token of the whole
    # validation set and `val/perplexity` = exp(val/loss). Summing NLLs and counts across batches
    # (and ranks) and dividing once keeps a short last batch from weighing as much as a full
    # one, which a mean of per-batch means would do.
    def on_validation_epoch_start(self) -> None:
        self._val_nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logprobs, mask = self._targets(batch)
        self._val_nll += masked_sum(-logprobs.double(), mask)
        self._val_tokens += mask.double().sum()

    def on_validation_epoch_end(self) -> None:
        nll = self.trainer.strategy.reduce(self._val_nll, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        if float(tokens) == 0:
            return  # no validation batch ran
        loss = (nll / tokens).float()
        self.log("val/loss", loss, prog_bar=True)  # already summed over ranks: no sync_dist
        self.log("val/perplexity", torch.exp(loss))

    def configure_optimizers(self):
        c = self.config
        return adamw(self.policy.trainable_parameters(), c.lr, c.weight_decay, c.warmup_steps)

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        collate = partial(pad_collate, pad_token_id=self.policy.tokenizer.pad_token_id)
        return self.make_loader(data, self.config.batch_size, shuffle, collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_data is None else self._loader(self.val_data, shuffle=False)


class Pretrain(LanguageModeling):
    """Next-token pretraining on a text corpus, packed into blocks of `config.block_size`."""

    config_class = PretrainConfig

    def __init__(self, policy: Policy, train_texts: list[str], val_texts: list[str] | None = None,
                 config: PretrainConfig | None = None):
        config = config or PretrainConfig()
        check_fits_positions(policy, "block_size", config.block_size)
        tok = policy.tokenizer
        train = PackedTextDataset(train_texts, tok, config.block_size)
        val = PackedTextDataset(val_texts, tok, config.block_size) if val_texts else None
        super().__init__(policy, train, val, config)


class SFT(LanguageModeling):
    """Supervised fine-tuning: `prompt + completion + EOS`, loss on completion tokens only."""

    config_class = SFTConfig

    def __init__(self, policy: Policy, train_rows: list[dict], val_rows: list[dict] | None = None,
                 config: SFTConfig | None = None):
        config = config or SFTConfig()
        check_fits_positions(policy, "max_length", config.max_length)
        tok = policy.tokenizer
        train = SFTDataset(train_rows, tok, config.max_length)
        # Validation rows are scored whole (val/perplexity counts every completion token), cut
        # only where the model's position table ends; SFTDataset counts and warns about those.
        val_length = getattr(policy.model.config, "max_position_embeddings", None) or sys.maxsize
        val = SFTDataset(val_rows, tok, val_length) if val_rows else None
        super().__init__(policy, train, val, config)
