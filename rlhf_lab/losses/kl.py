"""Per-token KL estimators against a reference policy, and KL-coefficient controllers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_lab.checks import check_choice, check_positive, check_same_shape

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_plus",
    "KL_ESTIMATORS",
    "kl_penalty",
    "FixedKLController",
    "AdaptiveKLController",
]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(pi || pi_ref) from tokens sampled from pi: unbiased, high variance.

    Formula: k1 = log pi(x) - log pi_ref(x)   (can be negative per token).
    Reference: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

    Shape: logprobs (B, T), ref_logprobs (B, T) -> (B, T) (any equal shapes work, elementwise).
    """
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 estimator of KL(pi || pi_ref): biased but low variance and always >= 0.

    Formula: k2 = 1/2 (log pi(x) - log pi_ref(x))^2.
    Reference: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

    Shape: logprobs (B, T), ref_logprobs (B, T) -> (B, T) (any equal shapes work, elementwise).
    """
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref): unbiased, low variance and always >= 0.

    Formula: with d = log pi_ref(x) - log pi(x), k3 = exp(d) - d - 1.
    Its value is unbiased, its gradient in a loss is not: E_pi[grad k3] = grad KL(pi_ref || pi)
    (see kl_k3_plus, and kl_loss's importance weighting).
    Reference: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

    Shape: logprobs (B, T), ref_logprobs (B, T) -> (B, T) (any equal shapes work, elementwise).
    """
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    d = ref_logprobs - logprobs
    # expm1 keeps precision for the tiny d of a policy close to the reference, where
    # exp(d) - 1 would cancel catastrophically.
    return torch.expm1(d) - d


def kl_k3_plus(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3's value with k2's gradient: the KL-in-loss estimator whose gradient is that of KL(pi || pi_ref).

    Formula: k3+ = sg(k3) + (k2 - sg(k2))   (sg = stop-gradient: the value is exactly k3, the
        gradient is exactly grad k2; a straight-through combination).
    Why: a KL estimate placed in the loss is differentiated with the sampled tokens held fixed,
        so what matters is E_{x~pi}[grad k(x)], not E_{x~pi}[k(x)]. With d = log pi_ref - log pi:
          grad k3 = (1 - e^d) grad log pi = (1 - pi_ref/pi) grad log pi, so
          E_pi[grad k3] = sum_x pi grad log pi - sum_x pi_ref grad log pi
                        = grad sum_x pi - sum_x pi_ref grad log pi = 0 + grad KL(pi_ref || pi),
        the gradient of the forward KL (KL(pi_ref || pi) = sum pi_ref log pi_ref - sum pi_ref
        log pi, and only the second term depends on pi), not of KL(pi || pi_ref) that k3's value
        estimates without bias. Whereas
          grad k2 = (log pi - log pi_ref) grad log pi, and
          E_pi[grad k2] = sum_x pi (log pi - log pi_ref) grad log pi = grad KL(pi || pi_ref)
        (grad sum_x pi (log pi - log pi_ref) = sum_x grad pi (log pi - log pi_ref) + sum_x grad pi,
        and sum_x grad pi = 0). So k3+ reports the unbiased, non-negative k3 and steers by the
        exact reverse-KL gradient (on-policy; see kl_loss for samples from an older policy).
        (k1 in the loss has E_pi[grad k1] = E_pi[grad log pi] = 0: no gradient in expectation.)
    Reference: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    (the estimators); Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation
    for RL" (arXiv:2506.09477) (differentiating a KL estimate is not estimating the KL gradient).

    Shape: logprobs (B, T), ref_logprobs (B, T) -> (B, T) (any equal shapes work, elementwise).
    """
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    k2 = kl_k2(logprobs, ref_logprobs)
    return kl_k3(logprobs, ref_logprobs).detach() + (k2 - k2.detach())


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k3+": kl_k3_plus,
}


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate with the estimator chosen by name from KL_ESTIMATORS.

    Formula: see kl_k1 ("k1"), kl_k2 ("k2"), kl_k3 ("k3"), kl_k3_plus ("k3+").
    Reference: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

    Shape: logprobs (B, T), ref_logprobs (B, T) -> (B, T).
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def _as_float(name: str, value: float | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return float(value.detach().item())
    return float(value)


class FixedKLController:
    """Constant KL coefficient beta in reward = score - beta * KL.

    Formula: beta_k = kl_coef for every step k.
    Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593), fixed-beta variant.
    """

    def __init__(self, kl_coef: float) -> None:
        check_positive("kl_coef", kl_coef, allow_zero=True)
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered so the measured KL approaches ``target`` (proportional control).

    Formula: e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
        The clip bounds how fast beta can move on one noisy KL estimate.
    Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593), Section 2.2.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        check_positive("init_kl_coef", init_kl_coef, allow_zero=True)
        check_positive("target", target)
        check_positive("horizon", horizon)
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Move ``value`` towards the coefficient that would give KL = target.

        ``current_kl`` is the mean per-sequence KL of the last batch, ``n_steps`` the number of
        samples (or steps) it covered.
        """
        check_positive("n_steps", n_steps, allow_zero=True)
        kl = _as_float("current_kl", current_kl)
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
