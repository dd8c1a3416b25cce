import math

import pytest
import torch

from rlhf_lab.losses import lm_loss


def test_lm_loss_by_hand():
    # Counted tokens have log-probs -1, -2 (row 0) and -3 (row 1).
    # nll = (1 + 2 + 3) / 3 = 2; perplexity = e^2 = 7.389056
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -0.5, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, metrics = lm_loss(logprobs, mask)
    assert loss.item() == pytest.approx(2.0)
    assert metrics["nll"].item() == pytest.approx(2.0)
    assert metrics["perplexity"].item() == pytest.approx(7.389056, rel=1e-6)


def test_lm_loss_is_token_level_mean_not_sequence_mean():
    # Row 0 has three tokens with nll 1, row 1 one token with nll 5.
    # token mean = (1 + 1 + 1 + 5) / 4 = 2 (a per-sequence mean would be (1 + 5) / 2 = 3)
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    loss, _ = lm_loss(logprobs, mask)
    assert loss.item() == pytest.approx(2.0)


def test_lm_loss_gradient_and_padding():
    logprobs = torch.tensor([[-1.0, -2.0, -math.inf]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = lm_loss(logprobs, mask)
    loss.backward()
    # d(-mean)/d logp = -1 / n_tokens = -1/2 on counted tokens, 0 on padding
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, -0.5, 0.0]]))
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad


def test_lm_loss_empty_mask():
    loss, metrics = lm_loss(torch.randn(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert metrics["perplexity"].item() == 1.0


def test_lm_loss_bad_shapes():
    with pytest.raises(ValueError, match="logprobs"):
        lm_loss(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="mask"):
        lm_loss(torch.zeros(2, 3), torch.ones(2, 4))
