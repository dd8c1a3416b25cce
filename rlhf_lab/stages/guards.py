"""`NonFiniteGuard`: no optimiser step ever applies a NaN or infinite gradient.

A NaN loss (a log of zero, a reward that slipped through, an fp overflow) gives NaN gradients, and
one AdamW step with them turns every weight it touches into NaN for good. The guard looks at the
gradients of the optimiser's parameters just before each step (`on_before_optimizer_step`, which
Lightning calls in automatic optimisation and also when a manual-optimisation stage such as
`OnlineRL` calls `optimizer.step()` itself), and when any is not finite it either

- `mode="skip"` (the default of `trainer.on_nonfinite`): drops every gradient of that optimiser
  (`grad = None`), so AdamW leaves the weights and its moment estimates exactly as they were, counts
  the step, and logs the count as `train/skipped_steps`; or
- `mode="stop"`: raises `NonFiniteError` naming the trainer's global step and the first parameter
  whose gradient is not finite.

Under `16-mixed` precision Lightning's GradScaler already skips a step whose gradients overflowed
and lowers its loss scale, which is how fp16 training is meant to run; the guard leaves those
steps to the scaler. The decision is reduced over ranks, so every process skips (or stops) together.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from rlhf_lab.checks import check_choice
from rlhf_lab.distributed import local
from rlhf_lab.errors import NonFiniteError

__all__ = ["NONFINITE_MODES", "NonFiniteGuard"]

NONFINITE_MODES = ("skip", "stop")


def _params(optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class NonFiniteGuard(Callback):
    """Skip (and count) or stop on an optimiser step whose gradients hold NaN or inf; see the module docstring.

    `skipped_steps` counts the skipped steps of this fit; it is saved in Lightning checkpoints, so
    a resumed run goes on counting.
    """

    def __init__(self, mode: str = "skip"):
        check_choice("on_nonfinite", mode, NONFINITE_MODES)
        self.mode = mode
        self.skipped_steps = 0
        self._names: dict[int, str] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After every optimiser step of the batch (an online iteration takes several); logged every
        # batch, 0 until a step is skipped, so the column is in every run's metrics.
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16: the GradScaler skips overflowing steps itself (see the module docstring)
        grads = [(p, p.grad) for p in _params(optimizer) if p.grad is not None]
        finite = all(bool(torch.isfinite(local(g)).all()) for _, g in grads)  # this rank's shard
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        if self.mode == "stop":
            raise NonFiniteError(self._message(trainer, grads))
        for p in _params(optimizer):
            p.grad = None  # AdamW skips a parameter without a gradient: no weight, moment or step changes
        self.skipped_steps += 1

    def _message(self, trainer, grads: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> str:
        bad = [(p, local(g)) for p, g in grads if not bool(torch.isfinite(local(g)).all())]
        where = "on another rank"
        if bad:
            p, g = bad[0]
            name = self._names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
            kinds = "nan" if bool(torch.isnan(g).any()) else "inf"
            where = f"first in parameter '{name}' ({kinds}; {len(bad)} of {len(grads)} gradients are not finite)"
        return (f"non-finite gradient at step {trainer.global_step}, {where}; the loss or a reward was "
                "probably NaN or inf. trainer.on_nonfinite: skip skips such updates instead")

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
