"""Evaluation: metric functions, `evaluate_policy` and the one evaluation callback, `EvalCallback`."""

from __future__ import annotations

from rlhf_lab.eval.callback import EvalCallback
from rlhf_lab.eval.metrics import EvalResult, evaluate_policy, gold_accuracy, greedy_completions

__all__ = ["EvalCallback", "EvalResult", "evaluate_policy", "gold_accuracy", "greedy_completions"]
