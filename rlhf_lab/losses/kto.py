"""KTO: Kahneman-Tversky optimisation on unpaired rows, each a desirable or an undesirable answer.

Inputs are per-sequence sums of the response-token log-probs, shape (B,), as in `dpo.py`. Beyond
its own rows the loss reads one number, the reference point z0: a detached estimate of
KL(pi || pi_ref) on mismatched (prompt, completion) pairs. `kto_kl` computes that estimate as a
sum over rows with a given divisor, so the parts of a batch (micro-batches, ranks) add up to the
whole batch's estimate before `kto_loss` reads it.
"""

from __future__ import annotations

import torch

from rlhf_lab.checks import check_ndim, check_positive, check_same_shape

__all__ = ["kto_kl", "kto_loss"]

LossOut = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _check_rows(name: str, logps: torch.Tensor, **others: torch.Tensor) -> None:
    check_ndim(name, logps, 1, "(B,)")
    check_same_shape(name, logps, **others)
    if logps.numel() == 0:
        raise ValueError(f"{name} must hold at least one row, got an empty batch")


def kto_kl(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor, rows: float | None = None) -> torch.Tensor:
    """KTO's estimate of KL(pi || pi_ref) on mismatched pairs: the reference point before its clamp.

    Formula: KL = (1 / M) sum_j [ log pi(y_m(j) | x_j) - log pi_ref(y_m(j) | x_j) ]
        over M rows j, each prompt x_j followed by another row's completion y_m(j) (sequence sums
        of the completion's log-probs). With `rows` (the row count of the whole batch these rows
        are a part of) the divisor is `rows` instead of M, so the parts' estimates add up to the
        batch's. Detached: z0 is a baseline, and KTO passes no gradient through it.
    Reference: Ethayarajh, Xu, Muennighoff, Jurafsky & Kiela 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization" (arXiv:2402.01306), section 4 (the estimate of z0).

    Shape: kl_policy_logps, kl_ref_logps (M,). Returns a detached scalar.
    """
    _check_rows("kl_policy_logps", kl_policy_logps, kl_ref_logps=kl_ref_logps)
    if rows is not None:
        check_positive("rows", rows)
    divisor = kl_policy_logps.numel() if rows is None else rows
    return (kl_policy_logps.detach() - kl_ref_logps.detach()).sum() / divisor


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    counts: tuple[float, float] | None = None,
) -> LossOut:
    """KTO: the prospect-theoretic value of each row's implicit reward against a KL reference point.

    Formula: r = log pi(y | x) - log pi_ref(y | x)          (sequence sums; the reference detached)
        z0 = max(0, KL), detached                        (KL from kto_kl on mismatched pairs)
        v = lambda_D sigmoid(beta (r - z0))   for a desirable row
        v = lambda_U sigmoid(beta (z0 - r))   for an undesirable row
        loss = mean over rows of (lambda_y - v), lambda_y the row's own weight, i.e.
             lambda_D (1 - sigmoid(beta (r - z0))) or lambda_U (1 - sigmoid(beta (z0 - r))).
        lambda_D = desirable_weight, lambda_U = undesirable_weight. The paper advises
        lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable rows.
    Metrics (detached): rewards_chosen = mean beta r over the desirable rows, rewards_rejected =
    mean beta r over the undesirable rows (0 for a class without rows), reward_margin = their
    difference, reward_accuracy = fraction of rows on the side of z0 their label asks for
    (r > z0 desirable, r < z0 undesirable), loss.
    counts = (N_D, N_U): these rows are a part (a micro-batch, one rank's share) of a batch with
        N_D desirable and N_U undesirable rows. Every mean above is then a sum over these rows
        divided by those counts, so the parts' loss and metrics add up to the whole batch's.
    The reference log-probs and kl are treated as constants (detached).
    Reference: Ethayarajh, Xu, Muennighoff, Jurafsky & Kiela 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization" (arXiv:2402.01306).

    Shape: policy_logps, ref_logps (B,), desirable (B,) bool (True = desirable), kl a scalar.
    Returns (loss scalar, {"rewards_chosen", "rewards_rejected", "reward_margin",
    "reward_accuracy", "loss"}).
    """
    _check_rows("policy_logps", policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor (True = desirable), got {desirable.dtype}")
    check_positive("beta", beta)
    check_positive("desirable_weight", desirable_weight)
    check_positive("undesirable_weight", undesirable_weight)
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device)
    if kl.ndim != 0:
        raise ValueError(f"kl must be a scalar, got shape {tuple(kl.shape)}")
    if counts is None:
        n_d, n_u = float(desirable.sum()), float((~desirable).sum())
    else:
        n_d, n_u = (float(c) for c in counts)
        if n_d < 0 or n_u < 0 or n_d + n_u <= 0:
            raise ValueError(f"counts must be (desirable rows, undesirable rows) >= 0 with a positive sum, "
                             f"got {counts}")

    z0 = kl.detach().clamp(min=0.0)
    r = policy_logps - ref_logps.detach()
    # sigmoid(beta (r - z0)) for desirable rows, sigmoid(beta (z0 - r)) for undesirable ones.
    sign = torch.where(desirable, 1.0, -1.0).to(r.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(r.dtype)
    value = weight * torch.sigmoid(beta * sign * (r - z0))
    loss = (weight - value).sum() / (n_d + n_u)

    with torch.no_grad():
        rewards = beta * r.detach()
        chosen = torch.where(desirable, rewards, 0.0).sum() / max(n_d, 1.0)
        rejected = torch.where(desirable, 0.0, rewards).sum() / max(n_u, 1.0)
        right_side = (sign * (r.detach() - z0)) > 0
        metrics = {
            "rewards_chosen": chosen,
            "rewards_rejected": rejected,
            "reward_margin": chosen - rejected,
            "reward_accuracy": right_side.to(r.dtype).sum() / (n_d + n_u),
            "loss": loss.detach(),
        }
    return loss, metrics
