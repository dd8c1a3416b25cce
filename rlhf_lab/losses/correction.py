"""Rollout-training mismatch correction: importance weights between the sampler and the trainer.

The engine that samples a rollout (another precision, other kernels, a fused or quantised
inference path) assigns the sampled tokens slightly different log-probs than the trainer's forward
pass of the very same weights. The "on-policy" update then learns from samples of a policy it is
not: the weights below re-weight each token's loss by the ratio of the two, bounded so that a few
tokens the sampler found much less likely than the trainer cannot dominate the update.

Variants (the level the ratio is taken at, what happens above the cap) are small functions picked
from dicts, as in ppo.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_lab.checks import check_choice, check_ndim, check_positive, check_same_shape
from rlhf_lab.losses.masked import masked_mean, masked_sum

__all__ = ["CORRECTION_LEVELS", "CORRECTION_MODES", "rollout_correction_weights"]


# --- level: per-token log-ratio (B, T) -> log-weight of each token (B, T) ----------------------


def _log_weight_token(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return delta


def _log_weight_sequence(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The ratio of the whole response's probabilities, shared by every token of the row.
    return masked_sum(delta, mask, dim=-1).unsqueeze(-1).expand_as(delta)


CORRECTION_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": _log_weight_token,
    "sequence": _log_weight_sequence,
}


# --- mode: (weights (B, T), cap) -> (bounded weights, above the cap) ---------------------------


def _truncate(weights: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.clamp(weights, max=cap), weights > cap


def _mask_above(weights: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    above = weights > cap
    return torch.where(above, torch.zeros_like(weights), weights), above


CORRECTION_MODES: dict[str, Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]] = {
    "tis": _truncate,
    "mis": _mask_above,
}


def _token_mean(x: torch.Tensor, mask: torch.Tensor, tokens: float | None) -> torch.Tensor:
    return masked_mean(x, mask) if tokens is None else masked_sum(x, mask) / tokens


@torch.no_grad()
def rollout_correction_weights(
    train_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "tis",
    level: str = "token",
    cap: float = 2.0,
    tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights pi_train / pi_sample of the sampled tokens, bounded at `cap`.

    Formula: with m = response_mask and Delta_t = log pi_train(a_t) - log pi_sample(a_t) on the
        response tokens (0 outside the mask, where either may hold -inf),
        level "token":    w_t = exp(Delta_t)
        level "sequence": w_t = exp(sum_s m_s Delta_s) for every t of the row (the ratio of the
                          whole response's probabilities)
        mode "tis" (truncated IS):  w_t <- min(w_t, cap)
        mode "mis" (masked IS):     w_t <- 0 where w_t > cap, else w_t (a token, or with level
                          "sequence" a whole response, whose ratio exceeds the cap is left out of
                          the update instead of being down-weighted)
        and w = 0 outside the mask. The weights multiply the per-token policy loss
        (ppo_policy_loss's is_weights), with pi_train as the pi_old of its ratio: the expected
        update is then (up to the truncation's bias) the one of samples drawn from pi_train.
    Metrics (detached, over the masked tokens): sampling_logprob_diff = mean of |Delta_t|;
    is_weight = mean of the final w_t; is_capped_frac = fraction of tokens whose w_t exceeded cap
    (truncated by "tis", zeroed by "mis"; with level "sequence" every token of such a row).
    tokens: the response-token count of the whole batch these rows are a part of; the metrics
        are then this part's share of the batch's means (see ppo_policy_loss's counts).
    Everything is computed without gradient, in float32 (float64 for float64 inputs).
    Reference: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training" (blog, Aug 2025, https://fengyao.notion.site/off-policy-rl), truncated importance
    sampling; Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
    Training-Inference Mismatch" (blog, Sep 2025), token- and sequence-level masked importance
    sampling.

    Shape: train_logprobs (B, T), sampling_logprobs (B, T), response_mask (B, T).
    Returns (weights (B, T), {"sampling_logprob_diff", "is_weight", "is_capped_frac"}).
    """
    check_ndim("train_logprobs", train_logprobs, 2, "(B, T)")
    check_same_shape("train_logprobs", train_logprobs, sampling_logprobs=sampling_logprobs,
                     response_mask=response_mask)
    check_choice("mode", mode, CORRECTION_MODES)
    check_choice("level", level, CORRECTION_LEVELS)
    check_positive("cap", cap)
    dtype = torch.promote_types(torch.promote_types(train_logprobs.dtype, sampling_logprobs.dtype), torch.float32)
    inside = response_mask != 0
    delta = torch.where(inside, train_logprobs.detach().to(dtype) - sampling_logprobs.detach().to(dtype), 0.0)
    mask = response_mask.to(dtype)
    weights = torch.exp(CORRECTION_LEVELS[level](delta, mask))
    weights, capped = CORRECTION_MODES[mode](weights, cap)
    weights = torch.where(inside, weights, 0.0)
    metrics = {
        "sampling_logprob_diff": _token_mean(delta.abs(), mask, tokens),
        "is_weight": _token_mean(weights, mask, tokens),
        "is_capped_frac": _token_mean(capped.to(dtype), mask, tokens),
    }
    return weights, metrics
