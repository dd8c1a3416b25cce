"""Advantage estimators: GAE for token-level critics, returns-to-go, REINFORCE baselines for sequence scores."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_lab.checks import (
    check_choice,
    check_ndim,
    check_positive,
    check_same_shape,
    check_tensor,
    check_unit_interval,
)
from rlhf_lab.losses.masked import masked_whiten

__all__ = [
    "gae",
    "returns_to_go",
    "baseline_none",
    "baseline_batch_mean",
    "baseline_leave_one_out",
    "baseline_group_norm",
    "baseline_group_mean",
    "BASELINES",
    "contiguous_group_ids",
    "reinforce_advantages",
    "whiten_advantages",
]


def _discount_matrix(
    coef: float, size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # D[t, s] = coef^(s - t) for s >= t, else 0. The clamp keeps the exponent of the lower
    # triangle at 0 so pow never sees a negative power (coef may be 0); the mask zeroes it.
    idx = torch.arange(size, device=device)
    lag = idx[None, :] - idx[:, None]
    powers = torch.pow(torch.tensor(coef, dtype=dtype, device=device), lag.clamp_min(0).to(dtype))
    return torch.where(lag >= 0, powers, 0.0)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over the response tokens of each row.

    Formula: with m = response_mask,
        delta_t = m_t * (r_t + gamma * V_{t+1} * m_{t+1} - V_t)     (V after the last response
                                                                    token counts as 0)
        A_t     = m_t * sum_{l >= 0} (gamma * lam)^l * delta_{t+l}
        returns = m_t * (A_t + V_t)
    Computed without a loop over time as A = delta @ D^T with the (T, T) upper-triangular
    discount matrix D[t, s] = (gamma * lam)^(s - t), s >= t. This is exact because delta is 0
    outside the mask and each row's response region is contiguous, so the sum from t stops at
    the end of the response. Rewards outside the mask are ignored.
    The function does not detach; call it on detached rewards/values (rollout time).
    Reference: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation" (ICLR 2016, arXiv:1506.02438).

    Shape: rewards (B, T), values (B, T), response_mask (B, T) with one contiguous run of ones
    per row (it may start at any column and be followed by padding). Returns advantages (B, T),
    returns (B, T).
    """
    check_ndim("rewards", rewards, 2, "(B, T)")
    check_same_shape("rewards", rewards, values=values, response_mask=response_mask)
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)
    if rewards.shape[1] == 0:
        raise ValueError("rewards must have at least one time step, got T = 0")
    out_dtype = values.dtype
    # bf16/fp16 cannot hold (gamma*lam)^k or long discounted sums accurately.
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, out_dtype), torch.float32)
    rewards, values = rewards.to(dtype), values.to(dtype)
    m = response_mask.to(dtype)
    # A second 0->1 step in a row would let the discounted sum run across the gap.
    starts = (m[:, 1:] > m[:, :-1]).sum(dim=1) + (m[:, 0] > 0).to(torch.long)
    if bool((starts > 1).any()):
        raise ValueError("response_mask must have one contiguous run of ones per row")

    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:] * m[:, 1:]
    deltas = torch.where(m != 0, rewards + gamma * next_values - values, 0.0)
    discount = _discount_matrix(gamma * lam, values.shape[1], dtype, values.device)
    advantages = torch.einsum("ts,bs->bt", discount, deltas)
    advantages = torch.where(m != 0, advantages, 0.0)
    returns = torch.where(m != 0, advantages + values, 0.0)
    return advantages.to(out_dtype), returns.to(out_dtype)


def returns_to_go(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return-to-go of each response token: the sum of the rewards from it onwards.

    Formula: with m = response_mask,
        G_t = m_t * sum_{s >= t} gamma^(s - t) * m_s * r_s
    Computed without a loop over time as G = (m r) @ D^T with the (T, T) upper-triangular discount
    matrix D[t, s] = gamma^(s - t), s >= t (as in gae). For a response that is one contiguous run
    of ones this is the usual discounted return to the end of the response; rewards outside the
    mask are ignored (they may hold anything, inf included). With the score on the last token and
    a per-token KL penalty (shape_rewards) and gamma = 1, G_t is the score minus the KL of tokens
    t.. onwards: REINFORCE++'s token-level return, whose advantage is G_t normalised over the batch.
    The function does not detach; call it on detached rewards (rollout time).
    Reference: Hu et al. 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both
    Prompt and Reward Models" (arXiv:2501.03262); Williams 1992, "Simple Statistical
    Gradient-Following Algorithms for Connectionist Reinforcement Learning" (Machine Learning 8).

    Shape: rewards (B, T), response_mask (B, T). Returns (B, T) in rewards' dtype, 0 outside the mask.
    """
    check_ndim("rewards", rewards, 2, "(B, T)")
    check_same_shape("rewards", rewards, response_mask=response_mask)
    check_unit_interval("gamma", gamma)
    # bf16/fp16 cannot hold gamma^k or long discounted sums accurately.
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    inside, m = response_mask != 0, response_mask.to(dtype)
    masked = torch.where(inside, rewards.to(dtype) * m, 0.0)
    discount = _discount_matrix(gamma, rewards.shape[1], dtype, rewards.device)
    to_go = torch.einsum("ts,bs->bt", discount, masked)
    return torch.where(inside, m * to_go, 0.0).to(rewards.dtype)


def _group_index(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check (B,) scores and (B,) group ids; return each row's group index 0..K-1 and the (K,) group sizes."""
    check_ndim("scores", scores, 1, "(B,)")
    check_tensor("group_ids", group_ids)
    if group_ids.shape != scores.shape:
        raise ValueError(
            f"group_ids must have shape (B,) = {tuple(scores.shape)} like scores, got {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    # Any ids work (e.g. prompt indices of a shuffled or filtered batch): map them to 0..K-1.
    _, index = torch.unique(group_ids, return_inverse=True)
    sizes = torch.bincount(index)
    return index, sizes


def _group_mean(x: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of x over each row's group, gathered back to the rows. Shape: (B,) -> (B,)."""
    sums = torch.zeros(sizes.shape[0], dtype=x.dtype, device=x.device).index_add_(0, index, x)
    return (sums / sizes.to(x.dtype))[index]


def contiguous_group_ids(batch_size: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Group ids of a batch whose rows come in contiguous groups: [0]*G + [1]*G + ... .

    The layout `Policy.generate(..., samples_per_prompt=G)` produces (it sets `group_ids` itself);
    for building inputs of the baselines by hand.

    Shape: returns (batch_size,) int64, batch_size = n_prompts * group_size.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if batch_size % group_size:
        raise ValueError(f"group_size {group_size} must divide the batch size {batch_size}")
    return torch.arange(batch_size // group_size, device=device).repeat_interleave(group_size)


def baseline_none(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """No baseline: the advantage is the raw score (group_ids are checked, then unused).

    Formula: A_i = R_i.
    Reference: Williams 1992, "Simple Statistical Gradient-Following Algorithms for
    Connectionist Reinforcement Learning" (Machine Learning 8).

    Shape: scores (B,), group_ids (B,) integer -> (B,).
    """
    _group_index(scores, group_ids)
    return scores.clone()


def baseline_batch_mean(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Subtract the mean score of the whole batch (group_ids are checked, then unused).

    Formula: A_i = R_i - (1/B) sum_j R_j.
    Reference: Williams 1992, "Simple Statistical Gradient-Following Algorithms for
    Connectionist Reinforcement Learning" (Machine Learning 8), reinforcement baseline.

    Shape: scores (B,), group_ids (B,) integer -> (B,).
    """
    _group_index(scores, group_ids)
    return scores - scores.mean()


def baseline_leave_one_out(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO: subtract the mean score of the other samples for the same prompt.

    Formula: with g(i) the rows sharing row i's group id and n = |g(i)|,
        A_i = R_i - 1/(n-1) sum_{j in g(i), j != i} R_j = n/(n-1) * (R_i - mean_{g(i)} R).
        Leaving sample i out keeps the baseline independent of it, so the gradient stays
        unbiased. Groups may sit anywhere in the batch and differ in size; each needs n >= 2.
    Reference: Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"
    (ICLR 2019 workshop); Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs" (arXiv:2402.14740).

    Shape: scores (B,), group_ids (B,) integer (rows with equal ids come from one prompt) -> (B,).
    """
    index, sizes = _group_index(scores, group_ids)
    if bool((sizes < 2).any()):
        lonely = torch.unique(group_ids)[sizes < 2].tolist()
        raise ValueError(
            f"leave_one_out needs >= 2 samples in every group (group_size >= 2); groups {lonely} have 1"
        )
    n = sizes.to(scores.dtype)[index]
    return (scores - _group_mean(scores, index, sizes)) * (n / (n - 1))


def _constant_groups(scores: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Whether each row's group holds one value only (max == min). Shape: (B,) -> (B,) bool."""
    values, k = scores.detach(), sizes.shape[0]
    high = values.new_empty(k).scatter_reduce_(0, index, values, reduce="amax", include_self=False)
    low = values.new_empty(k).scatter_reduce_(0, index, values, reduce="amin", include_self=False)
    return (high == low)[index]


def baseline_group_norm(scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: standardise each score within the group of samples for its prompt.

    Formula: A_i = (R_i - mean_{g(i)} R) / (std_{g(i)} R + eps), with g(i) the rows sharing row
        i's group id and std the population standard deviation sqrt(1/n sum_j (R_j - mean)^2)
        (unbiased=False), so a group of two scores {a, b} maps to {+1, -1} (up to eps) and a
        group of one is defined (gives 0). Groups may sit anywhere in the batch and differ in size.
        A group whose scores are all equal (max == min) gives exactly A = 0, whatever eps (0
        included): in floating point its mean can differ from the scores by an ulp, and that
        rounding error divided by a std of a few ulps plus eps would be a spurious advantage (or
        NaN with eps = 0).
    Reference: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
    Open Language Models" (arXiv:2402.03300), outcome supervision in GRPO.

    Shape: scores (B,), group_ids (B,) integer (rows with equal ids come from one prompt) -> (B,).
    """
    index, sizes = _group_index(scores, group_ids)
    check_positive("eps", eps, allow_zero=True)
    centered = scores - _group_mean(scores, index, sizes)
    std = _group_mean(centered**2, index, sizes).sqrt()
    constant = _constant_groups(scores, index, sizes)
    # The denominator of a constant group is replaced by 1 so nothing (not even backward) sees 0/0.
    scaled = centered / torch.where(constant, torch.ones_like(std), std + eps)
    return torch.where(constant, torch.zeros_like(scaled), scaled)


def baseline_group_mean(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: subtract the mean score of the group of samples for the same prompt (no std).

    Formula: A_i = R_i - mean_{g(i)} R, with g(i) the rows sharing row i's group id. Unlike
        group_norm there is no division by the group's std, which would weigh prompts that are
        nearly always (or never) solved more heavily. A group whose scores are all equal gives
        exactly 0 (its floating-point mean may be an ulp off the scores). Groups may sit anywhere
        in the batch and differ in size; a group of one gives 0.
    Reference: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
    (arXiv:2503.20783), Dr. GRPO.

    Shape: scores (B,), group_ids (B,) integer (rows with equal ids come from one prompt) -> (B,).
    """
    index, sizes = _group_index(scores, group_ids)
    centered = scores - _group_mean(scores, index, sizes)
    return torch.where(_constant_groups(scores, index, sizes), torch.zeros_like(centered), centered)


BASELINES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "none": baseline_none,
    "batch_mean": baseline_batch_mean,
    "leave_one_out": baseline_leave_one_out,
    "group_norm": baseline_group_norm,
    "group_mean": baseline_group_mean,
}


def reinforce_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, baseline: str = "batch_mean"
) -> torch.Tensor:
    """Per-sequence REINFORCE advantages with the baseline chosen by name from BASELINES.

    Formula: see baseline_none ("none"), baseline_batch_mean ("batch_mean"),
        baseline_leave_one_out ("leave_one_out"), baseline_group_norm ("group_norm"),
        baseline_group_mean ("group_mean").
    Reference: Williams 1992, "Simple Statistical Gradient-Following Algorithms for
    Connectionist Reinforcement Learning" (Machine Learning 8), and the per-baseline papers.

    Shape: scores (B,), group_ids (B,) integer -> (B,).
    """
    check_choice("baseline", baseline, BASELINES)
    return BASELINES[baseline](scores, group_ids)


def whiten_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Whiten advantages over the response tokens of the batch (zero mean, unit variance).

    Formula: A' = (A - mu) / sqrt(var + 1e-8) on masked positions, 0 elsewhere, with mu and the
        unbiased var taken over masked positions (masked_whiten with shift_mean=True).
    Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593); common PPO practice.

    Shape: advantages (B, T), response_mask (B, T) -> (B, T).
    """
    check_same_shape("advantages", advantages, response_mask=response_mask)
    return masked_whiten(advantages, response_mask, shift_mean=True)
