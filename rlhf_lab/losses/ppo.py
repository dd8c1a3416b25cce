"""PPO-style policy and value losses, and the entropy bonus.

Variants (ratio level, aggregation, clipped or not) are small functions picked from dicts so a
new one is one more entry, not one more branch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_lab.checks import (
    check_choice,
    check_ndim,
    check_positive,
    check_same_shape,
    check_tensor,
)
from rlhf_lab.losses.masked import masked_mean, masked_sum

__all__ = [
    "RATIO_LEVELS",
    "AGGREGATIONS",
    "ppo_policy_loss",
    "ppo_value_loss",
    "entropy_bonus",
]


# --- ratio level: per-token log-ratio (B, T) -> log-ratio used in the surrogate (B, T) ---------


def _log_ratio_token(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _log_ratio_sequence(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # GSPO uses the length-normalised (geometric-mean) sequence ratio so that its scale does
    # not depend on response length; every token of a sequence shares it.
    per_seq = masked_mean(log_ratio, mask, dim=-1)
    return per_seq.unsqueeze(-1).expand_as(log_ratio)


RATIO_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": _log_ratio_token,
    "sequence": _log_ratio_sequence,
}


# --- aggregation: per-token loss (B, T) -> scalar ---------------------------------------------


def _aggregate_token_mean(x: torch.Tensor, mask: torch.Tensor, counts=None) -> torch.Tensor:
    if counts is not None:  # a part of a larger batch: its share of the batch's token mean
        return masked_sum(x, mask) / counts[0]
    return masked_mean(x, mask)


def _aggregate_seq_mean(x: torch.Tensor, mask: torch.Tensor, counts=None) -> torch.Tensor:
    per_seq = masked_mean(x, mask, dim=-1)
    # Rows without response tokens would add a spurious 0 to the average; leave them out.
    has_tokens = (mask != 0).any(dim=-1)
    if counts is not None:  # a part of a larger batch: its share of the batch's sequence mean
        return masked_sum(per_seq, has_tokens) / counts[1]
    return masked_mean(per_seq, has_tokens)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, tokens=None) -> torch.Tensor:
    """masked_mean, or with `tokens` (the token count of the whole batch) this part's share of it."""
    return masked_mean(x, mask) if tokens is None else masked_sum(x, mask) / tokens


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token_mean": _aggregate_token_mean,
    "seq_mean": _aggregate_seq_mean,
}


# --- surrogate: (ratio, advantages) -> (per-token loss, clipped-branch-active) -----------------


def _unclipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_ratio: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return -advantages * ratio, torch.zeros_like(ratio, dtype=torch.bool)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_ratio: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio: float | None = 0.2,
    ratio_level: str = "token",
    aggregation: str = "token_mean",
    counts: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss of PPO (and its GSPO / unclipped variants).

    Formula: rho_t = log pi(a_t) - log pi_old(a_t), the per-token log-ratio.
        ratio_level "token":    r_t = exp(rho_t)
        ratio_level "sequence": r_t = exp( sum_t m_t rho_t / sum_t m_t ) for every t of the row
        loss_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)     (eps = clip_ratio)
        loss_t = -r_t A_t                                           (clip_ratio None; its
                 gradient at r = 1 is -A grad log pi, the vanilla policy gradient)
        aggregation "token_mean": sum_{b,t} m loss / sum_{b,t} m
        aggregation "seq_mean":   mean over rows with >= 1 response token of
                                  (sum_t m loss / sum_t m)
    Metrics (detached): policy_loss; clipfrac = masked fraction of tokens where the clipped
    branch is the active one, -A clip(r) > -A r; approx_kl = masked mean of (r - 1) - log r with
    the per-token r (Schulman's k3 estimator of KL(pi_old || pi), >= 0); ratio = masked mean of
    the r used in the loss.
    counts = (N_tok, N_seq): these rows are a part (a micro-batch, one rank's share) of a batch
        with N_tok response tokens and N_seq non-empty rows. The sums above are then divided by
        those counts instead of this part's own, so the parts' losses and metrics add up to the
        whole batch's, however it was split (DAPO's token mean over the global batch).
    advantages and old_logprobs are treated as constants (detached).
    Reference: Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
    (arXiv:1707.06347); sequence-level ratio from Zheng et al. 2025, "Group Sequence Policy
    Optimization" (arXiv:2507.18071); seq_mean as in GRPO, Shao et al. 2024 (arXiv:2402.03300),
    token_mean as in DAPO, Yu et al. 2025 (arXiv:2503.14476); k3 from Schulman 2020,
    "Approximating KL Divergence".

    Shape: logprobs (B, T), old_logprobs (B, T), advantages (B, T) or (B,) (one advantage per
    sequence, broadcast over T), response_mask (B, T). Returns (loss scalar, metrics).
    """
    check_ndim("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    check_tensor("advantages", advantages)
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(
            f"advantages must have shape (B, T) = {tuple(logprobs.shape)} or (B,) = "
            f"{tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}"
        )
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    if clip_ratio is not None:
        check_positive("clip_ratio", clip_ratio)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("aggregation", aggregation, AGGREGATIONS)

    advantages = advantages.detach()
    token_log_ratio = logprobs - old_logprobs.detach()
    # Padding can hold -inf log-probs; a finite log-ratio there keeps exp and backward finite.
    token_log_ratio = torch.where(response_mask != 0, token_log_ratio, 0.0)
    ratio = torch.exp(RATIO_LEVELS[ratio_level](token_log_ratio, response_mask))
    surrogate = _unclipped_surrogate if clip_ratio is None else _clipped_surrogate
    per_token, clipped = surrogate(ratio, advantages, clip_ratio)
    loss = AGGREGATIONS[aggregation](per_token, response_mask, counts)

    tokens = None if counts is None else counts[0]
    with torch.no_grad():
        lr = token_log_ratio.detach()
        metrics = {
            "policy_loss": loss.detach(),
            "clipfrac": _token_mean(clipped.to(logprobs.dtype), response_mask, tokens),
            "approx_kl": _token_mean(torch.expm1(lr) - lr, response_mask, tokens),
            "ratio": _token_mean(ratio.detach(), response_mask, tokens),
        }
    return loss, metrics


# --- value error: (V, V_old, R) -> (per-token squared error, clipped-term-active) -------------


def _unclipped_value_error(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_value: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return (values - returns) ** 2, torch.zeros_like(values, dtype=torch.bool)


def _clipped_value_error(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_value: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = (values - returns) ** 2
    values_clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    clipped = (values_clipped - returns) ** 2
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_value: float | None = 0.2,
    tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped squared-error value loss of PPO.

    Formula: V_clip = V_old + clip(V - V_old, -c, c)           (c = clip_value)
        loss = 1/2 * masked_mean( max((V - R)^2, (V_clip - R)^2) )
        loss = 1/2 * masked_mean( (V - R)^2 )                    (clip_value None)
    Metrics (detached): value_loss; value_clipfrac = masked fraction of tokens where the clipped
    term is the larger one, (V_clip - R)^2 > (V - R)^2.
    old_values and returns are treated as constants (detached). tokens: the response-token count
    of the whole batch these rows are a part of (the mean's divisor; see ppo_policy_loss).
    Reference: value clipping of the PPO reference implementation (OpenAI baselines ppo2),
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); analysed
    in Engstrom et al. 2020, "Implementation Matters in Deep Policy Gradients"
    (arXiv:2005.12729).

    Shape: values (B, T), old_values (B, T), returns (B, T), response_mask (B, T).
    Returns (loss scalar, {"value_loss", "value_clipfrac"}).
    """
    check_ndim("values", values, 2, "(B, T)")
    check_same_shape(
        "values", values, old_values=old_values, returns=returns, response_mask=response_mask
    )
    if clip_value is not None:
        check_positive("clip_value", clip_value)

    error = _unclipped_value_error if clip_value is None else _clipped_value_error
    per_token, clipped_active = error(values, old_values.detach(), returns.detach(), clip_value)
    loss = 0.5 * _token_mean(per_token, response_mask, tokens)
    metrics = {
        "value_loss": loss.detach(),
        "value_clipfrac": _token_mean(clipped_active.to(values.dtype), response_mask, tokens).detach(),
    }
    return loss, metrics


def entropy_bonus(
    entropy: torch.Tensor, response_mask: torch.Tensor, tokens: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean policy entropy over the response tokens (a bonus: subtract coef * value from the loss).

    Formula: H = sum_{b,t} m_{b,t} H_{b,t} / sum_{b,t} m_{b,t}, with H_{b,t} the entropy of the
        next-token distribution at position t; with `tokens` (the response-token count of the
        whole batch these rows are a part of) the divisor is `tokens` (see ppo_policy_loss).
    Reference: entropy regularisation of Williams & Peng 1991, "Function Optimization using
    Connectionist Reinforcement Learning Algorithms" (Connection Science 3); Mnih et al. 2016,
    "Asynchronous Methods for Deep Reinforcement Learning" (arXiv:1602.01783).

    Shape: entropy (B, T), response_mask (B, T). Returns (value scalar, {"entropy"}).
    """
    check_ndim("entropy", entropy, 2, "(B, T)")
    check_same_shape("entropy", entropy, response_mask=response_mask)
    value = _token_mean(entropy, response_mask, tokens)
    return value, {"entropy": value.detach()}
