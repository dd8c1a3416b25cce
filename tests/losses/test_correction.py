import math

import pytest
import torch

from rlhf_lab.losses import (
    CORRECTION_LEVELS,
    CORRECTION_MODES,
    ppo_policy_loss,
    rollout_correction_weights,
)

# Two rows, T = 3; row 1's last column is padding (-inf in both).
TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -math.inf]])
SAMPLE = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -2.2, -math.inf]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# Delta = train - sample: row 0 [0.5, -1, 0], row 1 [0, 1, (pad)]; mean |Delta| = (0.5 + 1 + 0 + 0 + 1) / 5 = 0.5
E = math.e


def test_token_tis_by_hand():
    # w = exp(Delta) = [e^0.5, e^-1, 1], [1, e] = [1.648721, 0.367879, 1], [1, 2.718282]
    # cap 2: e -> 2 (one of 5 tokens truncated); padding 0
    # is_weight = (1.648721 + 0.367879 + 1 + 1 + 2) / 5 = 6.016600 / 5 = 1.203320
    weights, metrics = rollout_correction_weights(TRAIN, SAMPLE, MASK, mode="tis", level="token", cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.648721, 0.367879, 1.0], [1.0, 2.0, 0.0]]))
    assert metrics["sampling_logprob_diff"].item() == pytest.approx(0.5)
    assert metrics["is_weight"].item() == pytest.approx(1.203320, abs=1e-6)
    assert metrics["is_capped_frac"].item() == pytest.approx(0.2)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    # The defaults are mode "tis", level "token", cap 2.
    assert torch.equal(rollout_correction_weights(TRAIN, SAMPLE, MASK)[0], weights)


def test_token_mis_by_hand():
    # The same token (w = e > 2) gets weight 0 instead of 2; the others keep theirs.
    # is_weight = (1.648721 + 0.367879 + 1 + 1 + 0) / 5 = 4.016600 / 5 = 0.803320
    weights, metrics = rollout_correction_weights(TRAIN, SAMPLE, MASK, mode="mis")
    torch.testing.assert_close(weights, torch.tensor([[1.648721, 0.367879, 1.0], [1.0, 0.0, 0.0]]))
    assert metrics["is_weight"].item() == pytest.approx(0.803320, abs=1e-6)
    assert metrics["is_capped_frac"].item() == pytest.approx(0.2)
    assert metrics["sampling_logprob_diff"].item() == pytest.approx(0.5)


def test_sequence_level_by_hand():
    # Row 0: sum Delta = 0.5 - 1 + 0 = -0.5 -> e^-0.5 = 0.606531 on its 3 tokens
    # Row 1: sum Delta = 0 + 1 = 1 -> e = 2.718282 on its 2 tokens: above cap 2
    # tis: row 1 -> 2; is_weight = (3 * 0.606531 + 2 * 2) / 5 = 5.819592 / 5 = 1.163918; capped 2/5
    weights, metrics = rollout_correction_weights(TRAIN, SAMPLE, MASK, level="sequence")
    torch.testing.assert_close(weights, torch.tensor([[0.606531] * 3, [2.0, 2.0, 0.0]]))
    assert metrics["is_weight"].item() == pytest.approx(1.163918, abs=1e-6)
    assert metrics["is_capped_frac"].item() == pytest.approx(0.4)
    # mis: row 1 is left out; is_weight = 1.819592 / 5 = 0.363918
    weights, metrics = rollout_correction_weights(TRAIN, SAMPLE, MASK, mode="mis", level="sequence")
    torch.testing.assert_close(weights, torch.tensor([[0.606531] * 3, [0.0, 0.0, 0.0]]))
    assert metrics["is_weight"].item() == pytest.approx(0.363918, abs=1e-6)
    assert metrics["is_capped_frac"].item() == pytest.approx(0.4)
    # cap 3: nothing is above it, both modes keep e for row 1
    for mode in CORRECTION_MODES:
        weights, metrics = rollout_correction_weights(TRAIN, SAMPLE, MASK, mode=mode, level="sequence", cap=3.0)
        torch.testing.assert_close(weights, torch.tensor([[0.606531] * 3, [E, E, 0.0]]))
        assert metrics["is_capped_frac"].item() == 0.0


def test_each_option_changes_the_weights():
    base, _ = rollout_correction_weights(TRAIN, SAMPLE, MASK)
    for kw in ({"mode": "mis"}, {"level": "sequence"}, {"cap": 1.5}):
        other, _ = rollout_correction_weights(TRAIN, SAMPLE, MASK, **kw)
        assert not torch.allclose(other, base), kw
    # Equal log-probs: every weight is 1 on the mask, nothing is capped, the difference is 0.
    same, metrics = rollout_correction_weights(TRAIN, TRAIN, MASK)
    assert torch.equal(same, MASK)
    assert metrics["sampling_logprob_diff"].item() == 0.0 and metrics["is_capped_frac"].item() == 0.0


def test_metrics_parts_with_the_batch_token_count_add_up():
    # tokens=5 (the batch's): row 0's share of mean |Delta| is 1.5 / 5 = 0.3, row 1's 1 / 5 = 0.2;
    # of is_weight (tis) (1.648721 + 0.367879 + 1) / 5 = 0.603320 and (1 + 2) / 5 = 0.6.
    whole = rollout_correction_weights(TRAIN, SAMPLE, MASK)[1]
    parts = [rollout_correction_weights(TRAIN[r], SAMPLE[r], MASK[r], tokens=5.0)[1] for r in ([0], [1])]
    assert [p["sampling_logprob_diff"].item() for p in parts] == pytest.approx([0.3, 0.2])
    assert [p["is_weight"].item() for p in parts] == pytest.approx([0.603320, 0.6], abs=1e-6)
    for key in whole:
        assert sum(p[key].item() for p in parts) == pytest.approx(whole[key].item(), abs=1e-6), key


def test_weights_feed_the_policy_loss():
    # ratio 1 (logprobs = old), no clipping: per-token loss -A; A = 1 everywhere, so the loss is
    # -(token mean of the weights) = -1.203320 (test_token_tis_by_hand's is_weight).
    weights, metrics = rollout_correction_weights(TRAIN, SAMPLE, MASK)
    logp = torch.where(MASK != 0, TRAIN, 0.0)
    loss, _ = ppo_policy_loss(logp, logp, torch.ones(2), MASK, clip_ratio=None, is_weights=weights)
    assert loss.item() == pytest.approx(-1.203320, abs=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="^mode") as err:
        rollout_correction_weights(TRAIN, SAMPLE, MASK, mode="is")
    assert all(name in str(err.value) for name in CORRECTION_MODES)
    with pytest.raises(ValueError, match="^level") as err:
        rollout_correction_weights(TRAIN, SAMPLE, MASK, level="segment")
    assert all(name in str(err.value) for name in CORRECTION_LEVELS)
    with pytest.raises(ValueError, match="^cap"):
        rollout_correction_weights(TRAIN, SAMPLE, MASK, cap=0.0)
    with pytest.raises(ValueError, match="^sampling_logprobs"):
        rollout_correction_weights(TRAIN, SAMPLE[:, :2], MASK)
    with pytest.raises(ValueError, match="^response_mask"):
        rollout_correction_weights(TRAIN, SAMPLE, MASK[:1])
    with pytest.raises(ValueError, match="^train_logprobs"):
        rollout_correction_weights(TRAIN[0], SAMPLE[0], MASK[0])


def test_bf16_sampling_vs_fp32_training_log_probs():
    # The mismatch the correction is for: the same tiny model's log-probs of the same tokens, once
    # under bf16 autocast (a fast sampler) and once in fp32 (the trainer), differ; truncated IS
    # then bounds every weight by the cap, and masked IS drops exactly the tokens above it.
    from rlhf_lab.models.backbones import build_tiny_model
    from rlhf_lab.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["12+7=19", "3+4=7", "25+17=42", "9+9=18"] * 4)
    torch.manual_seed(0)
    model = build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2).eval()
    ids = torch.randint(0, len(tokenizer), (4, 12), generator=torch.Generator().manual_seed(1))

    def token_logprobs(logits):
        logp = logits[:, :-1].float().log_softmax(dim=-1)
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    with torch.no_grad():
        train = token_logprobs(model(input_ids=ids).logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sample = token_logprobs(model(input_ids=ids).logits)
    mask = torch.ones_like(train)
    raw = torch.exp(train - sample)
    assert (raw > 1).any()  # some tokens the trainer finds likelier than the sampler did
    weights, metrics = rollout_correction_weights(train, sample, mask, mode="tis", cap=1.0)
    assert metrics["sampling_logprob_diff"].item() > 0
    assert (weights <= 1.0).all() and metrics["is_capped_frac"].item() == pytest.approx((raw > 1).float().mean().item())
    masked, _ = rollout_correction_weights(train, sample, mask, mode="mis", cap=1.0)
    assert torch.equal(masked == 0, raw > 1)
    # With the default cap (2) the bf16 mismatch is small enough that nothing is truncated.
    default, metrics = rollout_correction_weights(train, sample, mask)
    assert metrics["is_capped_frac"].item() == 0.0 and (default <= 2.0).all()
