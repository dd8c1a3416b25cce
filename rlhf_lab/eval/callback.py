"""`EvalCallback`: run `evaluate_policy` on a fixed prompt set during training and log the results.

Any stage that holds its policy as `self.policy` (Pretrain, SFT, OnlineRL, DPO, ...) can take it:

    trainer = L.Trainer(..., callbacks=[EvalCallback(task.eval_prompts(), every_n_steps=50,
                                                     reward_fn=reward, gold_fn=gold)])

Every `every_n_steps` trainer steps (and at the end of training, and optionally at its start) the
callback generates on the prompts, logs the `val/` metrics of DESIGN.md to every logger at
`trainer.global_step`, and writes the sample rows as a table: `WandbLogger.log_table(table_name,
...)` for wandb, and rows appended to `<log_dir>/<table_name>.csv` for loggers with a folder
(CSVLogger, TensorBoardLogger). `history` keeps one `{"step": ..., **metrics}` dict per evaluation.
"""

from __future__ import annotations

import csv
import inspect
import os
from collections.abc import Sequence

import lightning as L
import torch

from rlhf_lab.eval.metrics import EvalResult, RewardFn, evaluate_policy
from rlhf_lab.policy import Policy

__all__ = ["EvalCallback"]

# Arguments of evaluate_policy that the callback fills in itself.
_OWN_ARGS = {"policy", "prompts", "reward_fn", "gold_fn", "reference", "references", "max_new_tokens", "max_rows"}


class EvalCallback(L.Callback):
    """Evaluate `pl_module.policy` with `evaluate_policy` every `every_n_steps` trainer steps.

    Args:
        prompts: the fixed evaluation prompt set.
        every_n_steps: evaluate when `trainer.global_step` reaches a multiple of this. Stages with
            manual optimisation (OnlineRL, ...) advance `global_step` once per optimiser step, so
            one training batch can move it by several; the callback then evaluates after the batch
            during which a multiple was reached, and logs at the `global_step` it sees. 0 turns
            the periodic evaluation off (only `at_start` / `at_end`).
        reward_fn, gold_fn, reference, references, max_new_tokens, max_rows: passed to
            `evaluate_policy` (`val/reward`, `val/gold_reward`, `val/win_rate`, `val/rouge*` and
            `val/perplexity`; the rows kept for the table).
        table_name: wandb table key and CSV file stem (`<log_dir>/<table_name>.csv`).
        at_start: also evaluate once when training starts (the starting point of the curves).
        at_end: also evaluate when training ends (skipped if that step was just evaluated).
        **evaluate_kwargs: any other `evaluate_policy` argument (`greedy`, `temperature`,
            `samples_per_prompt`, `batch_size`, `generator`, ...).

    Every rank evaluates (so sharded strategies keep their collectives in step); only global
    rank zero logs and writes files. The module is switched to eval mode under `torch.no_grad()`
    and every submodule's own train/eval flag is restored afterwards (a frozen reference copy
    stays in eval); the global RNG state is forked, so sampled evaluation does not change the
    training run's random stream.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        every_n_steps: int = 50,
        reward_fn: RewardFn | None = None,
        gold_fn: RewardFn | None = None,
        reference: Policy | None = None,
        references: Sequence[str] | None = None,
        max_new_tokens: int = 16,
        max_rows: int | None = 16,
        table_name: str = "samples",
        at_start: bool = False,
        at_end: bool = True,
        **evaluate_kwargs,
    ):
        super().__init__()
        prompts = list(prompts)
        if not prompts:
            raise ValueError("EvalCallback needs at least one prompt")
        if references is not None and len(references) != len(prompts):
            raise ValueError(f"got {len(references)} references for {len(prompts)} prompts")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at_start/at_end), got {every_n_steps}")
        if reference is not None and reward_fn is None and evaluate_kwargs.get("win_judge") is None:
            raise ValueError("val/win_rate judges the two completions with win_judge (default reward_fn); "
                             "pass one of them with reference")
        if not table_name or os.sep in table_name or (os.altsep and os.altsep in table_name):
            raise ValueError(f"table_name must be a plain file stem, got {table_name!r}")
        accepted = set(inspect.signature(evaluate_policy).parameters) - _OWN_ARGS
        unknown = sorted(set(evaluate_kwargs) - accepted)
        if unknown:
            raise TypeError(f"unknown evaluate_policy argument(s) {unknown}; accepted: {sorted(accepted)}")
        self.prompts = prompts
        self.every_n_steps = every_n_steps
        self.reward_fn, self.gold_fn, self.reference = reward_fn, gold_fn, reference
        self.references = None if references is None else list(references)
        self.max_new_tokens, self.max_rows = max_new_tokens, max_rows
        self.table_name = table_name
        self.at_start, self.at_end = at_start, at_end
        self.evaluate_kwargs = evaluate_kwargs
        self.history: list[dict] = []  # {"step": global_step, **val metrics}, one per evaluation
        self.last_result: EvalResult | None = None
        self._last_eval_step: int | None = None
        self._prev_step = 0

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prev_step = trainer.global_step
        if self.at_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, prev = trainer.global_step, self._prev_step
        self._prev_step = step
        n = self.every_n_steps
        # A multiple of n was reached during this batch (global_step may move by more than 1).
        if n and step > prev and step // n > prev // n:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> EvalResult | None:
        """Evaluate now and log at `trainer.global_step`; None if this step was already evaluated."""
        step = trainer.global_step
        if step == self._last_eval_step:
            return None
        self._last_eval_step = step
        policy = getattr(pl_module, "policy", None)
        if not isinstance(policy, Policy):
            raise TypeError(f"EvalCallback needs a module with a `policy` (rlhf_lab.Policy); "
                            f"{type(pl_module).__name__} has {type(policy).__name__}")
        modes = [(m, m.training) for m in pl_module.modules()]
        device = pl_module.device
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        pl_module.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                result = evaluate_policy(
                    policy, self.prompts, reward_fn=self.reward_fn, gold_fn=self.gold_fn,
                    reference=self.reference, references=self.references, max_new_tokens=self.max_new_tokens,
                    max_rows=self.max_rows, **self.evaluate_kwargs)
        finally:
            for module, training in modes:
                module.training = training
        self.last_result = result
        self.history.append({"step": step, **result.metrics})
        if trainer.is_global_zero:
            self._log(trainer, step, result)
        return result

    def _log(self, trainer: L.Trainer, step: int, result: EvalResult) -> None:
        from lightning.pytorch.loggers import WandbLogger

        columns, data = result.table()
        for logger in trainer.loggers:
            logger.log_metrics(dict(result.metrics), step=step)
            if not columns:
                continue
            if isinstance(logger, WandbLogger):
                logger.log_table(key=self.table_name, columns=columns, data=data, step=step)
                continue
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                self._append_csv(os.path.join(log_dir, f"{self.table_name}.csv"), step, columns, data)

    @staticmethod
    def _append_csv(path: str, step: int, columns: list[str], data: list[list]) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *columns])
            writer.writerows([step, *row] for row in data)
