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


# --------------------------------------------------------------------------- check_scores: rewards checked where they enter

PROMPTS = [f"Q: {i % 9}+3=\nA:" for i in range(32)]


def _judge_returning(values):
    def my_judge(prompts, completions):
        return values

    return my_judge


def test_check_scores_refuses_nan_naming_the_row_and_prompt():
    from rlhf_lab.rewards import RewardError, check_scores

    values = [1.0] * 32
    values[3] = values[7] = float("nan")
    judge = _judge_returning(values)
    with pytest.raises(RewardError) as info:
        check_scores(judge(PROMPTS, []), 32, judge, PROMPTS)
    assert str(info.value) == ("reward my_judge returned nan for row 3 (prompt 'Q: 3+3=\\nA:'); "
                               "2 of 32 scores are not finite")


def test_check_scores_refuses_inf_and_names_a_callable_source_by_its_function():
    from rlhf_lab.rewards import RewardError, check_scores

    def judge(prompts, completions):
        return [0.0] * 31 + [float("-inf")]

    source = CallableSource(lambda p, c: judge(p, c))
    with pytest.raises(RewardError, match=r"^reward <lambda> at test_rewards.py:\d+ returned -inf for row 31 \(prompt 'Q: 4\+3=\\nA:'\); "
                       r"1 of 32 scores are not finite$"):
        source(PROMPTS, [""] * 32)  # CallableSource checks what its function returns
    with pytest.raises(RewardError, match=r"^gold reward judge returned inf for row 0; 32 of 32 scores"):
        check_scores(torch.full((32,), float("inf")), 32, judge, what="gold reward")


def test_check_scores_refuses_a_wrong_count():
    from rlhf_lab.rewards import RewardError, check_scores

    judge = _judge_returning([0.5] * 31)
    with pytest.raises(RewardError) as info:
        check_scores(judge(PROMPTS, []), 32, judge, PROMPTS)
    assert str(info.value) == "reward my_judge returned 31 scores for 32 rows"


def test_check_scores_refuses_a_2d_tensor_and_a_scalar():
    from rlhf_lab.rewards import RewardError, RewardModelSource, check_scores

    with pytest.raises(RewardError) as info:
        check_scores(torch.zeros(32, 1), 32, "RewardModelSource")
    assert str(info.value) == ("reward RewardModelSource returned shape (32, 1) for 32 rows; expected one score "
                               "per row, shape (32,)")
    with pytest.raises(RewardError, match=r"returned shape \(\) for 2 rows"):
        check_scores(torch.tensor(1.0), 2, RewardModelSource)
    with pytest.raises(RewardError, match=r"reward my_judge returned list, not a tensor or list of numbers"):
        def my_judge(p, c):
            return ["good", "bad"]

        check_scores(my_judge([], []), 2, my_judge)


def test_check_scores_converts_lists_and_numpy_and_moves_to_the_device():
    import numpy as np

    from rlhf_lab.rewards import check_scores, reward_name

    out = check_scores([1, 0, True], 3, "judge")
    assert out.dtype == torch.float and out.tolist() == [1.0, 0.0, 1.0]
    out = check_scores(np.array([0.25, 0.5]), 2, "judge", device="cpu", dtype=torch.float64)
    assert out.dtype == torch.float64 and out.device.type == "cpu" and out.tolist() == [0.25, 0.5]
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not check_scores(scores, 2, "judge").requires_grad  # detached: a reward is a constant
    # Readable names: a bound method, a CallableSource's function, a partial, a callable object.
    import functools

    judge = Judge()
    assert reward_name(judge.score) == "Judge.score"
    assert reward_name(CallableSource(judge.score)) == "Judge.score"
    assert reward_name(functools.partial(_judge_returning, 1)) == "_judge_returning"
    assert reward_name(judge) == "Judge"


class Judge:
    def score(self, prompts, completions):
        return [0.0] * len(completions)

    __call__ = score


def test_online_rl_refuses_a_nan_reward_before_any_update(make_policy, task):
    from rlhf_lab.rewards import RewardError
    from rlhf_lab.stages import OnlineRL, OnlineRLConfig

    def flaky(prompts, completions):
        return [float("nan") if i == 2 else 1.0 for i in range(len(completions))]

    config = OnlineRLConfig(baseline="batch_mean", prompts_per_step=4, max_new_tokens=2)
    stage = OnlineRL(make_policy(reference="copy"), task.rl_prompts()[:4], flaky, config)
    with pytest.raises(RewardError, match=r"^reward flaky returned nan for row 2 \(prompt 'Q: "):
        stage.make_rollout(task.rl_prompts()[:4])
    gold = OnlineRL(make_policy(reference="copy"), task.rl_prompts()[:4], CallableSource(task.gold_reward), config,
                    gold_fn=lambda p, c: [0.0] * (len(c) - 1))
    with pytest.raises(RewardError, match=r"^gold reward <lambda> at test_rewards.py:\d+ returned 3 scores for 4 rows$"):
        gold.make_rollout(task.rl_prompts()[:4])


def test_online_dpo_and_evaluation_check_their_rewards(make_policy, task):
    from rlhf_lab.eval import evaluate_policy
    from rlhf_lab.rewards import RewardError
    from rlhf_lab.stages import DPOConfig, OnlineDPO

    def short(prompts, completions):
        return [1.0] * (len(completions) - 1)

    stage = OnlineDPO(make_policy(reference="copy"), task.rl_prompts()[:4], short, DPOConfig(max_new_tokens=2))
    with pytest.raises(RewardError, match=r"^reward short returned 7 scores for 8 rows$"):
        stage.make_pairs(task.rl_prompts()[:4])
    with pytest.raises(RewardError, match=r"^gold reward short returned 3 scores for 4 rows$"):
        evaluate_policy(make_policy(), task.eval_prompts()[:4], gold_fn=short, max_new_tokens=2)


def test_normalize_refuses_nan_scores_and_a_single_sample(make_policy, task):
    from rlhf_lab.rewards import RewardError

    rm = make_policy(scalar_head=True)
    with pytest.raises(RewardError, match="normalize needs at least 2 samples"):
        RewardModelSource(rm).normalize(["q"], ["a"])
    with torch.no_grad():
        rm.scalar_head.bias.fill_(float("nan"))
    with pytest.raises(RewardError, match=r"^reward RewardModelSource returned nan for row 0 \(prompt 'Q: "):
        RewardModelSource(rm).normalize(task.eval_prompts()[:4], [" 1"] * 4)


def test_weighted_sum_names_the_term_that_failed():
    from rlhf_lab.rewards import RewardError, WeightedSum

    def broken(prompts, completions):
        return [float("nan")] * len(completions)

    reward = WeightedSum((1.0, CallableSource(lambda p, c: [1.0] * len(c))), (0.5, broken))
    with pytest.raises(RewardError, match=r"^reward broken returned nan for row 0 \(prompt 'q'\)"):
        reward(["q", "q"], ["a", "b"])
