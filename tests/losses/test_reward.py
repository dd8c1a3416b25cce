import pytest
import torch

from rlhf_lab.losses import bradley_terry_loss

CHOSEN = torch.tensor([2.0, 0.0])
REJECTED = torch.tensor([1.0, 1.0])


def test_bradley_terry_by_hand():
    # diffs r_c - r_r = [1, -1]
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-1) = log(1 + e) = 1.313262
    # loss = (0.313262 + 1.313262) / 2 = 0.813262
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    # accuracy 1/2; mean gap (1 - 1) / 2 = 0; mean chosen (2 + 0) / 2 = 1; mean rejected 1
    assert metrics["accuracy"].item() == pytest.approx(0.5)
    assert metrics["margin"].item() == pytest.approx(0.0)
    assert metrics["chosen"].item() == pytest.approx(1.0)
    assert metrics["rejected"].item() == pytest.approx(1.0)


def test_margin_float_and_tensor_change_the_loss():
    # margin 1: logits [0, -2]; -log sigmoid(0) = log 2 = 0.693147;
    # -log sigmoid(-2) = log(1 + e^2) = 2.126928; mean = 1.410038
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED, margin=1.0)
    assert loss.item() == pytest.approx(1.410038, abs=1e-6)
    # The "margin" metric is the reward gap, unaffected by the margin argument.
    assert metrics["margin"].item() == pytest.approx(0.0)
    # per-pair margin [1, 0]: logits [0, -1]; (0.693147 + 1.313262) / 2 = 1.003204
    loss_t, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([1.0, 0.0]))
    assert loss_t.item() == pytest.approx(1.003204, abs=1e-6)


def test_center_coef_adds_centering_term():
    # sums r_c + r_r = [3, 1]; squares [9, 1]; mean 5; 0.1 * 5 = 0.5
    # loss = 0.813262 + 0.5 = 1.313262
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, center_coef=0.1)
    assert loss.item() == pytest.approx(1.313262, abs=1e-6)


def test_stable_for_large_gaps_and_gradient():
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0])
    loss, _ = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(1000) = 0, -log sigmoid(-1000) = 1000; mean = 500
    assert loss.item() == pytest.approx(500.0)
    loss.backward()
    # d/d r_c of -log sigmoid(d) / B = -(1 - sigmoid(d)) / 2 -> [0, -0.5]
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -0.5]))


def test_metrics_are_detached_scalars():
    chosen = CHOSEN.clone().requires_grad_(True)
    _, metrics = bradley_terry_loss(chosen, REJECTED)
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad


def test_bad_inputs():
    with pytest.raises(ValueError, match="rejected_rewards"):
        bradley_terry_loss(CHOSEN, torch.zeros(3))
    with pytest.raises(ValueError, match="chosen_rewards"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(CHOSEN, REJECTED, margin=torch.zeros(3))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(CHOSEN, REJECTED, center_coef=-0.1)
    with pytest.raises(ValueError, match="chosen_rewards"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
