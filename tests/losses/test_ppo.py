import math

import pytest
import torch

from rlhf_lab.losses import (
    AGGREGATIONS,
    RATIO_LEVELS,
    SURROGATES,
    entropy_bonus,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)

# Two sequences of two tokens. old_logprobs = 0, so ratio = exp(logprobs).
RATIOS = torch.tensor([[1.5, 0.5], [1.1, 0.7]])
LOGP = RATIOS.log()
OLD = torch.zeros(2, 2)
ADV = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
FULL = torch.ones(2, 2)


def test_policy_loss_by_hand():
    # eps = 0.2, loss_t = max(-A r, -A clip(r, 0.8, 1.2))
    # r=1.5, A=+1: max(-1.5, -1.2) = -1.2   clipped branch active
    # r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    # r=1.1, A=-1: max( 1.1,  1.1) =  1.1
    # r=0.7, A=-1: max( 0.7,  0.8) =  0.8   clipped branch active
    # token_mean = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.2 / 4 = 0.05; clipfrac = 2/4
    # ratio = (1.5 + 0.5 + 1.1 + 0.7) / 4 = 0.95
    # approx_kl = mean((r - 1) - ln r)
    #   = (0.5 - 0.405465 + -0.5 + 0.693147 + 0.1 - 0.095310 + -0.3 + 0.356675) / 4
    #   = (0.094535 + 0.193147 + 0.004690 + 0.056675) / 4 = 0.349047 / 4 = 0.087262
    loss, metrics = ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=0.2)
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(0.05, abs=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(0.5)
    assert metrics["ratio"].item() == pytest.approx(0.95, abs=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx(0.087262, abs=1e-6)
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad


def test_clip_ratio_changes_the_loss():
    # eps = 0.4, range [0.6, 1.4]: -1.4, -0.5, 1.1, 0.7 -> (-0.1) / 4 = -0.025; clipfrac 1/4
    loss_04, m_04 = ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=0.4)
    assert loss_04.item() == pytest.approx(-0.025, abs=1e-6)
    assert m_04["clipfrac"].item() == pytest.approx(0.25)
    # no clipping: -A r = -1.5, -0.5, 1.1, 0.7 -> (-0.2) / 4 = -0.05; clipfrac 0
    loss_none, m_none = ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=None)
    assert loss_none.item() == pytest.approx(-0.05, abs=1e-6)
    assert m_none["clipfrac"].item() == 0.0
    loss_02, _ = ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=0.2)
    assert len({round(x.item(), 6) for x in (loss_02, loss_04, loss_none)}) == 3


def test_ratio_level_sequence_by_hand():
    # Sequence ratio = exp(mean log-ratio) = geometric mean of the token ratios:
    #   row 0: sqrt(1.5 * 0.5) = sqrt(0.75) = 0.866025 (inside [0.8, 1.2], A = +1 -> -0.866025)
    #   row 1: sqrt(1.1 * 0.7) = sqrt(0.77) = 0.877496 (inside, A = -1 -> +0.877496)
    # token_mean = (2 * -0.866025 + 2 * 0.877496) / 4 = 0.005736; clipfrac 0
    # ratio metric = (0.866025 + 0.877496) / 2 = 0.871761; approx_kl stays per-token (0.087262)
    loss, metrics = ppo_policy_loss(LOGP, OLD, ADV, FULL, ratio_level="sequence")
    assert loss.item() == pytest.approx(0.005736, abs=1e-6)
    assert metrics["clipfrac"].item() == 0.0
    assert metrics["ratio"].item() == pytest.approx(0.871761, abs=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx(0.087262, abs=1e-6)
    token_loss, _ = ppo_policy_loss(LOGP, OLD, ADV, FULL, ratio_level="token")
    assert token_loss.item() != pytest.approx(loss.item(), abs=1e-4)


def test_sequence_ratio_ignores_padding():
    # Row 1's second token is padding with a wild log-prob: the sequence ratio of row 1 is
    # exp(ln 1.1) = 1.1, so the loss equals the one of the unpadded (2, 1)-token batch.
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), -math.inf]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # row 0: -0.866025 on 2 tokens; row 1: ratio 1.1, A = -1 -> 1.1 on 1 token
    # token_mean = (-1.732051 + 1.1) / 3 = -0.210684
    loss, _ = ppo_policy_loss(logp, OLD, ADV, mask, ratio_level="sequence")
    assert loss.item() == pytest.approx(-0.210684, abs=1e-6)


def test_aggregation_changes_the_loss():
    # Row 1 keeps only its first token. Per-token losses (eps 0.2): -1.2, -0.5 | 1.1
    # token_mean = (-1.2 - 0.5 + 1.1) / 3 = -0.2
    # seq_mean   = mean(( -1.2 - 0.5) / 2, 1.1 / 1) = (-0.85 + 1.1) / 2 = 0.125
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    token, _ = ppo_policy_loss(LOGP, OLD, ADV, mask, aggregation="token_mean")
    seq, _ = ppo_policy_loss(LOGP, OLD, ADV, mask, aggregation="seq_mean")
    assert token.item() == pytest.approx(-0.2, abs=1e-6)
    assert seq.item() == pytest.approx(0.125, abs=1e-6)


def test_seq_mean_skips_rows_without_tokens():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    logp = torch.cat([LOGP, torch.zeros(1, 2)])
    adv = torch.cat([ADV, torch.full((1, 2), 5.0)])
    seq, _ = ppo_policy_loss(logp, torch.zeros(3, 2), adv, mask, aggregation="seq_mean")
    assert seq.item() == pytest.approx(0.125, abs=1e-6)  # same as without the empty row


def test_gradient_is_minus_advantage_over_token_count_at_ratio_one():
    # clip None, logp == old_logp (ratio 1): d loss / d logp_t = -A_t / n_tokens on response
    # tokens (n_tokens = 3 here), 0 on padding (which holds -inf log-probs).
    old = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, -math.inf, -math.inf]])
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([[3.0, -6.0, 7.0], [1.5, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_ratio=None)
    loss.backward()
    expected = torch.tensor([[-1.0, 2.0, 0.0], [-0.5, 0.0, 0.0]])  # -[3, -6, 1.5] / 3
    torch.testing.assert_close(logp.grad, expected)
    # Clipping does not bite at r = 1, so the clipped loss has the same gradient.
    logp.grad = None
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    loss.backward()
    torch.testing.assert_close(logp.grad, expected)


def test_per_sequence_advantages_broadcast():
    seq_adv = torch.tensor([1.0, -1.0])
    a, _ = ppo_policy_loss(LOGP, OLD, seq_adv, FULL)
    b, _ = ppo_policy_loss(LOGP, OLD, ADV, FULL)
    assert a.item() == pytest.approx(b.item())


def test_policy_loss_bad_inputs():
    with pytest.raises(ValueError, match="old_logprobs"):
        ppo_policy_loss(LOGP, OLD[:, :1], ADV, FULL)
    with pytest.raises(ValueError, match="response_mask"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL[:1])
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(LOGP, OLD, torch.zeros(3), FULL)
    with pytest.raises(ValueError, match="logprobs"):
        ppo_policy_loss(LOGP[0], OLD[0], ADV[0], FULL[0])
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="clip_ratio"):
            ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=bad)
    with pytest.raises(ValueError, match="ratio_level") as err:
        ppo_policy_loss(LOGP, OLD, ADV, FULL, ratio_level="segment")
    assert all(name in str(err.value) for name in RATIO_LEVELS)
    with pytest.raises(ValueError, match="aggregation") as err:
        ppo_policy_loss(LOGP, OLD, ADV, FULL, aggregation="sum")
    assert all(name in str(err.value) for name in AGGREGATIONS)


# --------------------------------------------------------------------------------- value loss

V = torch.tensor([[1.0, 1.0, 0.1]])
OLD_V = torch.tensor([[0.5, 0.5, 0.0]])
RET = torch.tensor([[2.0, 0.0, 1.0]])
MASK3 = torch.ones(1, 3)


def test_value_loss_by_hand():
    # c = 0.2
    # t0: V - old = 0.5 -> clipped 0.2, V_clip = 0.7; (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69 -> 1.69 *
    # t1: V_clip = 0.7; (1 - 0)^2 = 1, (0.7 - 0)^2 = 0.49 -> 1
    # t2: V - old = 0.1, inside; both (0.1 - 1)^2 = 0.81 -> 0.81
    # loss = 0.5 * (1.69 + 1 + 0.81) / 3 = 0.5 * 3.5 / 3 = 0.583333; clipfrac = 1/3
    loss, metrics = ppo_value_loss(V, OLD_V, RET, MASK3, clip_value=0.2)
    assert loss.item() == pytest.approx(0.583333, abs=1e-6)
    assert metrics["value_loss"].item() == pytest.approx(0.583333, abs=1e-6)
    assert metrics["value_clipfrac"].item() == pytest.approx(1 / 3)


def test_clip_value_changes_the_loss():
    # c = 0.4: t0 V_clip = 0.9, (0.9 - 2)^2 = 1.21 -> 0.5 * (1.21 + 1 + 0.81) / 3 = 0.503333
    loss_04, _ = ppo_value_loss(V, OLD_V, RET, MASK3, clip_value=0.4)
    assert loss_04.item() == pytest.approx(0.503333, abs=1e-6)
    # None: 0.5 * (1 + 1 + 0.81) / 3 = 0.468333, clipfrac 0
    loss_none, m_none = ppo_value_loss(V, OLD_V, RET, MASK3, clip_value=None)
    assert loss_none.item() == pytest.approx(0.468333, abs=1e-6)
    assert m_none["value_clipfrac"].item() == 0.0


def test_value_loss_mask_and_gradient():
    values = V.clone().requires_grad_(True)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, metrics = ppo_value_loss(values, OLD_V, RET, mask, clip_value=None)
    # 0.5 * (1 + 0.81) / 2 = 0.4525; d/dV = (V - R) / 2 = [0, 0.5, -0.45]
    assert loss.item() == pytest.approx(0.4525, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5, -0.45]]))
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad


def test_value_loss_bad_inputs():
    with pytest.raises(ValueError, match="returns"):
        ppo_value_loss(V, OLD_V, RET[:, :2], MASK3)
    with pytest.raises(ValueError, match="old_values"):
        ppo_value_loss(V, OLD_V[:, :2], RET, MASK3)
    with pytest.raises(ValueError, match="clip_value"):
        ppo_value_loss(V, OLD_V, RET, MASK3, clip_value=0.0)


# ------------------------------------------------------------------------------------ entropy


def test_entropy_bonus_by_hand():
    # counted entropies 1, 2 (row 0) and 3 (row 1): mean = 6 / 3 = 2
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    value, metrics = entropy_bonus(entropy, mask)
    assert value.item() == pytest.approx(2.0)
    assert metrics["entropy"].item() == pytest.approx(2.0)
    assert value.requires_grad and not metrics["entropy"].requires_grad
    with pytest.raises(ValueError, match="response_mask"):
        entropy_bonus(entropy, mask[:, :2])


# --- counts: a part of a batch (a micro-batch, one rank's rows) gives its share of the batch's loss

# ratio 1 (logprobs = old) and no clipping, so the per-token loss is -A_t.
# row 0: A = [1, 3], 2 tokens; row 1: A = [2, .], 1 token; row 2: A = [-4, 2], 2 tokens.
PART_ADV = torch.tensor([[1.0, 3.0], [2.0, 9.0], [-4.0, 2.0]])
PART_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


@pytest.mark.parametrize(("aggregation", "whole", "first", "second"), [
    # token_mean: -(1 + 3 + 2 - 4 + 2) / 5 = -0.8; rows 0-1: -(1 + 3 + 2) / 5 = -1.2; row 2: -(-4 + 2) / 5 = 0.4
    ("token_mean", -0.8, -1.2, 0.4),
    # seq_mean: row means -2, -2, 1 -> (-2 - 2 + 1) / 3 = -1; rows 0-1: -4 / 3; row 2: 1 / 3
    ("seq_mean", -1.0, -4 / 3, 1 / 3),
])
def test_parts_with_the_batch_counts_add_up_to_the_batch(aggregation, whole, first, second):
    logp = torch.zeros(3, 2, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, torch.zeros(3, 2), PART_ADV, PART_MASK, clip_ratio=None, aggregation=aggregation)
    assert loss.item() == pytest.approx(whole)
    (grad_whole,) = torch.autograd.grad(loss, logp)
    counts = (5.0, 3.0)  # the batch's response tokens and non-empty rows
    parts, grads = [], []
    for rows in ([0, 1], [2]):
        part = torch.zeros(len(rows), 2, requires_grad=True)
        loss, m = ppo_policy_loss(part, torch.zeros(len(rows), 2), PART_ADV[rows], PART_MASK[rows], clip_ratio=None,
                                  aggregation=aggregation, counts=counts)
        parts.append(loss.item())
        grads.append(torch.autograd.grad(loss, part)[0])
    assert parts == pytest.approx([first, second])
    assert sum(parts) == pytest.approx(whole)
    assert torch.allclose(torch.cat(grads), grad_whole)  # the same update, in two passes


def test_value_loss_and_entropy_parts_add_up_to_the_token_mean():
    values = torch.tensor([[1.0, 2.0], [0.5, 7.0], [3.0, -1.0]])
    returns = torch.zeros(3, 2)
    # 1/2 * token mean of V^2 over the 5 tokens: (1 + 4 + 0.25 + 9 + 1) / 5 / 2 = 1.525
    whole, _ = ppo_value_loss(values, values, returns, PART_MASK, clip_value=None)
    assert whole.item() == pytest.approx(1.525)
    parts = [ppo_value_loss(values[r], values[r], returns[r], PART_MASK[r], clip_value=None, tokens=5.0)[0].item()
             for r in ([0, 1], [2])]
    assert parts == pytest.approx([(1 + 4 + 0.25) / 10, (9 + 1) / 10])
    # entropy token mean: (1 + 2 + 0.5 + 3 - 1) / 5 = 1.1
    assert entropy_bonus(values, PART_MASK)[0].item() == pytest.approx(1.1)
    halves = [entropy_bonus(values[r], PART_MASK[r], tokens=5.0)[0].item() for r in ([0, 1], [2])]
    assert halves == pytest.approx([3.5 / 5, 2.0 / 5])


# ----------------------------------------------------- 2025-26 options: each one changes the loss


def test_defaults_are_the_plain_clipped_surrogate_bit_for_bit():
    # The new options at their defaults reproduce the clipped PPO loss exactly (torch.equal, not
    # allclose), as written before they existed: max(-A r, -A clip(r, 0.8, 1.2)), token mean.
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=gen) * 0.3 - 1.0
    old = logp + torch.randn(4, 6, generator=gen) * 0.3
    adv = torch.randn(4, 6, generator=gen)
    mask = (torch.rand(4, 6, generator=gen) > 0.3).float()
    ratio = torch.exp(torch.where(mask != 0, logp - old, 0.0))
    expected = masked_mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2)), mask)
    loss, metrics = ppo_policy_loss(logp, old, adv, mask)
    assert torch.equal(loss, expected)
    assert set(metrics) == {"policy_loss", "clipfrac", "approx_kl", "ratio"}
    explicit, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, "token", "token_mean", None, clip_ratio_high=0.2,
                                  dual_clip=None, surrogate="clip", is_weights=torch.ones(4, 6), norm_length=None)
    assert torch.equal(explicit, expected)


def test_clip_higher_by_hand_and_gradient():
    # eps_low = 0.2, eps_high = 0.6: range [0.8, 1.6]
    # r=1.5, A=+1: max(-1.5, -1.5) = -1.5   (inside the range: no longer clipped)
    # r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    # r=1.1, A=-1: max( 1.1,  1.1) =  1.1
    # r=0.7, A=-1: max( 0.7,  0.8) =  0.8   clipped branch active (the lower bound is still 0.8)
    # token_mean = (-1.5 - 0.5 + 1.1 + 0.8) / 4 = -0.1 / 4 = -0.025; clipfrac 1/4
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = ppo_policy_loss(logp, OLD, ADV, FULL, clip_ratio=0.2, clip_ratio_high=0.6)
    assert loss.item() == pytest.approx(-0.025, abs=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(0.25)
    # d loss / d logp of token (0, 0): -A r / 4 = -1.5 / 4 = -0.375, where the symmetric range
    # (0.2, 0.2) clips r = 1.5 to 1.2 and the gradient is 0.
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0].item() == pytest.approx(-0.375)
    default, _ = ppo_policy_loss(logp, OLD, ADV, FULL, clip_ratio=0.2)
    (grad_default,) = torch.autograd.grad(default, logp)
    assert default.item() == pytest.approx(0.05, abs=1e-6) and grad_default[0, 0].item() == 0.0
    # eps_low = 0.4, eps_high = 0.2: range [0.6, 1.2]; the bounds act independently
    # r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped); r=0.5: max(-0.5, -0.6) = -0.5;
    # r=1.1, A=-1: 1.1; r=0.7, A=-1: max(0.7, 0.7) = 0.7 -> (-1.2 - 0.5 + 1.1 + 0.7) / 4 = 0.025
    low, m_low = ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=0.4, clip_ratio_high=0.2)
    assert low.item() == pytest.approx(0.025, abs=1e-6)
    assert m_low["clipfrac"].item() == pytest.approx(0.25)


# One row: r = [4, 1.1, 2, 0.5] (old_logprobs 0), A = [-1, -1, -2, 2]
DUAL_RATIOS = torch.tensor([[4.0, 1.1, 2.0, 0.5]])
DUAL_ADV = torch.tensor([[-1.0, -1.0, -2.0, 2.0]])


def test_dual_clip_by_hand_and_gradient():
    # eps = 0.2, c = 3. Clipped PPO loss max(-A r, -A clip(r, 0.8, 1.2)), then min(., -c A) where A < 0:
    # t0: r=4,   A=-1: max(4, 1.2)    = 4;   bound 3 -> 3   dual bound active
    # t1: r=1.1, A=-1: max(1.1, 1.1)  = 1.1; bound 3 -> 1.1
    # t2: r=2,   A=-2: max(4, 2.4)    = 4;   bound 6 -> 4
    # t3: r=0.5, A=+2: max(-1, -1.6)  = -1   (A > 0: no dual bound)
    # token_mean = (3 + 1.1 + 4 - 1) / 4 = 7.1 / 4 = 1.775; dual_clipfrac = 1/4; clipfrac = 0
    # (the clipped branch is never the larger one here)
    logp = DUAL_RATIOS.log().requires_grad_(True)
    mask, old = torch.ones(1, 4), torch.zeros(1, 4)
    loss, metrics = ppo_policy_loss(logp, old, DUAL_ADV, mask, clip_ratio=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(1.775, abs=1e-6)
    assert metrics["dual_clipfrac"].item() == pytest.approx(0.25)
    assert metrics["clipfrac"].item() == 0.0
    # Without it: (4 + 1.1 + 4 - 1) / 4 = 8.1 / 4 = 2.025, and no dual_clipfrac metric.
    plain, m_plain = ppo_policy_loss(logp, old, DUAL_ADV, mask, clip_ratio=0.2)
    assert plain.item() == pytest.approx(2.025, abs=1e-6)
    assert "dual_clipfrac" not in m_plain
    # Gradient of t0: the bound -c A is constant, so 0; without dual clip -A r / 4 = 4 / 4 = 1.
    # The other tokens: t1 -A r / 4 = 1.1 / 4 = 0.275, t2 -A r / 4 = 4 / 4 = 1, t3 -A r / 4 = -1 / 4.
    (grad,) = torch.autograd.grad(loss, logp)
    (grad_plain,) = torch.autograd.grad(plain, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.275, 1.0, -0.25]]))
    torch.testing.assert_close(grad_plain, torch.tensor([[1.0, 0.275, 1.0, -0.25]]))
    # A bound above every loss (c = 10: 10, 10, 20) changes nothing.
    high, m_high = ppo_policy_loss(logp, old, DUAL_ADV, mask, clip_ratio=0.2, dual_clip=10.0)
    assert high.item() == pytest.approx(2.025, abs=1e-6) and m_high["dual_clipfrac"].item() == 0.0


def test_cispo_by_hand():
    # loss_t = -sg(clip(r, 0.8, 1.2)) A log pi, with log pi = ln r here (old_logprobs 0):
    # r=1.5, A=+1: -1.2 * ln 1.5 = -1.2 *  0.405465 = -0.486558
    # r=0.5, A=+1: -0.8 * ln 0.5 = -0.8 * -0.693147 =  0.554518
    # r=1.1, A=-1: +1.1 * ln 1.1 =  1.1 *  0.095310 =  0.104841
    # r=0.7, A=-1: +0.8 * ln 0.7 =  0.8 * -0.356675 = -0.285340
    # token_mean = (-0.486558 + 0.554518 + 0.104841 - 0.285340) / 4 = -0.112539 / 4 = -0.028135
    # clipfrac = tokens with r outside [0.8, 1.2]: 1.5, 0.5, 0.7 -> 3/4
    loss, metrics = ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=0.2, clip_ratio_high=0.2, surrogate="cispo")
    assert loss.item() == pytest.approx(-0.028135, abs=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(0.75)
    assert metrics["ratio"].item() == pytest.approx(0.95, abs=1e-6)  # the r of the loss, as with "clip"
    # clip_ratio None: no lower bound, weights [1.2, 0.5, 1.1, 0.7]:
    # -1.2 * 0.405465 - 0.5 * -0.693147 + 1.1 * 0.095310 + 0.7 * -0.356675
    #   = -0.486558 + 0.346574 + 0.104841 - 0.249673 = -0.284816 -> / 4 = -0.071204
    # clipfrac: only r = 1.5 > 1.2 -> 1/4
    open_low, m_low = ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=None, clip_ratio_high=0.2, surrogate="cispo")
    assert open_low.item() == pytest.approx(-0.071204, abs=1e-6)
    assert m_low["clipfrac"].item() == pytest.approx(0.25)


def test_cispo_keeps_the_gradient_where_ppo_clips_it():
    # d loss_t / d log pi_t = -clip(r_t) A_t / 4 for every token (the weight is a constant):
    #   [-1.2, -0.8, 1.1, 0.8] / 4 = [-0.3, -0.2, 0.275, 0.2]
    # PPO (eps 0.2): tokens (0, 0) (r = 1.5, A > 0) and (1, 1) (r = 0.7, A < 0) are on the clipped
    # branch, a constant, so 0; the others -A r / 4 = [-0.5 / 4, 1.1 / 4] = [-0.125, 0.275].
    logp = LOGP.clone().requires_grad_(True)
    cispo, _ = ppo_policy_loss(logp, OLD, ADV, FULL, clip_ratio=0.2, clip_ratio_high=0.2, surrogate="cispo")
    (grad,) = torch.autograd.grad(cispo, logp)
    torch.testing.assert_close(grad, torch.tensor([[-0.3, -0.2], [0.275, 0.2]]))
    ppo, _ = ppo_policy_loss(logp, OLD, ADV, FULL, clip_ratio=0.2)
    (grad_ppo,) = torch.autograd.grad(ppo, logp)
    torch.testing.assert_close(grad_ppo, torch.tensor([[0.0, -0.125], [0.275, 0.0]]))


def test_cispo_ignores_padding():
    # Row 1's second token is padding with a -inf log-prob: loss and gradient stay finite, and the
    # loss is that of the 3 response tokens: (-0.486558 + 0.554518 + 0.104841) / 3 = 0.057600
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), -math.inf]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = ppo_policy_loss(logp, OLD, ADV, mask, clip_ratio=0.2, clip_ratio_high=0.2, surrogate="cispo")
    assert loss.item() == pytest.approx(0.057600, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all() and grad[1, 1] == 0


def test_is_weights_by_hand():
    # Per-token clipped losses (eps 0.2): [-1.2, -0.5, 1.1, 0.8]; weights [2, 3, 0.5, 1]:
    # [-2.4, -1.5, 0.55, 0.8] -> token_mean = -2.55 / 4 = -0.6375 (unweighted: 0.05)
    weights = torch.tensor([[2.0, 3.0], [0.5, 1.0]], requires_grad=True)
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = ppo_policy_loss(logp, OLD, ADV, FULL, is_weights=weights)
    assert loss.item() == pytest.approx(-0.6375, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(-0.6375, abs=1e-6)
    # The weights are constants: each token's gradient is its unweighted one times its weight.
    # Unweighted: (0, 0) and (1, 1) clipped -> 0; (0, 1) -A r / 4 = -0.125; (1, 0) 1.1 / 4 = 0.275.
    # Weighted: [0, 3 * -0.125, 0.5 * 0.275, 0] = [0, -0.375, 0.1375, 0]
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.375], [0.1375, 0.0]]))
    assert weights.grad is None
    # Weights in the padding may be anything (inf here) without reaching loss or gradient.
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    padded = torch.tensor([[1.0, 1.0], [1.0, math.inf]])
    logp.grad = None
    loss, _ = ppo_policy_loss(logp, OLD, ADV, mask, is_weights=padded)
    loss.backward()
    # (-1.2 - 0.5 + 1.1) / 3 = -0.2, as without weights
    assert loss.item() == pytest.approx(-0.2, abs=1e-6) and torch.isfinite(logp.grad).all()


def test_seq_mean_token_sum_norm_by_hand():
    # Row 1 keeps only its first token. Per-token losses (eps 0.2): -1.2, -0.5 | 1.1
    # norm_length 4, N_seq 2: (-1.2 - 0.5 + 1.1) / (2 * 4) = -0.6 / 8 = -0.075
    # (token_mean -0.2 and seq_mean 0.125, test_aggregation_changes_the_loss)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = ppo_policy_loss(LOGP, OLD, ADV, mask, aggregation="seq_mean_token_sum_norm", norm_length=4)
    assert loss.item() == pytest.approx(-0.075, abs=1e-6)
    # A row without response tokens is not counted in N_seq.
    empty = torch.cat([mask, torch.zeros(1, 2)])
    loss_empty, _ = ppo_policy_loss(torch.cat([LOGP, torch.zeros(1, 2)]), torch.zeros(3, 2),
                                    torch.cat([ADV, torch.full((1, 2), 5.0)]), empty,
                                    aggregation="seq_mean_token_sum_norm", norm_length=4)
    assert loss_empty.item() == pytest.approx(-0.075, abs=1e-6)
    # norm_length 2: -0.6 / 4 = -0.15
    loss_2, _ = ppo_policy_loss(LOGP, OLD, ADV, mask, aggregation="seq_mean_token_sum_norm", norm_length=2)
    assert loss_2.item() == pytest.approx(-0.15, abs=1e-6)
    # No response token at all: 0, not NaN.
    none, _ = ppo_policy_loss(LOGP, OLD, ADV, torch.zeros(2, 2), aggregation="seq_mean_token_sum_norm",
                              norm_length=4)
    assert none.item() == 0.0


def test_seq_mean_token_sum_norm_parts_add_up_to_the_batch():
    # Per-token loss -A (ratio 1, no clipping): row 0 [-1, -3], row 1 [-2], row 2 [4, -2]; sum -4.
    # Whole batch, N_seq = 3, norm_length 4: -4 / 12 = -1/3
    # rows 0-1 with counts (5, 3): (-1 - 3 - 2) / 12 = -0.5; row 2: (4 - 2) / 12 = 1/6; sum -1/3
    kw = dict(clip_ratio=None, aggregation="seq_mean_token_sum_norm", norm_length=4)
    logp = torch.zeros(3, 2, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, torch.zeros(3, 2), PART_ADV, PART_MASK, **kw)
    assert loss.item() == pytest.approx(-1 / 3)
    (grad_whole,) = torch.autograd.grad(loss, logp)
    parts, grads = [], []
    for rows in ([0, 1], [2]):
        part = torch.zeros(len(rows), 2, requires_grad=True)
        loss, _ = ppo_policy_loss(part, torch.zeros(len(rows), 2), PART_ADV[rows], PART_MASK[rows],
                                  counts=(5.0, 3.0), **kw)
        parts.append(loss.item())
        grads.append(torch.autograd.grad(loss, part)[0])
    assert parts == pytest.approx([-0.5, 1 / 6])
    assert torch.allclose(torch.cat(grads), grad_whole)


def test_new_options_bad_inputs():
    with pytest.raises(ValueError, match="^clip_ratio_high = 0.3 needs clip_ratio"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=None, clip_ratio_high=0.3)
    with pytest.raises(ValueError, match="^clip_ratio_high must be > 0"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio_high=0.0)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="^dual_clip must be > 1"):
            ppo_policy_loss(LOGP, OLD, ADV, FULL, dual_clip=bad)
    with pytest.raises(ValueError, match="^dual_clip needs clip_ratio"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio=None, dual_clip=3.0)
    with pytest.raises(ValueError, match="^dual_clip applies to surrogate 'clip' only"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, clip_ratio_high=0.3, surrogate="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="^clip_ratio_high must be given with surrogate 'cispo'"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, surrogate="cispo")
    with pytest.raises(ValueError, match="^surrogate") as err:
        ppo_policy_loss(LOGP, OLD, ADV, FULL, surrogate="spo")
    assert all(name in str(err.value) for name in SURROGATES)
    with pytest.raises(ValueError, match="^is_weights"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, is_weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="^norm_length must be given with aggregation 'seq_mean_token_sum_norm'"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, aggregation="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="^norm_length is used only by aggregation 'seq_mean_token_sum_norm'"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, norm_length=4)
    with pytest.raises(ValueError, match="^norm_length must be > 0"):
        ppo_policy_loss(LOGP, OLD, ADV, FULL, aggregation="seq_mean_token_sum_norm", norm_length=0)
    with pytest.raises(TypeError):  # the new options are keyword-only
        ppo_policy_loss(LOGP, OLD, ADV, FULL, 0.2, "token", "token_mean", None, 0.3)
