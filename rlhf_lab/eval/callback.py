"""`EvalCallback`: the one evaluation path of every run, on a fixed prompt set, during training.

Any stage that holds its policy as `self.policy` (Pretrain, SFT, OnlineRL, DPO, ...) can take it:

    trainer = L.Trainer(..., callbacks=[EvalCallback(task.eval_prompts(), every=50, axis="step",
                                                     reward_fn=reward, gold_fn=gold)])

Each time the training axis (`trainer.global_step`, or the stage's `budget.samples` /
`budget.generated_tokens`) passes a multiple of `every` (and at the end of training, and
optionally at its start) the callback runs `evaluate_policy` on the prompts, logs the `val/`
metrics of DESIGN.md to every logger at `trainer.global_step`, and writes the sample rows as a
table: `WandbLogger.log_table(table_name, ...)` for wandb, and rows appended to
`<log_dir>/<table_name>.csv` for loggers with a folder (CSVLogger, TensorBoardLogger). `history`
keeps one row per evaluation: the step, the budget spent, the training time and the metrics.
With `stop_at` it also ends training once the axis reaches a budget, which is how a comparison
gives every algorithm the same budget and measures all of them the same way.
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import time
from collections.abc import Callable, Sequence

import lightning as L
import torch

from rlhf_lab.eval.metrics import EvalResult, RewardFn, evaluate_policy, gold_accuracy
from rlhf_lab.policy import Policy

__all__ = ["EvalCallback", "AXES"]

# The quantities an evaluation schedule and a stopping budget can be in.
AXES = ("step", "samples", "generated_tokens")

# Arguments of evaluate_policy that the callback fills in itself.
_OWN_ARGS = {"policy", "prompts", "reward_fn", "gold_fn", "reference", "references", "max_new_tokens", "max_rows",
             "generator"}


def default_budget(pl_module: L.LightningModule) -> dict[str, float]:
    """The stage's `Budget` counters (`samples`, `generated_tokens`, `optimizer_steps`); {} without one."""
    budget = getattr(pl_module, "budget", None)
    if budget is None:
        return {}
    return {key: float(getattr(budget, key)) for key in ("samples", "generated_tokens", "optimizer_steps")}


class EvalCallback(L.Callback):
    """Evaluate `pl_module.policy` with `evaluate_policy` each time `axis` passes a multiple of `every`.

    Args:
        prompts: the fixed evaluation prompt set.
        every: evaluate after the training batch during which the axis value reached a multiple
            of `every` (> 0; once per batch even if it passed several; logged at the
            `global_step` seen then). 0 turns the periodic evaluation off (only `at_start` /
            `at_end`).
        axis: what `every` and `stop_at` count: "step" (`trainer.global_step`, i.e. optimiser
            steps: stages with manual optimisation move it by several per batch), "samples" or
            "generated_tokens" (`pl_module.budget.samples` / `.generated_tokens`, the `Budget`
            counters of rlhf_lab.stages.common).
        reward_fn, gold_fn, reference, references, max_new_tokens, max_rows: passed to
            `evaluate_policy` (`val/reward`, `val/gold_reward`, `val/win_rate`, `val/rouge*`,
            `val/reference_perplexity` and `val/references_truncated`; the rows kept for the table).
        table_name: wandb table key and CSV file stem (`<log_dir>/<table_name>.csv`).
        at_start: also evaluate once when training starts (the starting point of the curves).
        at_end: also evaluate when training ends (skipped if that point was just evaluated).
        stop_at: set `trainer.should_stop` once the axis value reaches this (None: never).
        budget_of: `pl_module -> dict of floats`, the budget spent, recorded in every history row
            (default: the stage's `budget.samples`, `.generated_tokens`, `.optimizer_steps`, or
            nothing for a module without a `budget`).
        budget_prefix: also log the budget dict and `seconds` under `<budget_prefix>/<key>`
            (e.g. "compare"; None: log only the metrics; the stages log `budget/*` themselves).
        extra_seconds: seconds spent before training that count as training time (e.g. the
            sampling that built DPO's data in a comparison).
        greedy_gold: when the evaluation samples (`greedy=False`), also score the greedy
            completions with `gold_fn` and log their mean as `val/greedy_gold_reward`.
        eval_seed: seed of the `torch.Generator` (on the policy's device) built afresh for every
            evaluation, so every measurement of every run draws the same random numbers.
        **evaluate_kwargs: any other `evaluate_policy` argument (`greedy`, `temperature`,
            `samples_per_prompt`, `batch_size`, `win_judge`, ...).

    `history` holds one dict per evaluation: `step` (`trainer.global_step`), the `budget_of`
    keys, `seconds` (training wall time so far with the evaluations' own time excluded, plus
    `extra_seconds`; see `train_seconds`) and the `val/` metrics. Two evaluations never land on
    the same (step, budget) point: a repeat is skipped. `eval_seconds` sums the time spent
    evaluating.

    Every rank evaluates (so sharded strategies keep their collectives in step); only global
    rank zero logs and writes files. The module is switched to eval mode under `torch.no_grad()`
    and every submodule's own train/eval flag is restored afterwards (a frozen reference copy
    stays in eval). The global CPU and CUDA RNG states are forked, so an evaluation does not
    change the training run's random stream, and sampling draws from the evaluation's own
    seeded generator.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        every: float = 50,
        axis: str = "step",
        reward_fn: RewardFn | None = None,
        gold_fn: RewardFn | None = None,
        reference: Policy | None = None,
        references: Sequence[str] | None = None,
        max_new_tokens: int = 16,
        max_rows: int | None = 16,
        table_name: str = "samples",
        at_start: bool = False,
        at_end: bool = True,
        stop_at: float | None = None,
        budget_of: Callable[[L.LightningModule], dict] | None = None,
        budget_prefix: str | None = None,
        extra_seconds: float = 0.0,
        greedy_gold: bool = False,
        eval_seed: int = 0,
        **evaluate_kwargs,
    ):
        super().__init__()
        prompts = list(prompts)
        if not prompts:
            raise ValueError("EvalCallback needs at least one prompt")
        if references is not None and len(references) != len(prompts):
            raise ValueError(f"got {len(references)} references for {len(prompts)} prompts")
        if not every >= 0 or math.isinf(every):
            raise ValueError(f"every must be a finite number >= 0 (0: only at_start/at_end), got {every}")
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if stop_at is not None and not stop_at > 0:
            raise ValueError(f"stop_at must be > 0 or None, got {stop_at}")
        if not extra_seconds >= 0:
            raise ValueError(f"extra_seconds must be >= 0, got {extra_seconds}")
        if reference is not None and reward_fn is None and evaluate_kwargs.get("win_judge") is None:
            raise ValueError("val/win_rate judges the two completions with win_judge (default reward_fn); "
                             "pass one of them with reference")
        if greedy_gold and gold_fn is None:
            raise ValueError("greedy_gold scores the greedy completions with gold_fn; pass one")
        if greedy_gold and evaluate_kwargs.get("greedy", True):
            raise ValueError("greedy_gold only applies when the evaluation samples (greedy=False): "
                             "a greedy evaluation's val/gold_reward is already the greedy gold score")
        if not table_name or os.sep in table_name or (os.altsep and os.altsep in table_name):
            raise ValueError(f"table_name must be a plain file stem, got {table_name!r}")
        if "generator" in evaluate_kwargs:
            raise TypeError("EvalCallback builds the sampling generator itself from eval_seed; "
                            "pass eval_seed instead of generator")
        accepted = set(inspect.signature(evaluate_policy).parameters) - _OWN_ARGS
        unknown = sorted(set(evaluate_kwargs) - accepted)
        if unknown:
            raise TypeError(f"unknown evaluate_policy argument(s) {unknown}; accepted: {sorted(accepted)}")
        self.prompts = prompts
        self.every, self.axis, self.stop_at = every, axis, stop_at
        self.reward_fn, self.gold_fn, self.reference = reward_fn, gold_fn, reference
        self.references = None if references is None else list(references)
        self.max_new_tokens, self.max_rows = max_new_tokens, max_rows
        self.table_name = table_name
        self.at_start, self.at_end = at_start, at_end
        self.budget_of = budget_of or default_budget
        self.budget_prefix = budget_prefix
        self.extra_seconds = float(extra_seconds)
        self.greedy_gold, self.eval_seed = greedy_gold, eval_seed
        self.evaluate_kwargs = evaluate_kwargs
        self.history: list[dict] = []  # {"step", **budget, "seconds", **val metrics}, one per evaluation
        self.last_result: EvalResult | None = None
        self.eval_seconds = 0.0
        self._start = time.perf_counter()
        self._last_key: tuple | None = None
        self._prev_value = 0.0
        self._table_rows: dict[str, int] = {}  # sample-table file -> data rows written
        self._resumed: dict | None = None

    def train_seconds(self) -> float:
        """Training wall time since training started, evaluations excluded, plus `extra_seconds`."""
        return time.perf_counter() - self._start - self.eval_seconds + self.extra_seconds

    def axis_value(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The current value of `axis` (global step, or the stage's budget counter)."""
        if self.axis == "step":
            return float(trainer.global_step)
        budget = getattr(pl_module, "budget", None)
        if budget is None:
            raise TypeError(f"EvalCallback(axis={self.axis!r}) reads pl_module.budget.{self.axis}; "
                            f"{type(pl_module).__name__} has no `budget` (use axis='step')")
        return float(getattr(budget, self.axis))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a resumed run needs: the history, the trigger's position, the clocks, the table rows."""
        return {"history": [dict(row) for row in self.history], "last_key": self._last_key,
                "prev_value": self._prev_value, "eval_seconds": self.eval_seconds,
                "elapsed": time.perf_counter() - self._start, "table_rows": dict(self._table_rows)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(row) for row in state["history"]]
        self._last_key = tuple(state["last_key"]) if state["last_key"] is not None else None
        self._prev_value, self.eval_seconds = state["prev_value"], state["eval_seconds"]
        self._table_rows = dict(state["table_rows"])
        self._resumed = state

    def _resume(self, trainer: L.Trainer) -> None:
        """Go on from a checkpoint: the clocks continue, sample tables lose the rows written after it."""
        self._start = time.perf_counter() - self._resumed["elapsed"]
        self._resumed = None
        if not trainer.is_global_zero:
            return
        paths = {os.path.join(d, f"{self.table_name}.csv") for d in
                 (getattr(logger, "log_dir", None) for logger in trainer.loggers) if d}
        for path in sorted(paths | set(self._table_rows)):
            n = self._table_rows.get(path, 0)
            if not os.path.exists(path):
                continue
            if n == 0:
                os.remove(path)
                continue
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))[: n + 1]  # the header and the first n rows
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rows)
            os.replace(tmp, path)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed is not None:  # a resumed run: it has evaluated at the start already
            self._resume(trainer)
            return
        self._start = time.perf_counter()
        self.eval_seconds = 0.0
        self._prev_value = self.axis_value(trainer, pl_module)
        if self.at_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        value, prev = self.axis_value(trainer, pl_module), self._prev_value
        self._prev_value = value
        every = self.every
        # A multiple of `every` was reached during this batch (the axis may move by more than it).
        if every and value > prev and math.floor(value / every) > math.floor(prev / every):
            self.evaluate(trainer, pl_module)
        if self.stop_at is not None and value >= self.stop_at:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
        """Evaluate now and log at `trainer.global_step`; returns the history row, or None when
        this (step, budget) point was already evaluated."""
        step = trainer.global_step
        budget = {key: float(value) for key, value in self.budget_of(pl_module).items()}
        key = (step, tuple(sorted(budget.items())))  # an iteration without an update keeps the step
        if key == self._last_key:
            return None
        policy = getattr(pl_module, "policy", None)
        if not isinstance(policy, Policy):
            raise TypeError(f"EvalCallback needs a module with a `policy` (rlhf_lab.Policy); "
                            f"{type(pl_module).__name__} has {type(policy).__name__}")
        self._last_key = key
        seconds = self.train_seconds()
        t0 = time.perf_counter()
        result = self._measure(pl_module, policy)
        metrics = dict(result.metrics)
        row = {"step": step, **budget, "seconds": seconds, **metrics}
        self.last_result = result
        self.history.append(row)
        if trainer.is_global_zero:
            logged = dict(metrics)
            if self.budget_prefix:
                logged.update({f"{self.budget_prefix}/{k}": v for k, v in {**budget, "seconds": seconds}.items()})
            self._log(trainer, step, logged, result)
        self.eval_seconds += time.perf_counter() - t0
        return row

    def _measure(self, pl_module: L.LightningModule, policy: Policy) -> EvalResult:
        modes = [(m, m.training) for m in pl_module.modules()]
        device = policy.device
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        pl_module.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                generator = torch.Generator(device=device).manual_seed(self.eval_seed)
                result = evaluate_policy(
                    policy, self.prompts, reward_fn=self.reward_fn, gold_fn=self.gold_fn,
                    reference=self.reference, references=self.references, max_new_tokens=self.max_new_tokens,
                    max_rows=self.max_rows, generator=generator, **self.evaluate_kwargs)
                if self.greedy_gold:
                    batch_size = self.evaluate_kwargs.get("batch_size", 64)
                    result.metrics["val/greedy_gold_reward"] = gold_accuracy(
                        policy, self.prompts, self.gold_fn, self.max_new_tokens, batch_size)
        finally:
            for module, training in modes:
                module.training = training
        return result

    def _log(self, trainer: L.Trainer, step: int, metrics: dict, result: EvalResult) -> None:
        from lightning.pytorch.loggers import WandbLogger

        columns, data = result.table()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if not columns:
                continue
            if isinstance(logger, WandbLogger):
                logger.log_table(key=self.table_name, columns=columns, data=data, step=step)
                continue
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                path = os.path.join(log_dir, f"{self.table_name}.csv")
                self._append_csv(path, step, columns, data)
                self._table_rows[path] = self._table_rows.get(path, 0) + len(data)

    @staticmethod
    def _append_csv(path: str, step: int, columns: list[str], data: list[list]) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *columns])
            writer.writerows([step, *row] for row in data)
