"""The objective of Trust Region Policy Optimization: its surrogate loss and its KL constraint.

TRPO minimises the importance-weighted surrogate L(theta) subject to KL(pi_old || pi_theta) <=
delta on the same rollouts as PPO. The two pure functions here are that objective and that
constraint; the update rule that solves the constrained problem (conjugate gradient on
Fisher-vector products, then a KL-safe line search) overwrites parameters, so it lives in
`rlhf_lab.optim.trpo`.
Reference: Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv:1502.05477).
"""

from __future__ import annotations

import torch

from rlhf_lab.checks import check_ndim, check_same_shape
from rlhf_lab.losses.masked import masked_mean
from rlhf_lab.losses.ppo import ppo_policy_loss

__all__ = ["surrogate_loss", "mean_kl"]


def surrogate_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-weighted surrogate loss of TRPO (no clipping: the trust region bounds the step).

    Formula: r_t = exp(log pi(a_t) - log pi_old(a_t)),
        L = -sum_{b,t} m r_t A_t / sum_{b,t} m
    At theta = theta_old its gradient is the vanilla policy gradient -masked_mean(A grad log pi).
    This is exactly ppo_policy_loss with clip_ratio=None, ratio_level "token" and aggregation
    "token_mean", and is computed by it so that TRPO and PPO optimise the same objective.
    Metrics (detached): policy_loss; ratio = masked mean of r.
    advantages and old_logprobs are treated as constants (detached).
    Reference: Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv:1502.05477),
    eq. (14).

    Shape: logprobs (B, T), old_logprobs (B, T), advantages (B, T) or (B,) (one advantage per
    sequence, broadcast over T), response_mask (B, T). Returns (loss scalar,
    {"policy_loss", "ratio"}).
    """
    loss, metrics = ppo_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_ratio=None,
        ratio_level="token",
        aggregation="token_mean",
    )
    return loss, {"policy_loss": metrics["policy_loss"], "ratio": metrics["ratio"]}


def mean_kl(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Masked mean k3 estimate of KL(pi_old || pi) on tokens sampled from pi_old.

    Formula: with u_t = log pi(a_t) - log pi_old(a_t) and r_t = exp(u_t),
        k3_t = (r_t - 1) - u_t = exp(u_t) - u_t - 1            (>= 0 per token)
        KL = sum_{b,t} m k3_t / sum_{b,t} m
    Unbiased: E_{a ~ pi_old}[r - 1] = 0 and E_{a ~ pi_old}[-u] = KL(pi_old || pi), the direction
    TRPO constrains (the rollout policy is the first argument). This is the same per-token
    quantity as the approx_kl metric of ppo_policy_loss.

    Why it also serves the Fisher-vector product: with old_logprobs detached and
    l = log pi_theta(a), per token
        grad k3    = (e^u - 1) grad l
        hessian k3 = e^u grad l grad l^T + (e^u - 1) hessian l
    and at theta = theta_old (u = 0) the second term vanishes, leaving grad l grad l^T. So the
    exact Hessian of this KL at theta_old (what double backward computes) is the mean over the
    sampled tokens of the score outer products, whose expectation over a ~ pi_old is the Fisher
    matrix F = E[grad log pi grad log pi^T]. It is positive semi-definite for every sample, which
    conjugate gradient needs; the k1 estimate -u has Hessian -hessian l instead, equal to F only
    in expectation and possibly indefinite on a finite batch.
    The mirrored form exp(-u) + u - 1 (k3 for KL(pi || pi_old), which assumes samples from pi)
    has the same Hessian at theta_old but is biased on pi_old's samples once theta moves; it
    is not used.
    old_logprobs is treated as a constant (detached).
    Reference: Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv:1502.05477),
    Appendix C (Fisher-vector products from the KL Hessian); k3 from Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

    Shape: logprobs (B, T), old_logprobs (B, T), response_mask (B, T). Returns a scalar tensor.
    """
    check_ndim("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    log_ratio = logprobs - old_logprobs.detach()
    # Padding can hold -inf log-probs; a finite log-ratio there keeps exp and backward finite.
    log_ratio = torch.where(response_mask != 0, log_ratio, 0.0)
    # expm1 keeps precision for the tiny u of a policy near theta_old, where exp(u) - 1 would
    # cancel catastrophically.
    return masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask)
