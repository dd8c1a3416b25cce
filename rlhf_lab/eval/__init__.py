"""Evaluation helpers shared by the demo, the CLI and tests."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_lab.eval.callback import EvalCallback
from rlhf_lab.eval.metrics import EvalResult, evaluate_policy
from rlhf_lab.policy import Policy

__all__ = ["EvalCallback", "EvalResult", "evaluate_policy", "gold_accuracy", "greedy_completions"]


@torch.no_grad()
def greedy_completions(policy: Policy, prompts: list[str], max_new_tokens: int = 8,
                       batch_size: int = 256) -> list[str]:
    """Greedy (temperature-0) completions of `prompts`, in order."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rollout = policy.generate(prompts[start:start + batch_size], max_new_tokens=max_new_tokens, greedy=True)
        out.extend(rollout.completions)
    return out


def gold_accuracy(policy: Policy, prompts: list[str],
                  judge: Callable[[list[str], list[str]], list[float]], max_new_tokens: int = 8) -> float:
    """Mean gold score of greedy completions (for a 0/1 judge: the fraction answered correctly)."""
    completions = greedy_completions(policy, prompts, max_new_tokens)
    scores = judge(prompts, completions)
    return float(sum(scores) / len(scores))
