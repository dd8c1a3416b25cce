import pytest
import torch

from rlhf_lab.losses import (
    DPO_LOSSES,
    chosen_nll,
    dpo_hinge,
    dpo_ipo,
    dpo_robust,
    dpo_robust_unbiased,
    dpo_sigmoid,
    orpo,
    preference_loss,
    simpo,
)

# One pair: log-ratios pi - ref are chosen -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5,
# so the log-ratio gap is 0.5 - (-0.5) = 1 and h = beta * 1 for the DPO family.
PC = torch.tensor([-1.0])
PR = torch.tensor([-2.0])
RC = torch.tensor([-1.5])
RR = torch.tensor([-1.5])
# Response lengths for ipo / simpo: chosen 2 tokens, rejected 1 token.
LEN_C = torch.tensor([2.0])
LEN_R = torch.tensor([1.0])
ONE = torch.tensor([1.0])

ALL = {
    "policy_chosen_logps": PC,
    "policy_rejected_logps": PR,
    "ref_chosen_logps": RC,
    "ref_rejected_logps": RR,
    "chosen_lengths": LEN_C,
    "rejected_lengths": LEN_R,
}
METRIC_KEYS = {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "loss"}
EXTRA_METRICS = {"orpo": {"log_odds_ratio"}}


# ------------------------------------------------------------------------------ by-hand values


def test_sigmoid_by_hand():
    # beta = 0.1: h = 0.1 * 1 = 0.1; loss = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397
    loss, metrics = dpo_sigmoid(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert metrics["loss"].item() == pytest.approx(0.644397, abs=1e-6)
    # beta = 0.5: h = 0.5; loss = log(1 + e^-0.5) = 0.474077
    loss, _ = dpo_sigmoid(PC, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)


def test_chosen_nll_by_hand():
    # Two chosen responses: log-probs -1 over 2 tokens and -3 over 1 token.
    # L_NLL = -((-1/2) + (-3/1)) / 2 = (0.5 + 3) / 2 = 1.75
    nll = chosen_nll(torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 1.0]))
    assert nll.item() == pytest.approx(1.75)
    with pytest.raises(ValueError, match="chosen_lengths must be > 0"):
        chosen_nll(torch.tensor([-1.0]), torch.tensor([0.0]))


def test_nll_coef_adds_the_chosen_nll_to_every_variant():
    # Sigmoid at beta 0.1 is 0.644397 (above); the one chosen response has log-prob -1 over 2
    # tokens, so L_NLL = 0.5 and alpha = 2 gives 0.644397 + 2 * 0.5 = 1.644397.
    loss, metrics = preference_loss("sigmoid", **ALL, beta=0.1, nll_coef=2.0)
    assert loss.item() == pytest.approx(1.644397, abs=1e-6)
    assert metrics["nll"].item() == pytest.approx(0.5)
    assert metrics["loss"].item() == pytest.approx(1.644397, abs=1e-6)
    for variant in DPO_LOSSES:
        base, _ = preference_loss(variant, **ALL)
        with_nll, _ = preference_loss(variant, **ALL, nll_coef=1.0)
        assert with_nll.item() == pytest.approx(base.item() + 0.5, abs=1e-6)
    with pytest.raises(ValueError, match="nll_coef"):
        preference_loss("sigmoid", **ALL, nll_coef=-1.0)
    with pytest.raises(ValueError, match="chosen_lengths is required"):
        preference_loss("sigmoid", PC, PR, RC, RR, nll_coef=1.0)


def test_ipo_by_hand():
    # u = 0.5 / 2 - (-0.5) / 1 = 0.25 + 0.5 = 0.75
    # beta = 0.1: target 1 / (2 * 0.1) = 5; loss = (0.75 - 5)^2 = 4.25^2 = 18.0625
    loss, _ = dpo_ipo(PC, PR, RC, RR, LEN_C, LEN_R, beta=0.1)
    assert loss.item() == pytest.approx(18.0625, abs=1e-5)
    # beta = 0.5: target 1; loss = (0.75 - 1)^2 = 0.0625
    loss, _ = dpo_ipo(PC, PR, RC, RR, LEN_C, LEN_R, beta=0.5)
    assert loss.item() == pytest.approx(0.0625, abs=1e-6)
    # lengths 1 and 1: u = 0.5 + 0.5 = 1 (the unnormalised gap); loss = (1 - 5)^2 = 16
    loss, _ = dpo_ipo(PC, PR, RC, RR, ONE, ONE, beta=0.1)
    assert loss.item() == pytest.approx(16.0, abs=1e-5)
    # lengths 2 and 4: u = 0.25 + 0.125 = 0.375; loss = (0.375 - 5)^2 = 4.625^2 = 21.390625
    loss, _ = dpo_ipo(PC, PR, RC, RR, LEN_C, torch.tensor([4.0]), beta=0.1)
    assert loss.item() == pytest.approx(21.390625, abs=1e-5)


def test_hinge_by_hand():
    # beta = 0.1: h = 0.1; loss = max(0, 1 - 0.1) = 0.9
    loss, _ = dpo_hinge(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(0.9, abs=1e-6)
    # beta = 0.5: h = 0.5; loss = 0.5
    loss, _ = dpo_hinge(PC, PR, RC, RR, beta=0.5)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    # beta = 2: h = 2 > 1; loss = max(0, -1) = 0, and the pair gives no gradient
    pc = PC.clone().requires_grad_(True)
    loss, _ = dpo_hinge(pc, PR, RC, RR, beta=2.0)
    assert loss.item() == 0.0
    loss.backward()
    assert pc.grad.item() == 0.0


def test_robust_by_hand():
    # -log sigmoid(-h) = -log sigmoid(h) + h, so loss = -log sigmoid(h) + eps * h.
    # eps = 0 is plain DPO: 0.644397
    loss, _ = dpo_robust(PC, PR, RC, RR, beta=0.1, label_smoothing=0.0)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    # eps = 0.1: 0.9 * log(1 + e^-0.1) + 0.1 * log(1 + e^0.1)
    #          = 0.9 * 0.644397 + 0.1 * 0.744397 = 0.579957 + 0.074440 = 0.654397
    loss, _ = dpo_robust(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.654397, abs=1e-6)
    # eps = 0.3: 0.644397 + 0.3 * 0.1 = 0.674397
    loss, _ = dpo_robust(PC, PR, RC, RR, beta=0.1, label_smoothing=0.3)
    assert loss.item() == pytest.approx(0.674397, abs=1e-6)
    # beta = 0.5, eps = 0.1: h = 0.5; 0.474077 + 0.1 * 0.5 = 0.524077
    loss, _ = dpo_robust(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.524077, abs=1e-6)


def test_robust_unbiased_by_hand():
    # loss = ((1 - eps) * -log sigmoid(h) - eps * -log sigmoid(-h)) / (1 - 2 eps)
    #      = -log sigmoid(h) - eps * h / (1 - 2 eps)
    # eps = 0 is plain DPO: 0.644397
    loss, _ = dpo_robust_unbiased(PC, PR, RC, RR, beta=0.1, label_smoothing=0.0)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    # eps = 0.1: (0.9 * 0.644397 - 0.1 * 0.744397) / 0.8 = (0.579957 - 0.074440) / 0.8
    #          = 0.505518 / 0.8 = 0.631897  (= 0.644397 - 0.01 / 0.8)
    loss, _ = dpo_robust_unbiased(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.631897, abs=1e-6)
    # eps = 0.3: 0.644397 - 0.03 / 0.4 = 0.644397 - 0.075 = 0.569397
    loss, _ = dpo_robust_unbiased(PC, PR, RC, RR, beta=0.1, label_smoothing=0.3)
    assert loss.item() == pytest.approx(0.569397, abs=1e-6)
    # beta = 0.5, eps = 0.1: 0.474077 - 0.05 / 0.8 = 0.474077 - 0.0625 = 0.411577
    loss, _ = dpo_robust_unbiased(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.411577, abs=1e-6)


def test_simpo_by_hand():
    # pi_c / len_c = -1 / 2 = -0.5; pi_r / len_r = -2 / 1 = -2; difference 1.5
    # beta = 2, gamma = 0.5: h = 2 * 1.5 - 0.5 = 2.5; loss = log(1 + e^-2.5) = 0.078890
    loss, _ = simpo(PC, PR, LEN_C, LEN_R)
    assert loss.item() == pytest.approx(0.078890, abs=1e-6)
    # beta = 1: h = 1.5 - 0.5 = 1; loss = log(1 + e^-1) = 0.313262
    loss, _ = simpo(PC, PR, LEN_C, LEN_R, beta=1.0)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    # gamma = 0: h = 3; loss = log(1 + e^-3) = 0.048587
    loss, _ = simpo(PC, PR, LEN_C, LEN_R, gamma=0.0)
    assert loss.item() == pytest.approx(0.048587, abs=1e-6)
    # lengths 1 and 1: difference -1 - (-2) = 1; h = 2 - 0.5 = 1.5; log(1 + e^-1.5) = 0.201413
    loss, _ = simpo(PC, PR, ONE, ONE)
    assert loss.item() == pytest.approx(0.201413, abs=1e-6)


def test_orpo_by_hand():
    # Mean per-token log-probs: chosen -1 / 2 = -0.5, rejected -2 / 1 = -2.
    # log odds(y) = m - log(1 - e^m):
    #   chosen:   -0.5 - log(1 - 0.606531) = -0.5 + 0.932752 = 0.432752
    #   rejected: -2 - log(1 - 0.135335) = -2 + 0.145413 = -1.854587
    # h = 0.432752 + 1.854587 = 2.287339; -log sigmoid(h) = log(1 + e^-2.287339) = 0.0967059
    # beta (lambda) = 0.1: loss = 0.1 * 0.0967059 = 0.00967059
    loss, metrics = orpo(PC, PR, LEN_C, LEN_R, beta=0.1)
    assert loss.item() == pytest.approx(0.00967059, abs=1e-7)
    assert metrics["log_odds_ratio"].item() == pytest.approx(2.287339, abs=1e-5)
    # Rewards are beta times the mean per-token log-prob: 0.1 * -0.5 = -0.05 and 0.1 * -2 = -0.2.
    assert metrics["rewards_chosen"].item() == pytest.approx(-0.05)
    assert metrics["rewards_rejected"].item() == pytest.approx(-0.2)
    assert metrics["reward_margin"].item() == pytest.approx(0.15)
    assert metrics["reward_accuracy"].item() == 1.0
    # beta = 1: the whole term, 0.0967059
    loss, _ = orpo(PC, PR, LEN_C, LEN_R, beta=1.0)
    assert loss.item() == pytest.approx(0.0967059, abs=1e-6)
    # lengths 1 and 1: chosen m = -1, log odds = -1 - log(1 - 0.367879) = -1 + 0.458675 = -0.541325;
    # h = -0.541325 + 1.854587 = 1.313262; 0.1 * log(1 + e^-1.313262) = 0.1 * 0.238183 = 0.0238183
    loss, _ = orpo(PC, PR, ONE, ONE, beta=0.1)
    assert loss.item() == pytest.approx(0.0238183, abs=1e-6)
    # ORPO's SFT term is nll_coef: + 1 * (-(-1) / 2) = + 0.5, and no reference is needed.
    loss, metrics = preference_loss("orpo", PC, PR, chosen_lengths=LEN_C, rejected_lengths=LEN_R, beta=0.1,
                                    nll_coef=1.0)
    assert loss.item() == pytest.approx(0.50967059, abs=1e-6)
    assert metrics["nll"].item() == pytest.approx(0.5)


def test_orpo_is_finite_where_the_odds_are_extreme():
    # A mean log-prob of 0 (P = 1, infinite odds) is capped at -1e-6; one of -1000 has log odds
    # -1000 - log(1 - e^-1000) = -1000. Loss and gradients stay finite.
    pc = torch.tensor([0.0, -1000.0], requires_grad=True)
    pr = torch.tensor([-1000.0, 0.0], requires_grad=True)
    loss, metrics = orpo(pc, pr, torch.ones(2), torch.ones(2), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # Pair 1 has h = -1000 - log odds(-1e-6) = -1000 - (-1e-6 - log(1e-6)) = -1013.8155:
    # -log sigmoid(h) = 1013.8155; pair 0 gives 0; mean 506.9078.
    assert loss.item() == pytest.approx(506.9078, abs=1e-3)


# --------------------------------------------------------------------- options change results


@pytest.mark.parametrize("variant", list(DPO_LOSSES))
def test_beta_changes_every_variant(variant):
    low, _ = preference_loss(variant, **ALL, beta=0.1)
    high, _ = preference_loss(variant, **ALL, beta=0.5)
    assert abs(low.item() - high.item()) > 1e-3


def test_label_smoothing_changes_robust_variants_only():
    for variant in ("robust", "robust_unbiased"):
        clean, _ = preference_loss(variant, **ALL, label_smoothing=0.0)
        noisy, _ = preference_loss(variant, **ALL, label_smoothing=0.2)
        assert abs(clean.item() - noisy.item()) > 1e-3
    # ignored elsewhere
    clean, _ = preference_loss("sigmoid", **ALL, label_smoothing=0.0)
    noisy, _ = preference_loss("sigmoid", **ALL, label_smoothing=0.2)
    assert clean.item() == noisy.item()


def test_gamma_changes_simpo():
    a, _ = preference_loss("simpo", **ALL, gamma=0.5)
    b, _ = preference_loss("simpo", **ALL, gamma=1.5)
    assert abs(a.item() - b.item()) > 1e-3


@pytest.mark.parametrize("variant", ["ipo", "simpo", "orpo"])
def test_lengths_change_ipo_simpo_and_orpo(variant):
    a, _ = preference_loss(variant, **ALL)
    b, _ = preference_loss(variant, **{**ALL, "chosen_lengths": ONE, "rejected_lengths": ONE})
    assert abs(a.item() - b.item()) > 1e-3


def test_int_lengths_match_float_lengths():
    a, _ = dpo_ipo(PC, PR, RC, RR, LEN_C, LEN_R)
    b, _ = dpo_ipo(PC, PR, RC, RR, torch.tensor([2]), torch.tensor([1]))
    assert a.item() == b.item()
    a, _ = simpo(PC, PR, LEN_C, LEN_R)
    b, _ = simpo(PC, PR, torch.tensor([2]), torch.tensor([1]))
    assert a.item() == b.item()


# -------------------------------------------------------------------------- metrics, gradient

# Two pairs, beta = 0.1.
#   pair 0: as above, log-ratios chosen 0.5, rejected -0.5
#   pair 1: pi_c = -3, pi_r = -1, ref_c = ref_r = -2: log-ratios chosen -1, rejected 1
PC2 = torch.tensor([-1.0, -3.0])
PR2 = torch.tensor([-2.0, -1.0])
RC2 = torch.tensor([-1.5, -2.0])
RR2 = torch.tensor([-1.5, -2.0])


def test_metrics_by_hand():
    # implicit rewards r = 0.1 * log-ratio: chosen [0.05, -0.1], rejected [-0.05, 0.1]
    # h = r_c - r_r = [0.1, -0.2]
    loss, metrics = dpo_sigmoid(PC2, PR2, RC2, RR2, beta=0.1)
    assert set(metrics) == METRIC_KEYS
    # rewards_chosen = (0.05 - 0.1) / 2 = -0.025; rewards_rejected = (-0.05 + 0.1) / 2 = 0.025
    assert metrics["rewards_chosen"].item() == pytest.approx(-0.025, abs=1e-7)
    assert metrics["rewards_rejected"].item() == pytest.approx(0.025, abs=1e-7)
    # reward_margin = (0.1 - 0.2) / 2 = -0.05; reward_accuracy = 1 / 2 (only pair 0 has h > 0)
    assert metrics["reward_margin"].item() == pytest.approx(-0.05, abs=1e-7)
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)
    # loss = (log(1 + e^-0.1) + log(1 + e^0.2)) / 2 = (0.644397 + 0.798139) / 2 = 0.721268
    assert loss.item() == pytest.approx(0.721268, abs=1e-6)
    assert metrics["loss"].item() == pytest.approx(0.721268, abs=1e-6)


def test_metrics_ipo_use_unnormalised_rewards_and_simpo_length_normalised():
    # ipo reports beta * (pi - ref) like sigmoid, whatever the lengths: 0.05 and -0.05
    _, metrics = dpo_ipo(PC, PR, RC, RR, LEN_C, LEN_R, beta=0.1)
    assert metrics["rewards_chosen"].item() == pytest.approx(0.05, abs=1e-7)
    assert metrics["rewards_rejected"].item() == pytest.approx(-0.05, abs=1e-7)
    # simpo, beta = 2: r_c = 2 * -1 / 2 = -1; r_r = 2 * -2 / 1 = -4; margin 3 (gamma excluded)
    _, metrics = simpo(PC, PR, LEN_C, LEN_R, beta=2.0, gamma=0.5)
    assert metrics["rewards_chosen"].item() == pytest.approx(-1.0)
    assert metrics["rewards_rejected"].item() == pytest.approx(-4.0)
    assert metrics["reward_margin"].item() == pytest.approx(3.0)
    assert metrics["reward_accuracy"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("variant", list(DPO_LOSSES))
def test_metrics_are_detached_scalars(variant):
    inputs = {k: v.clone().requires_grad_(True) for k, v in ALL.items() if "logps" in k}
    lengths = {"chosen_lengths": LEN_C, "rejected_lengths": LEN_R}
    loss, metrics = preference_loss(variant, **inputs, **lengths, label_smoothing=0.1)
    assert loss.ndim == 0 and loss.requires_grad
    assert set(metrics) == METRIC_KEYS | EXTRA_METRICS.get(variant, set())
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad


def test_sigmoid_gradient():
    # d/d pi_c of mean_b -log sigmoid(h_b) = -beta * sigmoid(-h_b) / B, with h = [0.1, -0.2], B = 2
    #   pair 0: -0.1 * sigmoid(-0.1) / 2 = -0.05 * 0.475021 = -0.023751
    #   pair 1: -0.1 * sigmoid(0.2) / 2  = -0.05 * 0.549834 = -0.027492
    # d/d pi_r is the negative of that; the reference gets no gradient (detached).
    pc = PC2.clone().requires_grad_(True)
    pr = PR2.clone().requires_grad_(True)
    rc = RC2.clone().requires_grad_(True)
    loss, _ = dpo_sigmoid(pc, pr, rc, RR2, beta=0.1)
    loss.backward()
    expected = torch.tensor([-0.023751, -0.027492])
    torch.testing.assert_close(pc.grad, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pr.grad, -expected, atol=1e-6, rtol=0)
    assert rc.grad is None


def test_sigmoid_stable_for_large_gaps():
    # beta = 1, zero reference: h = pi_c - pi_r = [0 - (-1000), -1000 - 0] = [1000, -1000]
    # -log sigmoid(1000) = 0; -log sigmoid(-1000) = 1000 (no overflow); mean = 500
    pc = torch.tensor([0.0, -1000.0])
    pr = torch.tensor([-1000.0, 0.0])
    zeros = torch.zeros(2)
    loss, _ = dpo_sigmoid(pc, pr, zeros, zeros, beta=1.0)
    assert loss.item() == pytest.approx(500.0)


# -------------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("variant", list(DPO_LOSSES))
def test_dispatcher_matches_direct_call(variant):
    fn = DPO_LOSSES[variant]
    direct, direct_metrics = fn(**ALL, beta=0.3, label_smoothing=0.1, gamma=0.7)
    via, via_metrics = preference_loss(variant, **ALL, beta=0.3, label_smoothing=0.1, gamma=0.7)
    assert direct.item() == via.item()
    for key in METRIC_KEYS:
        assert direct_metrics[key].item() == via_metrics[key].item()


def test_dispatcher_beta_none_uses_variant_default():
    # sigmoid default beta 0.1 -> 0.644397; simpo default beta 2 -> 0.078890
    loss, _ = preference_loss("sigmoid", **ALL)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    loss, _ = preference_loss("simpo", **ALL)
    assert loss.item() == pytest.approx(0.078890, abs=1e-6)


def test_simpo_needs_no_reference():
    loss, _ = preference_loss("simpo", PC, PR, chosen_lengths=LEN_C, rejected_lengths=LEN_R)
    assert loss.item() == pytest.approx(0.078890, abs=1e-6)


# -------------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    two = torch.zeros(2)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        dpo_sigmoid(PC, two, RC, RR)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_sigmoid(PC, PR, RC, two)
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_sigmoid(PC.view(1, 1), PR.view(1, 1), RC.view(1, 1), RR.view(1, 1))
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_sigmoid(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="rejected_lengths"):
        simpo(PC, PR, LEN_C, two)
    with pytest.raises(ValueError, match="variant.*'sigmoid'.*'simpo'"):
        preference_loss("dpo", **ALL)
    for variant in ("sigmoid", "ipo", "hinge", "robust", "robust_unbiased"):
        with pytest.raises(ValueError, match="ref_chosen_logps"):
            preference_loss(variant, PC, PR, chosen_lengths=LEN_C, rejected_lengths=LEN_R)
        with pytest.raises(ValueError, match="ref_rejected_logps"):
            preference_loss(variant, PC, PR, RC, chosen_lengths=LEN_C, rejected_lengths=LEN_R)
    for variant in ("ipo", "simpo", "orpo"):
        with pytest.raises(ValueError, match="chosen_lengths"):
            preference_loss(variant, PC, PR, RC, RR)
        with pytest.raises(ValueError, match="rejected_lengths"):
            preference_loss(variant, PC, PR, RC, RR, chosen_lengths=LEN_C)
        with pytest.raises(ValueError, match="chosen_lengths"):
            preference_loss(variant, **{**ALL, "chosen_lengths": torch.tensor([0.0])})
    for eps in (-0.1, 0.5, 0.6):
        with pytest.raises(ValueError, match="label_smoothing"):
            preference_loss("robust_unbiased", **ALL, label_smoothing=eps)
    for eps in (-0.1, 0.6):
        with pytest.raises(ValueError, match="label_smoothing"):
            preference_loss("robust", **ALL, label_smoothing=eps)
    for variant in DPO_LOSSES:
        for beta in (0.0, -0.1):
            with pytest.raises(ValueError, match="beta"):
                preference_loss(variant, **ALL, beta=beta)
    with pytest.raises(ValueError, match="gamma"):
        preference_loss("simpo", **ALL, gamma=-0.5)
