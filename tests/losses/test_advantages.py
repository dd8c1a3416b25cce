import math

import pytest
import torch

from rlhf_lab.losses import (
    BASELINES,
    baseline_batch_mean,
    baseline_group_mean,
    baseline_group_norm,
    baseline_leave_one_out,
    baseline_none,
    contiguous_group_ids,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    reinforce_advantages,
    returns_to_go,
    whiten_advantages,
)

# ----------------------------------------------------------------------------------------- GAE

REWARDS = torch.tensor([[0.0, 0.0, 1.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.7]])
FULL = torch.ones(1, 3)


def test_gae_three_steps_by_hand():
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72; value after the last token is 0.
    # delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3
    # delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03
    # delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
    # A_2 = 0.3
    # A_1 = 0.03 + 0.72 * 0.3   = 0.246
    # A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    adv, ret = gae(REWARDS, VALUES, FULL, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]]))


def test_gae_left_offset_and_padding_match_unpadded_row():
    # Same episode placed at columns 1..3 of a length-5 row; padding holds junk that must not leak.
    rewards = torch.tensor([[5.0, 0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.21712, 0.246, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.71712, 0.846, 1.0, 0.0]]))


def test_gamma_and_lam_change_the_result():
    base, _ = gae(REWARDS, VALUES, FULL, gamma=0.9, lam=0.8)
    # gamma = lam = 1: Monte Carlo return minus value, A_t = sum_{s>=t} r_s - V_t
    #   = [1 - 0.5, 1 - 0.6, 1 - 0.7] = [0.5, 0.4, 0.3]
    mc, _ = gae(REWARDS, VALUES, FULL, gamma=1.0, lam=1.0)
    torch.testing.assert_close(mc, torch.tensor([[0.5, 0.4, 0.3]]))
    # lam = 0: one-step TD error, A = delta = [0.04, 0.03, 0.3]
    td, _ = gae(REWARDS, VALUES, FULL, gamma=0.9, lam=0.0)
    torch.testing.assert_close(td, torch.tensor([[0.04, 0.03, 0.3]]))
    # gamma alone: gamma = 0.5, lam = 0.8 (gamma * lam = 0.4)
    # delta = [0.5*0.6 - 0.5, 0.5*0.7 - 0.6, 1 - 0.7] = [-0.2, -0.25, 0.3]
    # A_2 = 0.3; A_1 = -0.25 + 0.4 * 0.3 = -0.13; A_0 = -0.2 + 0.4 * -0.13 = -0.252
    low_gamma, _ = gae(REWARDS, VALUES, FULL, gamma=0.5, lam=0.8)
    torch.testing.assert_close(low_gamma, torch.tensor([[-0.252, -0.13, 0.3]]))
    # lam alone: gamma = 0.9, lam = 0.5 (0.45): A_1 = 0.03 + 0.45*0.3 = 0.165;
    # A_0 = 0.04 + 0.45 * 0.165 = 0.11425
    low_lam, _ = gae(REWARDS, VALUES, FULL, gamma=0.9, lam=0.5)
    torch.testing.assert_close(low_lam, torch.tensor([[0.11425, 0.165, 0.3]]))
    for other in (mc, td, low_gamma, low_lam):
        assert not torch.allclose(base, other)


def _gae_reference(rewards, values, mask, gamma, lam):
    """Backward recursion A_t = delta_t + gamma * lam * A_{t+1}, one row and step at a time."""
    batch, steps = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(batch):
        for t in reversed(range(steps)):
            if mask[b, t] == 0:
                continue
            inside_next = t + 1 < steps and mask[b, t + 1] != 0
            next_value = values[b, t + 1] if inside_next else 0.0
            next_adv = adv[b, t + 1] if inside_next else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            adv[b, t] = delta + gamma * lam * next_adv
    return adv, torch.where(mask != 0, adv + values, 0.0)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.7, 0.0)])
def test_gae_matches_reference_loop(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    batch, steps = 7, 9
    rewards = torch.randn(batch, steps, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, steps, generator=gen, dtype=torch.float64)
    # (start, length): left offsets, trailing padding, a full row, a one-token row, an empty row
    spans = [(0, 9), (0, 4), (3, 6), (2, 3), (5, 1), (0, 0), (8, 1)]
    mask = torch.zeros(batch, steps, dtype=torch.float64)
    for b, (start, length) in enumerate(spans):
        mask[b, start : start + length] = 1.0
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # bool masks give the same answer
    adv_bool, _ = gae(rewards, values, mask.bool(), gamma=gamma, lam=lam)
    torch.testing.assert_close(adv_bool, adv)


def test_gae_bad_inputs():
    with pytest.raises(ValueError, match="values"):
        gae(REWARDS, VALUES[:, :2], FULL)
    with pytest.raises(ValueError, match="response_mask"):
        gae(REWARDS, VALUES, torch.ones(1, 4))
    with pytest.raises(ValueError, match="rewards"):
        gae(REWARDS[0], VALUES[0], FULL[0])
    with pytest.raises(ValueError, match="gamma"):
        gae(REWARDS, VALUES, FULL, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(REWARDS, VALUES, FULL, lam=-0.1)
    with pytest.raises(ValueError, match="response_mask.*contiguous"):
        gae(REWARDS, VALUES, torch.tensor([[1.0, 0.0, 1.0]]))


# ------------------------------------------------------------------------------- returns_to_go


def test_returns_to_go_by_hand():
    # rewards [0, 0, 1], gamma 0.9: G_2 = 1, G_1 = 0.9 * 1 = 0.9, G_0 = 0.9^2 * 1 = 0.81
    torch.testing.assert_close(returns_to_go(REWARDS, FULL, gamma=0.9), torch.tensor([[0.81, 0.9, 1.0]]))
    # gamma = 1 (the default): every token gets the final reward
    torch.testing.assert_close(returns_to_go(REWARDS, FULL), torch.tensor([[1.0, 1.0, 1.0]]))
    # rewards [1, -0.5, 2], gamma 0.5: G_2 = 2; G_1 = -0.5 + 0.5 * 2 = 0.5; G_0 = 1 + 0.5 * 0.5 = 1.25
    torch.testing.assert_close(returns_to_go(torch.tensor([[1.0, -0.5, 2.0]]), FULL, gamma=0.5),
                               torch.tensor([[1.25, 0.5, 2.0]]))


def test_returns_to_go_left_offset_and_padding():
    # The episode of test_returns_to_go_by_hand at columns 1..3, with junk (inf) in the padding:
    # [0, 0.81, 0.9, 1, 0]; the junk never leaks.
    rewards = torch.tensor([[5.0, 0.0, 0.0, 1.0, math.inf]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    out = returns_to_go(rewards, mask, gamma=0.9)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.81, 0.9, 1.0, 0.0]]))
    torch.testing.assert_close(returns_to_go(rewards, mask.bool(), gamma=0.9), out)


def test_returns_to_go_is_gae_without_a_critic():
    # With V = 0 and lam = 1, GAE's advantage is sum_l gamma^l r_{t+l}: the return-to-go.
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    spans = [(0, 9), (0, 4), (3, 6), (2, 3), (5, 1), (0, 0), (8, 1)]
    mask = torch.zeros(7, 9, dtype=torch.float64)
    for b, (start, length) in enumerate(spans):
        mask[b, start : start + length] = 1.0
    for gamma in (1.0, 0.9, 0.0):
        adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
        torch.testing.assert_close(returns_to_go(rewards, mask, gamma=gamma), adv)
    # and it changes with gamma
    assert not torch.allclose(returns_to_go(rewards, mask, gamma=0.5), returns_to_go(rewards, mask))


def test_returns_to_go_dtype_and_bad_inputs():
    out = returns_to_go(REWARDS.bfloat16(), FULL, gamma=0.9)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.tensor([[0.81, 0.9, 1.0]]), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="response_mask"):
        returns_to_go(REWARDS, torch.ones(1, 4))
    with pytest.raises(ValueError, match="rewards"):
        returns_to_go(REWARDS[0], FULL[0])
    with pytest.raises(ValueError, match="gamma"):
        returns_to_go(REWARDS, FULL, gamma=1.5)


# ----------------------------------------------------------------------------------- baselines

# Two prompts, G = 3: group 0 = [1, 2, 3], group 1 = [7, 8, 12]
SCORES = torch.tensor([1.0, 2.0, 3.0, 7.0, 8.0, 12.0])
IDS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_contiguous_group_ids():
    assert contiguous_group_ids(6, 3).tolist() == IDS.tolist()
    assert contiguous_group_ids(4, 1).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="group_size"):
        contiguous_group_ids(6, 4)  # 6 % 4 != 0
    with pytest.raises(ValueError, match="group_size"):
        contiguous_group_ids(6, 0)


def test_baseline_none_and_batch_mean_by_hand():
    torch.testing.assert_close(baseline_none(SCORES, IDS), SCORES)
    # batch mean = (1 + 2 + 3 + 7 + 8 + 12) / 6 = 33 / 6 = 5.5
    expected = torch.tensor([-4.5, -3.5, -2.5, 1.5, 2.5, 6.5])
    torch.testing.assert_close(baseline_batch_mean(SCORES, IDS), expected)
    torch.testing.assert_close(baseline_batch_mean(SCORES, IDS), SCORES - SCORES.mean())


def test_leave_one_out_by_hand_and_excludes_self():
    # group 0: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0;    3 - (1+2)/2 = 1.5
    # group 1: 7 - (8+12)/2 = -3;  8 - (7+12)/2 = -1.5; 12 - (7+8)/2 = 4.5
    adv = baseline_leave_one_out(SCORES, IDS)
    torch.testing.assert_close(adv, torch.tensor([-1.5, 0.0, 1.5, -3.0, -1.5, 4.5]))
    for i in range(len(SCORES)):
        others = [SCORES[j] for j in range(len(SCORES)) if IDS[j] == IDS[i] and j != i]
        assert adv[i].item() == pytest.approx((SCORES[i] - sum(others) / len(others)).item())


def test_group_norm_by_hand():
    # group 0: mean 2, population std sqrt((1 + 0 + 1) / 3) = 0.816497
    #   -> [-1/0.816497, 0, 1/0.816497] = [-1.224745, 0, 1.224745]
    # group 1: mean 9, deviations [-2, -1, 3], std sqrt((4 + 1 + 9) / 3) = 2.160247
    #   -> [-0.925820, -0.462910, 1.388730]
    adv = baseline_group_norm(SCORES, IDS)
    expected = torch.tensor([-1.224745, 0.0, 1.224745, -0.925820, -0.462910, 1.388730])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_group_norm_is_per_group():
    # Group 1 is 100x larger in scale; each group still gets mean 0 and population std 1.
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, 300.0, 200.0, 400.0])
    adv = baseline_group_norm(scores, contiguous_group_ids(8, 4)).view(2, 4)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(dim=1, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    # A batch-wide normalisation would not give this.
    whole = (scores - scores.mean()) / scores.std(unbiased=False)
    assert not torch.allclose(adv.reshape(-1), whole)


def test_group_norm_constant_group_is_zero():
    adv = baseline_group_norm(torch.tensor([5.0, 5.0, 1.0, 3.0]), torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(adv).all()
    # [5, 5] -> 0 / (0 + eps) = 0; [1, 3] -> mean 2, std 1 -> [-1, 1] (up to eps)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1.0, 1.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_group_norm_identical_float32_scores_give_exactly_zero(n, eps):
    # Regression: 0.7 is not a float32 number, and the float32 mean of n copies of it can land an
    # ulp away (0.7 * 8: every deviation is 2^-24 = 5.96e-8, the std as well), so the old
    # deviation / (std + 1e-6) was 5.96e-8 / 1.06e-6 = 0.056, a spurious advantage, and eps = 0
    # gave 0 / 0 = NaN (0.7 * 4). A group whose max equals its min now gives exactly 0.
    scores = torch.full((n,), 0.7, dtype=torch.float32)
    adv = baseline_group_norm(scores, torch.zeros(n, dtype=torch.long), eps=eps)
    assert torch.equal(adv, torch.zeros(n))


def test_group_norm_constant_group_next_to_a_varied_one():
    # Group 0 = 0.7 * 8 (constant -> exactly 0); group 1 = [1, 2, 3] -> [-1.224745, 0, 1.224745]
    # as in test_group_norm_by_hand (population std sqrt(2/3) = 0.816497). With eps = 0 the
    # varied group is exactly deviation / std: [-1, 1] / 1 for [1, 3].
    scores = torch.tensor([0.7] * 8 + [1.0, 2.0, 3.0])
    ids = torch.tensor([0] * 8 + [1] * 3)
    adv = baseline_group_norm(scores, ids)
    assert torch.equal(adv[:8], torch.zeros(8))
    torch.testing.assert_close(adv[8:], torch.tensor([-1.224745, 0.0, 1.224745]), atol=1e-5, rtol=0)
    exact = baseline_group_norm(torch.tensor([1.0, 3.0, 0.7, 0.7]), torch.tensor([0, 0, 1, 1]), eps=0.0)
    assert torch.equal(exact, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_group_mean_by_hand():
    # group 0 [1, 2, 3], mean 2 -> [-1, 0, 1]; group 1 [7, 8, 12], mean 9 -> [-2, -1, 3]
    # (no division by the std: group_norm would give [-1.224745, 0, 1.224745, ...])
    adv = baseline_group_mean(SCORES, IDS)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -2.0, -1.0, 3.0]))
    assert not torch.allclose(adv, baseline_group_norm(SCORES, IDS))
    # RLOO is the same deviation scaled by n / (n - 1) = 3/2.
    torch.testing.assert_close(baseline_leave_one_out(SCORES, IDS), 1.5 * adv)
    # Interleaved, unequal groups: a = rows 0, 2, 4 = [1, 2, 6] (mean 3) -> [-2, -1, 3];
    # b = rows 1, 3 = [10, 20] (mean 15) -> [-5, 5]; a group of one (row 5) -> 0
    scores = torch.tensor([1.0, 10.0, 2.0, 20.0, 6.0, 4.0])
    ids = torch.tensor([5, 2, 5, 2, 5, 9])
    torch.testing.assert_close(baseline_group_mean(scores, ids), torch.tensor([-2.0, -5.0, -1.0, 5.0, 3.0, 0.0]))
    assert reinforce_advantages(SCORES, IDS, baseline="group_mean").tolist() == adv.tolist()


def test_group_mean_identical_scores_give_exactly_zero():
    # The float32 mean of 0.7 * 8 is 2^-24 above the scores: plain subtraction is not 0.
    scores = torch.full((8,), 0.7)
    assert (scores - scores.mean()).abs().max() > 0
    assert torch.equal(baseline_group_mean(scores, torch.zeros(8, dtype=torch.long)), torch.zeros(8))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_group_by_ids_not_by_position(name):
    # Shuffle the rows together with their group ids: every row keeps its advantage.
    fn = BASELINES[name]
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fn(SCORES[perm], IDS[perm]), fn(SCORES, IDS)[perm])
    # Any integer ids work, in any order: [7, 3] names the same two groups as [0, 1].
    torch.testing.assert_close(fn(SCORES, torch.where(IDS == 0, 7, 3)), fn(SCORES, IDS))


def test_interleaved_and_unequal_groups_by_hand():
    # Rows alternate between prompts a (id 5) and b (id 2), and a has 3 samples, b has 2:
    #   a = rows 0, 2, 4 = [1, 2, 6]  (mean 3);   b = rows 1, 3 = [10, 20]  (mean 15)
    scores = torch.tensor([1.0, 10.0, 2.0, 20.0, 6.0])
    ids = torch.tensor([5, 2, 5, 2, 5])
    # RLOO: a: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5;  b: 10 - 20 = -10, 20 - 10 = 10
    torch.testing.assert_close(baseline_leave_one_out(scores, ids), torch.tensor([-3.0, -10.0, -1.5, 10.0, 4.5]))
    # GRPO: a: deviations [-2, -1, 3], std sqrt(14/3) = 2.160247 -> [-0.925820, -0.462910, 1.388730]
    #       b: deviations [-5, 5], std 5 -> [-1, 1]
    torch.testing.assert_close(baseline_group_norm(scores, ids),
                               torch.tensor([-0.925820, -1.0, -0.462910, 1.0, 1.388730]), atol=1e-5, rtol=0)
    # The position-blind contiguous reading (groups [1, 10, 2], [20, 6]) would give other values.
    assert not torch.allclose(baseline_group_norm(scores, ids),
                              baseline_group_norm(scores, torch.tensor([0, 0, 0, 1, 1])))


def test_reinforce_advantages_dispatches_and_every_baseline_differs():
    outs = {name: reinforce_advantages(SCORES, IDS, baseline=name) for name in BASELINES}
    for name, fn in BASELINES.items():
        torch.testing.assert_close(outs[name], fn(SCORES, IDS))
    torch.testing.assert_close(reinforce_advantages(SCORES, IDS), outs["batch_mean"])
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_baseline_bad_inputs():
    with pytest.raises(ValueError, match="baseline") as err:
        reinforce_advantages(SCORES, IDS, baseline="critic")
    for name in BASELINES:
        assert name in str(err.value)
    for fn in BASELINES.values():
        with pytest.raises(ValueError, match="group_ids must have shape"):
            fn(SCORES, IDS[:4])
        with pytest.raises(ValueError, match="group_ids must be an integer"):
            fn(SCORES, IDS.float())
        with pytest.raises(ValueError, match="scores"):
            fn(SCORES.view(2, 3), IDS.view(2, 3))
    with pytest.raises(ValueError, match=r"leave_one_out needs >= 2 samples in every group.*groups \[1\]"):
        baseline_leave_one_out(SCORES[:4], IDS[:4])  # group 1 has one sample
    with pytest.raises(ValueError, match="eps"):
        baseline_group_norm(SCORES, IDS, eps=-1.0)


# ------------------------------------------------------------------------------------ whitening


def test_whiten_advantages_is_masked_whiten_with_shift():
    gen = torch.Generator().manual_seed(1)
    adv = torch.randn(3, 5, generator=gen) * 4 + 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    out = whiten_advantages(adv, mask)
    torch.testing.assert_close(out, masked_whiten(adv, mask, shift_mean=True))
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert (out[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="response_mask"):
        whiten_advantages(adv, mask[:, :4])


def test_gae_keeps_low_precision_dtype():
    adv, ret = gae(REWARDS.bfloat16(), VALUES.bfloat16(), FULL, gamma=0.9, lam=0.8)
    assert adv.dtype == ret.dtype == torch.bfloat16
    torch.testing.assert_close(
        adv.float(), torch.tensor([[0.21712, 0.246, 0.3]]), atol=1e-2, rtol=0
    )
