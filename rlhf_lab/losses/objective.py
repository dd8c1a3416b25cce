"""The online RL objective: per-token reward shaping, the overlong penalty, the KL-in-loss term,
and the combined loss.

The online loop (PPO, REINFORCE, RLOO, GRPO, TRPO) gathers tensors and calls these; the knobs
`kl_in`, `kl_estimator`, `kl_coef`, `missing_eos_penalty`, `entropy_coef` and `vf_coef` act here.
"""

from __future__ import annotations

import torch

from rlhf_lab.checks import check_ndim, check_positive, check_same_shape, check_tensor
from rlhf_lab.losses.kl import kl_penalty
from rlhf_lab.losses.masked import masked_mean, masked_sum

__all__ = ["shape_rewards", "overlong_penalty", "kl_loss", "online_objective"]


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    kl_in_reward: bool = True,
    ended_with_eos: torch.Tensor | None = None,
    missing_eos_penalty: float = 0.0,
) -> torch.Tensor:
    """Per-token rewards of a rollout: the sequence score on its last response token, minus a KL penalty.

    Formula: with m = response_mask, beta = kl_coef, KL_t the chosen per-token estimator of
        KL(pi || pi_ref) on the sampled tokens (kl_penalty), and t_last the last response token
        of the row (EOS, or the last token sampled before the length limit),
            s'  = s - missing_eos_penalty * [row did not end with EOS]
            r_t = -beta * KL_t * m_t + [t = t_last] * s'        (kl_in_reward True)
            r_t = [t = t_last] * s'                             (kl_in_reward False: the KL is a
                                                                 loss term instead, see kl_loss)
        The KL term is a per-token penalty so GAE credits it to the token that caused it, and the
        score lands once, at the end, because the reward model judges the whole response.
    Logprobs are those of the sampling policy (no gradient flows; this runs at rollout time).
    Padding may hold -inf log-probs: positions outside the mask are set to 0 with torch.where.
    Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593), Section 2.2; Ouyang et al. 2022, "Training language models to follow
    instructions with human feedback" (arXiv:2203.02155), eq. (2); missing-EOS penalty from
    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (arXiv:2403.17031).

    Shape: scores (B,), logprobs (B, T), ref_logprobs (B, T), response_mask (B, T) with at least
    one response token per row, ended_with_eos (B,) bool (needed when missing_eos_penalty > 0).
    Returns rewards (B, T) in float32 or the wider dtype of scores / logprobs, 0 outside the mask.
    """
    check_ndim("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    check_ndim("scores", scores, 1, "(B,)")
    if scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"scores must have shape (B,) = ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    check_positive("kl_coef", kl_coef, allow_zero=True)
    check_positive("missing_eos_penalty", missing_eos_penalty, allow_zero=True)
    mask = response_mask.float()
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("response_mask must have at least one response token per row (the score goes on the last)")
    if missing_eos_penalty:
        if ended_with_eos is None:
            raise ValueError("missing_eos_penalty > 0 needs ended_with_eos (B,)")
        check_same_shape("scores", scores, ended_with_eos=ended_with_eos)
        scores = scores - missing_eos_penalty * (~ended_with_eos.bool()).float()
    dtype = torch.promote_types(torch.promote_types(scores.dtype, logprobs.dtype), torch.float32)
    rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if kl_in_reward:
        kl = kl_coef * kl_penalty(logprobs, ref_logprobs, kl_estimator)
        rewards -= torch.where(mask != 0, kl, 0.0)
    # The column of each row's last response token: the largest masked column index.
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores
    return rewards


def overlong_penalty(
    lengths: torch.Tensor, max_length: float, buffer: float, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment: a length penalty that ramps up over the last `buffer` tokens.

    Formula: with L = max_length, L_b = buffer and |y| the response length,
        R_len(y) = 0                                  |y| <= L - L_b
                 = -penalty * (|y| - (L - L_b)) / L_b   L - L_b < |y| <= L
                 = -penalty                           |y| > L
        (continuous: -penalty at |y| = L). Added to the sequence score, it tells a truncated
        response apart from a finished one without punishing a long correct answer all at once.
    Reference: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
    (arXiv:2503.14476), soft overlong punishment.

    Shape: lengths (B,) response token counts (any real dtype). Returns (B,) in float32 or the
    wider floating dtype of lengths.
    """
    check_ndim("lengths", lengths, 1, "(B,)")
    check_positive("max_length", max_length)
    check_positive("buffer", buffer)
    if buffer > max_length:
        raise ValueError(f"buffer must be <= max_length ({max_length}), got {buffer!r}")
    check_positive("penalty", penalty, allow_zero=True)
    dtype = torch.promote_types(lengths.dtype, torch.float32) if lengths.is_floating_point() else torch.float32
    # ((L - L_b) - |y|) clamped to [-L_b, 0] is 0 up to L - L_b (a +0, never -0) and -L_b beyond L.
    short_by = ((max_length - buffer) - lengths.to(dtype)).clamp(min=-buffer, max=0.0)
    return short_by * (penalty / buffer)


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_estimator: str = "k3",
    tokens: float | None = None,
    *,
    old_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KL to the reference as a loss term: the token mean of a per-token estimator.

    Formula: L_KL = sum_{b,t} m KL_t / sum_{b,t} m, with KL_t = kl_penalty(logprobs,
        ref_logprobs, kl_estimator) the per-token estimate of KL(pi || pi_ref) on the sampled
        tokens (k3 = exp(d) - d - 1 with d = log pi_ref - log pi in GRPO). Gradients flow through
        logprobs (the current policy); ref_logprobs is a constant. Weighted by beta in
        online_objective. With `tokens` (the response-token count of the whole batch these rows
        are a part of) the divisor is `tokens`, so the parts add up to the batch's mean.
    old_logprobs (the policy that sampled the tokens, pi_old): each term is importance-weighted,
        KL_t <- rho_t KL_t with rho_t = exp(log pi - log pi_old) (gradient through log pi; its value
        is 1 on-policy). The gradient of a KL estimate in the loss is taken with the samples held
        fixed, and only the weight makes it unbiased:
          E_{x~pi_old}[grad (rho k)] = grad sum_x pi_old (pi / pi_old) k = grad E_pi[k],
        which is grad KL(pi || pi_ref) for the estimators with an unbiased value, k1 and k3, at any
        pi (pi = pi_old included: then grad (rho k3) = k3 grad log pi + grad k3, the score-function
        term k3 grad log pi being what k3 alone lacks), and in later PPO epochs where pi has moved
        away from pi_old. Without the weight, E_pi_old[grad k3] = grad KL(pi_ref || pi) on-policy
        (kl_k3_plus derives it). With the weight, k2 gives grad E_pi[k2] (biased: k2's value is)
        and "k3+" adds E_pi[k3 grad log pi] to the exact gradient: use k1 or k3 with old_logprobs,
        and "k3+" or k2 without.
    Reference: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
    Open Language Models" (arXiv:2402.03300), eq. (3)-(4); estimators from Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html; the gradient analysis
    from Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"
    (arXiv:2506.09477).

    Shape: logprobs (B, T), ref_logprobs (B, T), response_mask (B, T), old_logprobs (B, T).
    Returns (loss scalar, {"kl_loss"}).
    """
    check_ndim("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    if old_logprobs is not None:
        check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs)
    # Padding can hold -inf log-probs; finite values there keep the estimator's backward finite
    # (the masked mean never reads them, so the value is unchanged).
    logprobs = torch.where(response_mask != 0, logprobs, 0.0)
    ref_logprobs = torch.where(response_mask != 0, ref_logprobs.detach(), 0.0)
    per_token = kl_penalty(logprobs, ref_logprobs, kl_estimator)
    if old_logprobs is not None:
        log_rho = torch.where(response_mask != 0, logprobs - old_logprobs.detach(), 0.0)
        per_token = torch.exp(log_rho) * per_token
    value = masked_mean(per_token, response_mask) if tokens is None else masked_sum(per_token, response_mask) / tokens
    return value, {"kl_loss": value.detach()}


def _check_scalar(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x)
    if x.ndim != 0:
        raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(x.shape)}")


def online_objective(
    policy_loss: torch.Tensor,
    entropy: torch.Tensor | None = None,
    value_loss: torch.Tensor | None = None,
    kl_term: torch.Tensor | None = None,
    *,
    entropy_coef: float = 0.0,
    vf_coef: float = 0.0,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one online update: policy loss, entropy bonus, value loss and KL term combined.

    Formula: L = L_policy - c_H * H  [+ c_V * L_V]  [+ beta * L_KL]
        with H the mean entropy (entropy_bonus), L_V the value loss (ppo_value_loss, with a
        critic), L_KL the KL-in-loss term (kl_loss, with kl_in="loss"); a term that is None is
        left out, and so is the entropy bonus when entropy is None. The terms are added in this
        order (the order of the sums is part of the numerics).
        A coefficient without its term would silently do nothing, so a nonzero entropy_coef,
        vf_coef or kl_coef with that term None is a ValueError.
    Metrics (detached): loss, policy_loss, and entropy, value_loss, kl_loss for the terms given.
    Reference: Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
    (arXiv:1707.06347), eq. (9) (L^{CLIP+VF+S}); the KL term as in GRPO, Shao et al. 2024
    (arXiv:2402.03300), eq. (3).

    Shape: every term a scalar tensor. Returns (loss scalar, metrics).
    """
    _check_scalar("policy_loss", policy_loss)
    check_positive("entropy_coef", entropy_coef, allow_zero=True)
    check_positive("vf_coef", vf_coef, allow_zero=True)
    check_positive("kl_coef", kl_coef, allow_zero=True)
    metrics = {"policy_loss": policy_loss.detach()}
    loss = policy_loss
    for name, term, coef, coef_name in (("entropy", entropy, entropy_coef, "entropy_coef"),
                                        ("value_loss", value_loss, vf_coef, "vf_coef"),
                                        ("kl_loss", kl_term, kl_coef, "kl_coef")):
        if term is None:
            if coef:
                raise ValueError(f"{coef_name} = {coef} has no {name} term to weight (it is None)")
            continue
        _check_scalar(name, term)
        metrics[name] = term.detach()
    if entropy is not None:
        loss = loss - entropy_coef * entropy
    if value_loss is not None:
        loss = loss + vf_coef * value_loss
    if kl_term is not None:
        loss = loss + kl_coef * kl_term
    metrics["loss"] = loss.detach()
    return loss, metrics
