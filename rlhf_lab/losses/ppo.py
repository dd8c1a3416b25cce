"""PPO-style policy and value losses, and the entropy bonus.

Variants (ratio level, aggregation, surrogate) are small functions picked from dicts so a new one
is one more entry, not one more branch.
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
    "SURROGATES",
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


def _aggregate_seq_mean_token_sum_norm(
    x: torch.Tensor, mask: torch.Tensor, counts=None, norm_length: float | None = None
) -> torch.Tensor:
    # Dr. GRPO: each row's token sum divided by one constant length instead of its own length,
    # so long and short responses weigh their tokens alike; then the mean over rows.
    if norm_length is None:
        raise ValueError("norm_length must be given with aggregation 'seq_mean_token_sum_norm'")
    total = masked_sum(x, mask)
    if counts is not None:  # a part of a larger batch: its share of the batch's value
        return total / (counts[1] * norm_length)
    rows = (mask != 0).any(dim=-1).sum().clamp_min(1).to(total.dtype)  # 0 (not NaN) for no rows
    return total / (rows * norm_length)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, tokens=None) -> torch.Tensor:
    """masked_mean, or with `tokens` (the token count of the whole batch) this part's share of it."""
    return masked_mean(x, mask) if tokens is None else masked_sum(x, mask) / tokens


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": _aggregate_token_mean,
    "seq_mean": _aggregate_seq_mean,
    "seq_mean_token_sum_norm": _aggregate_seq_mean_token_sum_norm,
}
# The aggregations that divide by a constant length: ppo_policy_loss passes them norm_length.
_NORM_LENGTH_AGGREGATIONS = ("seq_mean_token_sum_norm",)


# --- surrogate: (ratio, advantages, logprobs, eps_low, eps_high) -> (per-token loss, counted) --
# `counted` is the (B, T) bool mask the clipfrac metric averages; each surrogate says what it is.


def _unclipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return -advantages * ratio, torch.zeros_like(ratio, dtype=torch.bool)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _clip_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, logprobs: torch.Tensor,
    eps_low: float | None, eps_high: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # PPO's pessimistic surrogate; counted = the clipped branch is the active one. eps_low None is
    # the unclipped surrogate (ppo_policy_loss refuses eps_high without eps_low).
    if eps_low is None:
        return _unclipped_surrogate(ratio, advantages)
    return _clipped_surrogate(ratio, advantages, eps_low, eps_high)


def _cispo_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, logprobs: torch.Tensor,
    eps_low: float | None, eps_high: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # CISPO: the clipped ratio is a constant weight on the REINFORCE term -A log pi, so every
    # token keeps its gradient; counted = r lies outside the range. eps_low None: no lower bound.
    r = ratio.detach()
    low = None if eps_low is None else 1.0 - eps_low
    high = 1.0 + eps_high
    outside = r > high if low is None else (r > high) | (r < low)
    return -torch.clamp(r, min=low, max=high) * advantages * logprobs, outside


SURROGATES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "clip": _clip_surrogate,
    "cispo": _cispo_surrogate,
}


def _check_policy_options(
    clip_ratio: float | None, clip_ratio_high: float | None, dual_clip: float | None, surrogate: str,
    aggregation: str, norm_length: float | None,
) -> None:
    if clip_ratio is not None:
        check_positive("clip_ratio", clip_ratio)
    if clip_ratio_high is not None:
        check_positive("clip_ratio_high", clip_ratio_high)
    check_choice("surrogate", surrogate, SURROGATES)
    if surrogate == "clip" and clip_ratio is None and clip_ratio_high is not None:
        raise ValueError(
            f"clip_ratio_high = {clip_ratio_high} needs clip_ratio (the lower bound); clip_ratio None is unclipped"
        )
    if surrogate == "cispo" and clip_ratio_high is None:
        raise ValueError("clip_ratio_high must be given with surrogate 'cispo' (the upper bound of its weight)")
    if dual_clip is not None:
        if surrogate != "clip":
            raise ValueError(f"dual_clip applies to surrogate 'clip' only, got surrogate {surrogate!r}")
        if clip_ratio is None:
            raise ValueError("dual_clip needs clip_ratio (it bounds the clipped loss), got clip_ratio None")
        if not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if aggregation in _NORM_LENGTH_AGGREGATIONS:
        if norm_length is None:
            raise ValueError(
                f"norm_length must be given with aggregation {aggregation!r} (the response-length limit)"
            )
        check_positive("norm_length", norm_length)
    elif norm_length is not None:
        raise ValueError(
            f"norm_length is used only by aggregation 'seq_mean_token_sum_norm', got aggregation {aggregation!r}"
        )


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio: float | None = 0.2,
    ratio_level: str = "token",
    aggregation: str = "token_mean",
    counts: tuple[float, float] | None = None,
    *,
    clip_ratio_high: float | None = None,
    dual_clip: float | None = None,
    surrogate: str = "clip",
    is_weights: torch.Tensor | None = None,
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss of PPO (and its GSPO / DAPO / dual-clip / CISPO / unclipped variants).

    Formula: rho_t = log pi(a_t) - log pi_old(a_t), the per-token log-ratio.
        ratio_level "token":    r_t = exp(rho_t)
        ratio_level "sequence": r_t = exp( sum_t m_t rho_t / sum_t m_t ) for every t of the row
        eps_l = clip_ratio, eps_h = clip_ratio_high (None: eps_h = eps_l)
        surrogate "clip":
            loss_t = -min(r_t A_t, clip(r_t, 1 - eps_l, 1 + eps_h) A_t)
            loss_t = -r_t A_t                      (clip_ratio None; its gradient at r = 1 is
                     -A grad log pi, the vanilla policy gradient; clip_ratio_high must be None)
            dual_clip = c > 1 (needs clip_ratio): where A_t < 0,
            loss_t = min(loss_t, -c A_t)           (the loss of a token with a negative advantage
                     and a huge ratio stops growing at c |A|, and its gradient is 0 there)
        surrogate "cispo":
            loss_t = -sg(clip(r_t, 1 - eps_l, 1 + eps_h)) A_t log pi(a_t)
                     (sg = stop-gradient: the clipped ratio is a constant weight, so every token
                     keeps the gradient -w_t A_t grad log pi, also where PPO's clipped branch has
                     none; its value is that of the REINFORCE term, not comparable to "clip"'s.
                     clip_ratio_high is required; clip_ratio None leaves the weight without a
                     lower bound; dual_clip is refused)
        is_weights (B, T): loss_t <- w_t loss_t, constant per-token weights (detached), e.g. the
            rollout-mismatch correction of rollout_correction_weights; None means w = 1.
        aggregation "token_mean": sum_{b,t} m loss / sum_{b,t} m
        aggregation "seq_mean":   mean over rows with >= 1 response token of
                                  (sum_t m loss / sum_t m)
        aggregation "seq_mean_token_sum_norm": sum_{b,t} m loss / (N_seq * norm_length), N_seq the
                                  rows with >= 1 response token and norm_length a constant (the
                                  response-length limit); needs norm_length, which no other
                                  aggregation takes.
    Metrics (detached): policy_loss; clipfrac = masked fraction of tokens where the clipped
    branch is the active one, -A clip(r) > -A r ("clip"), or where r lies outside
    [1 - eps_l, 1 + eps_h] ("cispo"); approx_kl = masked mean of (r - 1) - log r with the
    per-token r (Schulman's k3 estimator of KL(pi_old || pi), >= 0); ratio = masked mean of the r
    used in the loss; dual_clipfrac (only with dual_clip) = masked fraction of tokens where the
    dual bound -c A is the active one.
    counts = (N_tok, N_seq): these rows are a part (a micro-batch, one rank's share) of a batch
        with N_tok response tokens and N_seq non-empty rows. The sums above are then divided by
        those counts instead of this part's own, so the parts' losses and metrics add up to the
        whole batch's, however it was split (DAPO's token mean over the global batch).
    advantages, old_logprobs and is_weights are treated as constants (detached).
    Reference: Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
    (arXiv:1707.06347); sequence-level ratio from Zheng et al. 2025, "Group Sequence Policy
    Optimization" (arXiv:2507.18071); seq_mean as in GRPO, Shao et al. 2024 (arXiv:2402.03300),
    token_mean and the asymmetric range (clip-higher) as in DAPO, Yu et al. 2025, "DAPO: An
    Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476); dual clip from Ye
    et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"
    (arXiv:1912.09729); CISPO from MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute
    Efficiently with Lightning Attention" (arXiv:2506.13585); seq_mean_token_sum_norm from Dr.
    GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
    (arXiv:2503.20783); k3 from Schulman 2020, "Approximating KL Divergence".

    Shape: logprobs (B, T), old_logprobs (B, T), advantages (B, T) or (B,) (one advantage per
    sequence, broadcast over T), response_mask (B, T), is_weights (B, T). Returns
    (loss scalar, metrics).
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
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_policy_options(clip_ratio, clip_ratio_high, dual_clip, surrogate, aggregation, norm_length)
    if is_weights is not None:
        check_same_shape("logprobs", logprobs, is_weights=is_weights)

    advantages = advantages.detach()
    token_log_ratio = logprobs - old_logprobs.detach()
    # Padding can hold -inf log-probs; a finite log-ratio there keeps exp and backward finite.
    token_log_ratio = torch.where(response_mask != 0, token_log_ratio, 0.0)
    ratio = torch.exp(RATIO_LEVELS[ratio_level](token_log_ratio, response_mask))
    eps_high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    log_pi = torch.where(response_mask != 0, logprobs, 0.0) if surrogate == "cispo" else logprobs
    per_token, clipped = SURROGATES[surrogate](ratio, advantages, log_pi, clip_ratio, eps_high)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (bound < per_token)
        per_token = torch.where(dual_active, bound, per_token)
    if is_weights is not None:
        # Weights in the padding may be anything; 0 there keeps the backward free of inf * 0.
        per_token = per_token * torch.where(response_mask != 0, is_weights.detach().to(per_token.dtype), 0.0)
    if aggregation in _NORM_LENGTH_AGGREGATIONS:
        loss = AGGREGATIONS[aggregation](per_token, response_mask, counts, norm_length=norm_length)
    else:
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
        if dual_clip is not None:
            metrics["dual_clipfrac"] = _token_mean(dual_active.to(logprobs.dtype), response_mask, tokens)
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
