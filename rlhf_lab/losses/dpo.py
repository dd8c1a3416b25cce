"""Direct preference losses on sequence log-probs: DPO, IPO, hinge, robust DPO, SimPO and ORPO.

Every variant is a small function with the same keyword interface (it accepts and ignores the
arguments it does not use), picked by name from DPO_LOSSES, so a new one is one more entry, not
one more branch. Inputs are per-sequence sums of the response-token log-probs, shape (B,).
KTO learns from unpaired rows rather than pairs and has its own file, `kto.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhf_lab.checks import check_choice, check_ndim, check_positive, check_same_shape

__all__ = [
    "dpo_sigmoid",
    "dpo_ipo",
    "dpo_hinge",
    "dpo_robust",
    "dpo_robust_unbiased",
    "simpo",
    "orpo",
    "chosen_nll",
    "DPO_LOSSES",
    "preference_loss",
]

LossOut = tuple[torch.Tensor, dict[str, torch.Tensor]]


# --- argument checks and shared pieces ---------------------------------------------------------


def _require(name: str, value: torch.Tensor | None, variant: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{name} is required by the {variant!r} preference loss, got None")
    return value


def _check_policy(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> None:
    check_ndim("policy_chosen_logps", policy_chosen_logps, 1, "(B,)")
    check_same_shape(
        "policy_chosen_logps", policy_chosen_logps, policy_rejected_logps=policy_rejected_logps
    )
    if policy_chosen_logps.numel() == 0:
        raise ValueError("policy_chosen_logps must hold at least one pair, got an empty batch")


def _reference_log_ratios(
    variant: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the four (B,) inputs and return the log-ratios log pi/pi_ref of chosen and rejected.

    The reference log-probs are treated as constants (detached).
    """
    _check_policy(policy_chosen_logps, policy_rejected_logps)
    ref_chosen_logps = _require("ref_chosen_logps", ref_chosen_logps, variant)
    ref_rejected_logps = _require("ref_rejected_logps", ref_rejected_logps, variant)
    check_same_shape(
        "policy_chosen_logps",
        policy_chosen_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return (
        policy_chosen_logps - ref_chosen_logps.detach(),
        policy_rejected_logps - ref_rejected_logps.detach(),
    )


def _implicit_rewards(
    variant: str,
    beta: float,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check beta and the inputs; return DPO's implicit rewards beta log pi/pi_ref, each (B,)."""
    check_positive("beta", beta)
    chosen_lr, rejected_lr = _reference_log_ratios(
        variant, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return beta * chosen_lr, beta * rejected_lr


def _lengths(
    variant: str,
    policy_chosen_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the (B,) response lengths (> 0) and return them in the dtype of the log-probs."""
    chosen_lengths = _require("chosen_lengths", chosen_lengths, variant)
    rejected_lengths = _require("rejected_lengths", rejected_lengths, variant)
    check_same_shape(
        "policy_chosen_logps",
        policy_chosen_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    named = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    for name, lengths in named.items():
        if not bool((lengths > 0).all()):
            raise ValueError(f"{name} must be > 0 for every pair, got {lengths.tolist()}")
    dtype = policy_chosen_logps.dtype
    return chosen_lengths.detach().to(dtype), rejected_lengths.detach().to(dtype)


def _check_label_smoothing(value: float, allow_half: bool) -> None:
    ok = 0.0 <= value <= 0.5 if allow_half else 0.0 <= value < 0.5
    if not ok:
        bound = "[0, 0.5]" if allow_half else "[0, 0.5)"
        raise ValueError(f"label_smoothing must be in {bound}, got {value!r}")


def _metrics(
    loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    margin = chosen - rejected
    return {
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "reward_margin": margin.mean(),
        "reward_accuracy": (margin > 0).to(margin.dtype).mean(),
        "loss": loss.detach(),
    }


# --- variants ----------------------------------------------------------------------------------


def dpo_sigmoid(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    **_: object,
) -> LossOut:
    """DPO: logistic (Bradley-Terry) loss on the implicit reward beta * log(pi / pi_ref).

    Formula: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r), h = r_c - r_r
             = beta [(pi_c - ref_c) - (pi_r - ref_r)]
        loss = mean_b( -log sigmoid(h) ), computed as -logsigmoid (stable for large |h|).
        Here pi_* and ref_* are summed response log-probs under the policy and the reference.
    Metrics (detached): rewards_chosen = mean r_c, rewards_rejected = mean r_r, reward_margin =
    mean(r_c - r_r), reward_accuracy = fraction with r_c > r_r, loss.
    The reference log-probs are treated as constants (detached).
    Reference: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model" (arXiv:2305.18290).

    Shape: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
    Other keyword arguments are ignored. Returns (loss scalar, metrics).
    """
    chosen_rewards, rejected_rewards = _implicit_rewards(
        "sigmoid", beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, _metrics(loss, chosen_rewards, rejected_rewards)


def dpo_ipo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    beta: float = 0.1,
    **_: object,
) -> LossOut:
    """IPO: squared regression of the length-normalised log-ratio gap onto 1 / (2 beta).

    Formula: u = (pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r
        loss = mean_b( (u - 1 / (2 beta))^2 )
        beta is the paper's regularisation tau: a smaller beta asks for a larger gap. The paper
        uses summed log-ratios; dividing by the response length (the per-token mean log-ratio)
        follows common implementations and keeps the target 1/(2 beta) independent of length.
    Metrics (detached): as dpo_sigmoid, on the unnormalised implicit reward
    r = beta (pi - ref), so they compare across DPO variants; the loss itself uses u.
    The reference log-probs and the lengths are treated as constants (detached).
    Reference: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences" (arXiv:2310.12036).

    Shape: the four log-probs (B,), chosen_lengths and rejected_lengths (B,) float or int, > 0.
    Other keyword arguments are ignored. Returns (loss scalar, metrics).
    """
    check_positive("beta", beta)
    chosen_lr, rejected_lr = _reference_log_ratios(
        "ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    len_c, len_r = _lengths("ipo", policy_chosen_logps, chosen_lengths, rejected_lengths)
    gap = chosen_lr / len_c - rejected_lr / len_r
    loss = ((gap - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _metrics(loss, beta * chosen_lr, beta * rejected_lr)


def dpo_hinge(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    **_: object,
) -> LossOut:
    """SLiC-style hinge loss on the DPO implicit-reward gap.

    Formula: h = beta [(pi_c - ref_c) - (pi_r - ref_r)] as in dpo_sigmoid
        loss = mean_b( max(0, 1 - h) )
        Pairs whose gap already exceeds 1 contribute neither loss nor gradient.
    Metrics (detached): as dpo_sigmoid.
    The reference log-probs are treated as constants (detached).
    Reference: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"
    (arXiv:2305.10425); the reference-normalised form as in Liu et al. 2023, "Statistical
    Rejection Sampling Improves Preference Optimization" (arXiv:2309.06657).

    Shape: the four log-probs (B,). Other keyword arguments are ignored.
    Returns (loss scalar, metrics).
    """
    chosen_rewards, rejected_rewards = _implicit_rewards(
        "hinge", beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = torch.relu(1.0 - (chosen_rewards - rejected_rewards)).mean()
    return loss, _metrics(loss, chosen_rewards, rejected_rewards)


def dpo_robust(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: object,
) -> LossOut:
    """Conservative DPO (cDPO): DPO with labels smoothed by the flip probability eps.

    Formula: h as in dpo_sigmoid, eps = label_smoothing in [0, 0.5]
        loss = mean_b( -(1 - eps) log sigmoid(h) - eps log sigmoid(-h) )
        i.e. cross-entropy against the soft label (1 - eps, eps); since -log sigmoid(-h) =
        -log sigmoid(h) + h this equals mean( -log sigmoid(h) + eps h ), and its minimum is at
        the finite gap h = log((1 - eps) / eps). eps = 0 is dpo_sigmoid.
        See dpo_robust_unbiased for the debiased loss of Chowdhury et al. 2024, which divides by
        (1 - 2 eps) and subtracts the flipped term instead of adding it.
    Metrics (detached): as dpo_sigmoid.
    The reference log-probs are treated as constants (detached).
    Reference: Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"
    (cDPO); Rafailov et al. 2023 (arXiv:2305.18290) for h.

    Shape: the four log-probs (B,). Other keyword arguments are ignored.
    Returns (loss scalar, metrics).
    """
    _check_label_smoothing(label_smoothing, allow_half=True)
    chosen_rewards, rejected_rewards = _implicit_rewards(
        "robust", beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = chosen_rewards - rejected_rewards
    eps = label_smoothing
    loss = (-(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)).mean()
    return loss, _metrics(loss, chosen_rewards, rejected_rewards)


def dpo_robust_unbiased(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: object,
) -> LossOut:
    """Robust DPO: the DPO loss debiased for preference labels flipped with probability eps.

    Formula: h as in dpo_sigmoid, eps = label_smoothing in [0, 0.5)
        loss = mean_b( ((1 - eps)(-log sigmoid(h)) - eps (-log sigmoid(-h))) / (1 - 2 eps) )
             = mean_b( -log sigmoid(h) - eps h / (1 - 2 eps) )
        Its expectation under eps-flipped labels is the clean DPO loss. Unlike dpo_robust it is
        not bounded below (it falls linearly in h once -log sigmoid(h) flattens), so it relies on
        early stopping / the implicit KL rather than a finite optimum. eps = 0 is dpo_sigmoid.
    Metrics (detached): as dpo_sigmoid.
    The reference log-probs are treated as constants (detached).
    Reference: Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback" (arXiv:2403.00409).

    Shape: the four log-probs (B,). Other keyword arguments are ignored.
    Returns (loss scalar, metrics).
    """
    _check_label_smoothing(label_smoothing, allow_half=False)
    chosen_rewards, rejected_rewards = _implicit_rewards(
        "robust_unbiased",
        beta,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    h = chosen_rewards - rejected_rewards
    eps = label_smoothing
    per_pair = (1.0 - eps) * -F.logsigmoid(h) - eps * -F.logsigmoid(-h)
    loss = (per_pair / (1.0 - 2.0 * eps)).mean()
    return loss, _metrics(loss, chosen_rewards, rejected_rewards)


def simpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    beta: float = 2.0,
    gamma: float = 0.5,
    **_: object,
) -> LossOut:
    """SimPO: reference-free logistic loss on the length-normalised log-prob with a target margin.

    Formula: r_c = beta pi_c / len_c, r_r = beta pi_r / len_r
        h = r_c - r_r - gamma = beta (pi_c / len_c - pi_r / len_r) - gamma
        loss = mean_b( -log sigmoid(h) ), computed as -logsigmoid.
    Metrics (detached): rewards_chosen = mean r_c, rewards_rejected = mean r_r, reward_margin =
    mean(r_c - r_r) (without gamma), reward_accuracy = fraction with r_c > r_r, loss.
    No reference model: ref_* arguments, if passed, are ignored. The lengths are treated as
    constants (detached).
    Reference: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward" (arXiv:2405.14734).

    Shape: policy_chosen_logps, policy_rejected_logps (B,), chosen_lengths and rejected_lengths
    (B,) float or int, > 0. Other keyword arguments are ignored. Returns (loss scalar, metrics).
    """
    check_positive("beta", beta)
    check_positive("gamma", gamma, allow_zero=True)
    _check_policy(policy_chosen_logps, policy_rejected_logps)
    len_c, len_r = _lengths("simpo", policy_chosen_logps, chosen_lengths, rejected_lengths)
    chosen_rewards = beta * policy_chosen_logps / len_c
    rejected_rewards = beta * policy_rejected_logps / len_r
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _metrics(loss, chosen_rewards, rejected_rewards)


def _log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logps) <= 1, computed stably in log space.

    log(1 - e^x) is log(-expm1(x)) near 0 (x > -log 2) and log1p(-e^x) below, each accurate where
    the other loses digits. x is capped at -1e-6: a completion the model is sure of (p = 1) would
    have infinite odds, and an infinite log-odds a NaN gradient.
    """
    x = mean_logps.clamp(max=-1e-6)
    log1m = torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1m


def orpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    beta: float = 0.1,
    **_: object,
) -> LossOut:
    """ORPO's odds-ratio term: reference-free logistic loss on the log odds ratio of the answers.

    Formula: P_c = exp(pi_c / len_c), P_r = exp(pi_r / len_r) (the per-token mean likelihoods)
        log odds(y) = log P - log(1 - P)
        h = log odds(y_c) - log odds(y_r)
        loss = mean_b( -beta log sigmoid(h) ), computed as -logsigmoid; beta is the paper's
        lambda (0.1). ORPO's SFT term, the mean per-token NLL of the chosen answer, is the
        dispatcher's nll_coef (preference_loss with nll_coef = 1): L = L_SFT + lambda L_OR.
        log(1 - P) is computed as log(-expm1(.)) / log1p(-exp(.)), and the mean log-probs are
        capped at -1e-6 so that P = 1 keeps a finite loss and gradient.
    Metrics (detached): rewards_chosen = mean beta pi_c / len_c, rewards_rejected = mean
    beta pi_r / len_r (beta times the mean per-token log-prob, as TRL logs them), reward_margin =
    mean of their difference, reward_accuracy = fraction with r_c > r_r, log_odds_ratio = mean h,
    loss. No reference model: ref_* arguments, if passed, are ignored. The lengths are treated
    as constants (detached).
    Reference: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model" (arXiv:2403.07691).

    Shape: policy_chosen_logps, policy_rejected_logps (B,), chosen_lengths and rejected_lengths
    (B,) float or int, > 0. Other keyword arguments are ignored. Returns (loss scalar, metrics).
    """
    check_positive("beta", beta)
    _check_policy(policy_chosen_logps, policy_rejected_logps)
    len_c, len_r = _lengths("orpo", policy_chosen_logps, chosen_lengths, rejected_lengths)
    mean_c, mean_r = policy_chosen_logps / len_c, policy_rejected_logps / len_r
    log_odds_ratio = _log_odds(mean_c) - _log_odds(mean_r)
    loss = -beta * F.logsigmoid(log_odds_ratio).mean()
    metrics = _metrics(loss, beta * mean_c, beta * mean_r)
    return loss, {**metrics, "log_odds_ratio": log_odds_ratio.detach().mean()}


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised negative log-likelihood of the chosen responses.

    Formula: L_NLL = -(1/B) Σ_i log π(y_w^i | x^i) / |y_w^i|
    Reference: Pang et al. 2024, "Iterative Reasoning Preference Optimization" (DPO + α·NLL on
        the chosen response); Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF"
        (RPO). Added to a preference loss it keeps the chosen responses' likelihood from falling
        while the margin grows (the "likelihood displacement" of plain DPO).

    Shape: policy_chosen_logps (B,) summed log-probs, chosen_lengths (B,) token counts → scalar.
    """
    check_ndim("policy_chosen_logps", policy_chosen_logps, 1, "(B,)")
    check_same_shape("policy_chosen_logps", policy_chosen_logps, chosen_lengths=chosen_lengths)
    if bool((chosen_lengths <= 0).any()):
        raise ValueError("chosen_lengths must be > 0 for every pair")
    return -(policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)).mean()


DPO_LOSSES: dict[str, Callable[..., LossOut]] = {
    "sigmoid": dpo_sigmoid,
    "ipo": dpo_ipo,
    "hinge": dpo_hinge,
    "robust": dpo_robust,
    "robust_unbiased": dpo_robust_unbiased,
    "simpo": simpo,
    "orpo": orpo,
}


def preference_loss(
    variant: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    nll_coef: float = 0.0,
) -> LossOut:
    """Direct preference loss with the variant chosen by name from DPO_LOSSES.

    Formula: see dpo_sigmoid ("sigmoid"), dpo_ipo ("ipo"), dpo_hinge ("hinge"), dpo_robust
        ("robust"), dpo_robust_unbiased ("robust_unbiased"), simpo ("simpo"), orpo ("orpo").
        beta None uses the variant's own default (0.1 for the DPO family and ORPO, 2.0 for SimPO).
        Every argument is forwarded by keyword; a variant ignores the ones it does not use
        (label_smoothing outside the robust variants, gamma outside simpo, lengths outside ipo,
        simpo and orpo, reference log-probs in simpo and orpo) and raises ValueError for a
        missing one.
        nll_coef α > 0 adds α · chosen_nll (RPO; needs chosen_lengths) to any variant:
        L = L_variant + α · L_NLL, and the metrics gain "nll".
    Reference: see the variant functions and chosen_nll.

    Shape: log-probs and lengths (B,). Returns (loss scalar, {"rewards_chosen",
    "rewards_rejected", "reward_margin", "reward_accuracy", "loss"}, plus "log_odds_ratio" for
    orpo and "nll" with nll_coef > 0).
    """
    check_choice("variant", variant, DPO_LOSSES)
    options: dict[str, float] = {"label_smoothing": label_smoothing, "gamma": gamma}
    if beta is not None:
        options["beta"] = beta
    check_positive("nll_coef", nll_coef, allow_zero=True)
    loss, metrics = DPO_LOSSES[variant](
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        **options,
    )
    if nll_coef > 0:
        nll = chosen_nll(policy_chosen_logps, _require("chosen_lengths", chosen_lengths, variant))
        loss = loss + nll_coef * nll
        metrics = {**metrics, "nll": nll.detach(), "loss": loss.detach()}
    return loss, metrics
