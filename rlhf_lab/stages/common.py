"""Small helpers shared by the stages: the optimiser, budget counters, the hand-off callback."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["Budget", "SavePolicy", "adamw", "check_fits_positions"]


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

    def metrics(self) -> dict[str, float]:
        return {
            "budget/samples": float(self.samples),
            "budget/generated_tokens": float(self.generated_tokens),
            "budget/reward_calls": float(self.reward_calls),
            "budget/optimizer_steps": float(self.optimizer_steps),
            "budget/seconds": time.perf_counter() - self.start,
        }


class SavePolicy(Callback):
    """Write the stage's policy as an HF folder (plus the stage's hyperparameters) when fit ends.

    This is how stages hand off: the next stage loads the folder with `Policy.load`.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.policy.save(self.dirpath, extra={"stage_config": dict(pl_module.hparams)})
