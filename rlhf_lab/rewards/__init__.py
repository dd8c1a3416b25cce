"""Reward sources: map (prompts, completions) to one score per completion.

A reward source is any callable `(prompts: list[str], completions: list[str]) -> Tensor (B,)`.
`RewardModelSource` wraps a trained reward model (a `Policy` with a scalar head); `CallableSource`
wraps a Python function returning floats, such as a task's gold judge; `WeightedSum` combines
several sources.

Every score a run uses passes `check_scores` where it enters (the online stages, the evaluation,
the normalisation, the demo's pairs): one finite score per row, else a `RewardError` naming the
source and the row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rlhf_lab.errors import RewardError
from rlhf_lab.rewards.checks import check_scores, reward_name

if TYPE_CHECKING:
    from rlhf_lab.policy import Policy

__all__ = ["CallableSource", "RewardError", "RewardModelSource", "WeightedSum", "check_scores", "reward_name"]


class CallableSource:
    """Wrap `fn(prompts, completions) -> list[float]` as a reward source."""

    def __init__(self, fn: Callable[[list[str], list[str]], list[float]]):
        self.fn = fn

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return check_scores(self.fn(prompts, completions), len(completions), self, prompts)


class WeightedSum:
    """r(x, y) = Σ_k w_k · r_k(x, y): several reward sources as one, from `(weight, source)` pairs.

    Each source is called once per batch; a source that returns a list (a plain judge function)
    is turned into a float tensor first.
    """

    def __init__(self, *terms: tuple[float, Callable]):
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, source) pair")
        for term in terms:
            if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[0], (int, float))
                    and callable(term[1])):
                raise ValueError(f"each term must be a (weight, source) pair, got {term!r}")
        self.terms = terms

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        total = None
        for weight, source in self.terms:
            scores = check_scores(source(prompts, completions), len(completions), source, prompts)
            total = weight * scores if total is None else total + weight * scores
        return total


class RewardModelSource:
    """Score `prompt + completion + EOS` with a reward model's head at the last token.

    The text is re-tokenised with the reward model's own tokenizer, so the reward model need not
    share the policy's vocabulary. Scores are computed without gradients in batches, and reported
    as `(score − shift) / scale`: a Bradley–Terry model fixes scores only up to a constant, so
    `normalize` sets shift and scale to make samples of a reference policy score mean 0 and
    std 1 (as Stiennon et al. 2020 and Ouyang et al. 2022 normalise theirs before RL).
    """

    def __init__(self, reward_model: Policy, batch_size: int = 64, max_length: int = 128,
                 shift: float = 0.0, scale: float = 1.0):
        reward_model._require_head("scores")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.model = reward_model.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.max_length = max_length
        self.shift, self.scale = shift, scale

    def normalize(self, prompts: list[str], completions: list[str]) -> RewardModelSource:
        """Set shift/scale so these (reference) samples score mean 0, std 1; returns self.

        Needs at least two samples (a standard deviation); a non-finite score is a `RewardError`.
        """
        if len(completions) < 2:
            raise RewardError(f"reward {reward_name(self)}: normalize needs at least 2 samples to measure a "
                              f"standard deviation, got {len(completions)} (reward.normalize_prompts in a fit config)")
        self.shift, self.scale = 0.0, 1.0
        raw = check_scores(self(prompts, completions), len(completions), self, prompts)
        self.shift, self.scale = float(raw.mean()), float(raw.std().clamp(min=1e-6))
        return self

    def as_critic(self) -> Policy:
        """A trainable copy of the reward model whose head reports normalised scores.

        Used to initialise PPO's critic from the reward model (Ouyang et al. 2022): its value
        at the last token starts at the normalised reward the policy is trained on.
        """
        critic = copy.deepcopy(self.model).train().requires_grad_(True)
        with torch.no_grad():
            critic.scalar_head.weight.div_(self.scale)
            critic.scalar_head.bias.sub_(self.shift).div_(self.scale)
        return critic

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        from rlhf_lab.data.datasets import SFTDataset, pad_collate

        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
        data = SFTDataset(rows, self.model.tokenizer, self.max_length)
        pad = self.model.tokenizer.pad_token_id
        out = []
        for start in range(0, len(data), self.batch_size):
            batch = pad_collate([data[i] for i in range(start, min(start + self.batch_size, len(data)))], pad)
            device = self.model.device
            out.append(self.model.scores(batch["input_ids"].to(device), batch["attention_mask"].to(device)))
        return (torch.cat(out) - self.shift) / self.scale
