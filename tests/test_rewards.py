import pytest
import torch

from rlhf_lab.rewards import CallableSource, RewardModelSource


def test_callable_source_returns_float_tensor(task):
    source = CallableSource(task.gold_reward)
    out = source(["Q: 2+3=\nA:", "Q: 2+3=\nA:"], [" 5", " 6"])
    assert out.dtype == torch.float and out.tolist() == [1.0, 0.0]


def test_reward_model_source_scores_text_at_the_last_token(make_policy, tokenizer):
    rm = make_policy(scalar_head=True)
    source = RewardModelSource(rm, batch_size=2)
    prompts, completions = ["Q: 2+3=\nA:"] * 3, [" 5", " 6", " 77"]
    scores = source(prompts, completions)
    # The same as scoring prompt + completion + EOS directly, one row at a time.
    for p, c, s in zip(prompts, completions, scores, strict=True):
        ids = torch.tensor([tokenizer(p + c)["input_ids"] + [tokenizer.eos_token_id]])
        torch.testing.assert_close(rm.scores(ids, torch.ones_like(ids)), s.view(1), atol=1e-5, rtol=0)


def test_normalize_gives_zero_mean_unit_std_and_critic_matches(make_policy, task):
    rm = make_policy(scalar_head=True)
    prompts = task.eval_prompts()[:12]
    completions = [f" {i}" for i in range(12)]
    source = RewardModelSource(rm).normalize(prompts, completions)
    scores = source(prompts, completions)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-5)
    # The critic copy reads normalised scores and is trainable, independent of the reward model.
    critic = source.as_critic()
    data = [rm.tokenizer(p + c)["input_ids"] + [rm.tokenizer.eos_token_id] for p, c in zip(prompts, completions, strict=True)]
    ids = torch.tensor([data[0]])
    torch.testing.assert_close(critic.scores(ids, torch.ones_like(ids)), scores[:1], atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in critic.parameters())
    assert not any(p.requires_grad for p in rm.parameters())
    assert critic.scalar_head.weight.data_ptr() != rm.scalar_head.weight.data_ptr()


def test_reward_model_source_needs_a_head(make_policy):
    with pytest.raises(ValueError, match="scalar head"):
        RewardModelSource(make_policy())


def test_weighted_sum_adds_weighted_scores():
    from rlhf_lab.rewards import WeightedSum

    length = CallableSource(lambda p, c: [float(len(x)) for x in c])  # 2 and 4 characters

    def is_five(prompts, completions):  # a plain function returning a list
        return [1.0 if c.strip() == "5" else 0.0 for c in completions]

    reward = WeightedSum((0.5, length), (2.0, is_five))
    # " 5": 0.5·2 + 2·1 = 3.0; " 6 6": 0.5·4 + 2·0 = 2.0
    assert reward(["q", "q"], [" 5", " 6 6"]).tolist() == [3.0, 2.0]
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum()
    with pytest.raises(ValueError, match="pair"):
        WeightedSum((length, 1.0))


def test_a_stage_without_rows_fails_clearly(make_policy):
    from rlhf_lab.stages import RewardModel

    with pytest.raises(ValueError, match="got 0 rows"):
        RewardModel(make_policy(scalar_head=True), [])
