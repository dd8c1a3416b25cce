"""Pairwise preference loss for reward models."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_lab.checks import check_ndim, check_positive, check_same_shape

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry negative log-likelihood of preferring the chosen over the rejected answer.

    Formula: loss = mean_b( -log sigmoid(r_c - r_r - m) ) + center_coef * mean_b( (r_c + r_r)^2 )
        with m = 0 when ``margin`` is None. -log sigmoid is computed as -logsigmoid, which is
        stable for large |r_c - r_r|. The centering term pushes the rewards of a pair to sum to
        zero, pinning down the otherwise free offset of the reward.
    Reference: Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs: I. The Method of
    Paired Comparisons" (Biometrika 39); used for LM reward models by Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback" (arXiv:2203.02155);
    margin as in Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models"
    (arXiv:2307.09288); centering as in Eisenstein et al. 2023, "Helping or Herding? Reward
    Model Ensembles Mitigate but do not Eliminate Reward Hacking" (arXiv:2312.09244).

    Shape: chosen_rewards (B,), rejected_rewards (B,), margin None, a float, or a tensor of
    shape (B,) or (). Returns (loss scalar, {"accuracy", "margin", "chosen", "rejected"}), where
    accuracy = fraction with r_c > r_r and margin = mean(r_c - r_r) (the reward gap, not the
    ``margin`` argument).
    """
    check_ndim("chosen_rewards", chosen_rewards, 1, "(B,)")
    check_same_shape("chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.numel() == 0:
        raise ValueError("chosen_rewards must hold at least one pair, got an empty batch")
    if isinstance(margin, torch.Tensor) and margin.ndim != 0:
        check_same_shape("chosen_rewards", chosen_rewards, margin=margin)
    elif margin is not None and not isinstance(margin, (int, float, torch.Tensor)):
        raise ValueError(f"margin must be None, a float or a tensor, got {type(margin).__name__}")
    check_positive("center_coef", center_coef, allow_zero=True)

    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()

    diff = diff.detach()
    metrics = {
        "accuracy": (diff > 0).to(diff.dtype).mean(),
        "margin": diff.mean(),
        "chosen": chosen_rewards.detach().mean(),
        "rejected": rejected_rewards.detach().mean(),
    }
    return loss, metrics
