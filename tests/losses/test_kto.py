import pytest
import torch

from rlhf_lab.losses import kto_kl, kto_loss

# Two rows, beta = 0.1 unless a test says otherwise.
#   row 0, desirable:   pi = -1, ref = -1.5, so r = 0.5
#   row 1, undesirable: pi = -3, ref = -2,   so r = -1
PI = torch.tensor([-1.0, -3.0])
REF = torch.tensor([-1.5, -2.0])
DESIRABLE = torch.tensor([True, False])
KL = torch.tensor(0.2)  # the reference point z0 = max(0, 0.2) = 0.2
METRIC_KEYS = {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "loss"}


def test_kto_by_hand():
    # row 0: v = sigmoid(0.1 * (0.5 - 0.2)) = sigmoid(0.03) = 0.5074994; 1 - v = 0.4925006
    # row 1: v = sigmoid(0.1 * (0.2 - (-1))) = sigmoid(0.12) = 0.5299641; 1 - v = 0.4700359
    # loss = (0.4925006 + 0.4700359) / 2 = 0.4812683
    loss, metrics = kto_loss(PI, REF, DESIRABLE, KL, beta=0.1)
    assert loss.item() == pytest.approx(0.4812683, abs=1e-6)
    assert set(metrics) == METRIC_KEYS
    assert metrics["loss"].item() == pytest.approx(0.4812683, abs=1e-6)
    # rewards beta r: chosen 0.1 * 0.5 = 0.05, rejected 0.1 * -1 = -0.1, margin 0.15; both rows
    # are on the side of z0 their label asks for (0.5 > 0.2, -1 < 0.2): accuracy 1
    assert metrics["rewards_chosen"].item() == pytest.approx(0.05)
    assert metrics["rewards_rejected"].item() == pytest.approx(-0.1)
    assert metrics["reward_margin"].item() == pytest.approx(0.15)
    assert metrics["reward_accuracy"].item() == 1.0
    # z0 = 0.7: row 0 has r - z0 = -0.2 < 0, the wrong side; accuracy 1 / 2
    _, metrics = kto_loss(PI, REF, DESIRABLE, torch.tensor(0.7))
    assert metrics["reward_accuracy"].item() == 0.5


def test_kto_reference_point_is_clamped_at_zero():
    # KL = -0.7 gives z0 = max(0, -0.7) = 0:
    # row 0: 1 - sigmoid(0.1 * 0.5) = 1 - 0.5124974 = 0.4875026
    # row 1: 1 - sigmoid(0.1 * 1) = 1 - 0.5249792 = 0.4750208
    # loss = (0.4875026 + 0.4750208) / 2 = 0.4812617, the same as with KL = 0
    negative, _ = kto_loss(PI, REF, DESIRABLE, torch.tensor(-0.7))
    zero, _ = kto_loss(PI, REF, DESIRABLE, torch.tensor(0.0))
    assert negative.item() == pytest.approx(0.4812617, abs=1e-6)
    assert negative.item() == zero.item()
    # and a positive KL moves it (0.4812683 above)
    positive, _ = kto_loss(PI, REF, DESIRABLE, KL)
    assert abs(positive.item() - negative.item()) > 1e-6


def test_kto_gradient_flows_through_the_rows_only():
    # d loss / d pi for row 0 = -lambda_D beta sigmoid'(0.03) / 2 = -0.05 * 0.2499438 = -0.0124972
    # row 1 (sign -1):          +lambda_U beta sigmoid'(0.12) / 2 = +0.05 * 0.2491022 = +0.0124551
    # z0 is a constant: no gradient reaches the mismatched log-probs it came from, nor kl itself,
    # nor the reference.
    pi = PI.clone().requires_grad_(True)
    ref = REF.clone().requires_grad_(True)
    kl_policy = torch.tensor([-2.0, -4.0], requires_grad=True)
    # kto_kl: ((-2 - -2.3) + (-4 - -4.1)) / 2 = (0.3 + 0.1) / 2 = 0.2
    kl = kto_kl(kl_policy, torch.tensor([-2.3, -4.1]))
    assert kl.item() == pytest.approx(0.2, abs=1e-6) and not kl.requires_grad
    loss, _ = kto_loss(pi, ref, DESIRABLE, kl)
    loss.backward()
    torch.testing.assert_close(pi.grad, torch.tensor([-0.0124972, 0.0124551]), atol=1e-6, rtol=0)
    assert ref.grad is None and kl_policy.grad is None
    # A kl that requires grad is detached inside, and its gradient stays None.
    kl_leaf = torch.tensor(0.2, requires_grad=True)
    loss, _ = kto_loss(PI.clone().requires_grad_(True), REF, DESIRABLE, kl_leaf)
    loss.backward()
    assert kl_leaf.grad is None


def test_kto_kl_by_hand():
    # log-ratios of the mismatched pairs: -2 - (-2.5) = 0.5 and -4 - (-3) = -1: mean -0.25
    assert kto_kl(torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -3.0])).item() == pytest.approx(-0.25)
    # as a part of a batch of 4 rows: (0.5 - 1) / 4 = -0.125
    assert kto_kl(torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -3.0]), rows=4).item() == pytest.approx(-0.125)


# --------------------------------------------------------------------- options change results


def test_beta_changes_kto():
    # beta = 0.5: row 0 1 - sigmoid(0.15) = 1 - 0.5374298 = 0.4625702;
    # row 1 1 - sigmoid(0.6) = 1 - 0.6456563 = 0.3543437; loss = 0.4084569
    loss, _ = kto_loss(PI, REF, DESIRABLE, KL, beta=0.5)
    assert loss.item() == pytest.approx(0.4084569, abs=1e-6)


def test_desirable_weight_changes_kto():
    # lambda_D = 2 scales row 0: 2 * 0.4925006 = 0.9850011; loss = (0.9850011 + 0.4700359) / 2 = 0.7275185
    loss, _ = kto_loss(PI, REF, DESIRABLE, KL, desirable_weight=2.0)
    assert loss.item() == pytest.approx(0.7275185, abs=1e-6)
    # ... and nothing in a batch without desirable rows
    only_u = torch.tensor([False, False])
    assert kto_loss(PI, REF, only_u, KL, desirable_weight=2.0)[0].item() == kto_loss(PI, REF, only_u, KL)[0].item()


def test_undesirable_weight_changes_kto():
    # lambda_U = 2 scales row 1: (0.4925006 + 2 * 0.4700359) / 2 = 0.7162862
    loss, _ = kto_loss(PI, REF, DESIRABLE, KL, undesirable_weight=2.0)
    assert loss.item() == pytest.approx(0.7162862, abs=1e-6)


def test_counts_make_the_parts_add_up_to_the_batch():
    # Four rows cut into two parts of two: with counts = the batch's (N_D, N_U), the parts' loss
    # and metrics are sums over their rows divided by the batch's counts, so they add up.
    pi = torch.tensor([-1.0, -3.0, -0.5, -2.0])
    ref = torch.tensor([-1.5, -2.0, -1.0, -1.0])
    desirable = torch.tensor([True, False, True, True])
    whole, whole_m = kto_loss(pi, ref, desirable, KL)
    counts = (3.0, 1.0)
    parts = [kto_loss(pi[s], ref[s], desirable[s], KL, counts=counts) for s in (slice(0, 2), slice(2, 4))]
    assert sum(p[0] for p in parts).item() == pytest.approx(whole.item(), abs=1e-7)
    for key in METRIC_KEYS:
        assert sum(p[1][key] for p in parts).item() == pytest.approx(whole_m[key].item(), abs=1e-7), key


def test_kto_bad_inputs():
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        kto_loss(PI, REF, torch.tensor([1, 0]), KL)
    with pytest.raises(ValueError, match="ref_logps must have the same shape"):
        kto_loss(PI, REF[:1], DESIRABLE, KL)
    with pytest.raises(ValueError, match="policy_logps must hold at least one row"):
        kto_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), KL)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        kto_loss(PI, REF, DESIRABLE, torch.zeros(2))
    for knob in ("beta", "desirable_weight", "undesirable_weight"):
        with pytest.raises(ValueError, match=f"{knob} must be > 0"):
            kto_loss(PI, REF, DESIRABLE, KL, **{knob: 0.0})
    with pytest.raises(ValueError, match="counts must be"):
        kto_loss(PI, REF, DESIRABLE, KL, counts=(0.0, 0.0))
    with pytest.raises(ValueError, match="kl_ref_logps must have the same shape"):
        kto_kl(torch.zeros(2), torch.zeros(3))
