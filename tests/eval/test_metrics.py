import math

import pytest
import torch
from rouge_score import rouge_scorer

from rlhf_lab.data.datasets import SFTDataset, pad_collate
from rlhf_lab.eval.metrics import (
    EvalResult,
    distinct_n,
    evaluate_policy,
    mean_response_length,
    mean_reward,
    perplexity,
    perplexity_from_nll,
    reward_model_accuracy,
    rouge,
    sequence_kl,
    win_rate,
)
from rlhf_lab.losses import lm_loss
from rlhf_lab.rewards import CallableSource

# ------------------------------------------------------------------------------ perplexity


def test_perplexity_is_exp_of_token_mean_nll():
    # Counted NLLs: 1.0, 2.0 (row 0) and 0.5 (row 1); the padding holds inf and junk.
    # mean = (1 + 2 + 0.5) / 3 = 3.5 / 3 = 1.1666...; perplexity = e^(3.5/3) = 3.2112...
    nll = torch.tensor([[1.0, 2.0, math.inf], [0.5, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = math.exp(3.5 / 3)
    assert perplexity_from_nll(nll, mask) == pytest.approx(expected, rel=1e-12)
    assert perplexity(3.5, 3) == pytest.approx(expected, rel=1e-12)
    assert perplexity(torch.tensor(3.5), torch.tensor(3)) == pytest.approx(expected, rel=1e-12)
    # The same number as the training loss reports.
    _, metrics = lm_loss(-nll.nan_to_num(posinf=0.0), mask)
    assert perplexity_from_nll(nll, mask) == pytest.approx(metrics["perplexity"].item(), rel=1e-6)


def test_perplexity_edge_cases():
    # No mask: every position. NLLs 0, ln 2 -> mean ln(2)/2 -> perplexity sqrt(2).
    assert perplexity_from_nll(torch.tensor([0.0, math.log(2.0)])) == pytest.approx(math.sqrt(2.0))
    assert perplexity(0.0, 0) == 1.0  # empty: mean NLL 0, as lm_loss
    assert perplexity_from_nll(torch.ones(2, 2), torch.zeros(2, 2)) == 1.0
    with pytest.raises(ValueError):
        perplexity(1.0, -1)


# ------------------------------------------------------------------------------ ROUGE

ROUGE_PAIRS = [  # (prediction, reference)
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("The cat, sat!", "the cat sat on the mat"),
    ("a quick brown fox jumps over the lazy dog", "the quick brown dog jumps over a lazy fox"),
    ("running runners ran quickly home", "the runner runs home quickly"),
    ("", "nothing was predicted here"),
]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score_package(use_stemmer):
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    per_pair = [scorer.score(ref, pred) for pred, ref in ROUGE_PAIRS]  # score(target, prediction)
    expected = {k: sum(s[k].fmeasure for s in per_pair) / len(per_pair) for k in keys}
    preds, refs = zip(*ROUGE_PAIRS, strict=True)
    got = rouge(list(preds), list(refs), keys=keys, use_stemmer=use_stemmer)
    assert set(got) == set(keys)
    for k in keys:
        assert got[k] == pytest.approx(expected[k], abs=1e-6)


def test_rouge_by_hand():
    # pred "the cat sat" vs ref "the cat sat on the mat":
    # rouge1: 3 hits, P = 3/3, R = 3/6 -> F = 2 * 1 * 0.5 / 1.5 = 2/3
    # rouge2: pred bigrams {the cat, cat sat} both in ref (5 bigrams): P = 1, R = 2/5 -> F = 0.8 / 1.4 = 4/7
    # rougeL: LCS = 3 -> same as rouge1, 2/3
    got = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert got["rouge1"] == pytest.approx(2 / 3, abs=1e-6)
    assert got["rouge2"] == pytest.approx(4 / 7, abs=1e-6)
    assert got["rougeL"] == pytest.approx(2 / 3, abs=1e-6)
    assert rouge(["x"], ["x"], keys=("rougeL",)) == {"rougeL": pytest.approx(1.0)}


def test_rouge_rejects_bad_input():
    with pytest.raises(ValueError, match="rougeLsum"):
        rouge(["a"], ["a"], keys=("rougeLsum",))
    with pytest.raises(ValueError, match="unknown"):
        rouge(["a"], ["a"], keys=("bleu",))
    with pytest.raises(ValueError):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        rouge([], [])


# ------------------------------------------------------------------------------ distinct-n


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: 4 + 3 = 7 in all, distinct {a, b, c} = 3 -> 3/7
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: (a b, b a, a b) + (a b, b c) = 5 in all, distinct {a b, b a, b c} = 3 -> 3/5
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # trigrams: (a b a, b a b) + (a b c) = 3, all distinct -> 1
    assert distinct_n(texts, 3) == pytest.approx(1.0)


def test_distinct_n_does_not_cross_texts_and_edge_cases():
    # Inside each text: bigram "a b" twice -> 1/2. Joining the texts would add "b a" -> 2/3.
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
    assert distinct_n(["a  b\n c"], 1) == pytest.approx(1.0)  # any whitespace splits
    assert distinct_n(["a", ""], 2) == 0.0  # no bigram at all
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


# ------------------------------------------------------------------------------ rollout metrics


def test_mean_response_length_by_hand():
    # Rows have 2, 1 and 4 response tokens -> (2 + 1 + 4) / 3 = 7/3
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    assert mean_response_length(mask) == pytest.approx(7 / 3)
    assert mean_response_length(mask.bool()) == pytest.approx(7 / 3)
    with pytest.raises(ValueError):
        mean_response_length(torch.ones(3))


def test_sequence_kl_by_hand():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -9.0], [0.0, -0.25, -math.inf, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    # row 0: (-1 - -1.5) + (-2 - -1) = 0.5 - 1 = -0.5 (k1 may be negative per sequence)
    # row 1: -0.5 - -0.25 = -0.25; the -inf sits on padding and is ignored
    # mean over sequences: (-0.5 - 0.25) / 2 = -0.375
    assert sequence_kl(logprobs, ref, mask) == pytest.approx(-0.375)
    # Same as the online stage's train/kl expression.
    stage = (logprobs - ref).nan_to_num(posinf=0.0, neginf=0.0).mul(mask).sum(1).mean()
    assert sequence_kl(logprobs, ref, mask) == pytest.approx(stage.item())
    with pytest.raises(ValueError):
        sequence_kl(logprobs, ref[:, :3], mask)


# ------------------------------------------------------------------------------ score metrics


def test_mean_reward():
    assert mean_reward([1.0, 2.0, 3.0, 6.0]) == pytest.approx(3.0)
    assert mean_reward(torch.tensor([0.5, -0.5])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        mean_reward([])
    with pytest.raises(ValueError):
        mean_reward(torch.ones(2, 2))


def test_reward_model_accuracy_by_hand():
    chosen = torch.tensor([1.0, 2.0, 3.0, 0.0])
    rejected = torch.tensor([0.0, 2.0, 4.0, -1.0])
    # win, tie (1/2), loss, win -> (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert reward_model_accuracy(chosen, rejected) == pytest.approx(0.625)
    # A constant model ties everywhere: chance, 0.5.
    assert reward_model_accuracy([0.0, 0.0], [0.0, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        reward_model_accuracy([1.0], [1.0, 2.0])


def test_win_rate_by_hand():
    # win, tie (1/2), tie (1/2) -> 2/3
    assert win_rate([0.3, 0.3, 0.9], [0.1, 0.3, 0.9]) == pytest.approx(2 / 3)
    # loss, loss, win -> 1/3
    assert win_rate(torch.tensor([0.0, 1.0, 5.0]), torch.tensor([1.0, 2.0, 4.0])) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ evaluate_policy


def _length_reward():
    return CallableSource(lambda prompts, completions: [float(len(c)) for c in completions])


def _prompt_length_gold():
    return CallableSource(lambda prompts, completions: [float(len(p)) for p in prompts])


def test_evaluate_policy_keys_and_exact_values(make_policy, task):
    prompts = task.eval_prompts()[:6]
    policy = make_policy(seed=0, reference="copy")
    result = evaluate_policy(policy, prompts, reward_fn=_length_reward(), gold_fn=_prompt_length_gold(),
                             max_new_tokens=5, batch_size=4, max_rows=None)
    assert isinstance(result, EvalResult)
    m = result.metrics
    assert set(m) == {"val/reward", "val/gold_reward", "val/kl", "val/distinct_1", "val/distinct_2",
                      "val/response_length"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    completions = [row["completion"] for row in result.samples]
    assert len(completions) == len(prompts)
    assert [row["prompt"] for row in result.samples] == prompts
    # reward = len(completion): val/reward is the mean length of the returned completions.
    assert m["val/reward"] == pytest.approx(sum(len(c) for c in completions) / len(completions))
    assert [row["reward"] for row in result.samples] == [float(len(c)) for c in completions]
    assert m["val/gold_reward"] == pytest.approx(sum(len(p) for p in prompts) / len(prompts))
    # The reference is an untouched copy: KL 0 up to incremental-vs-full forward rounding.
    assert m["val/kl"] == pytest.approx(0.0, abs=1e-4)
    assert 1.0 <= m["val/response_length"] <= 5.0
    assert m["val/distinct_1"] == pytest.approx(distinct_n(completions, 1))
    assert m["val/distinct_2"] == pytest.approx(distinct_n(completions, 2))
    # Greedy decoding matches policy.generate(greedy=True) in one batch.
    rollout = policy.generate(prompts, max_new_tokens=5, greedy=True)
    assert completions == rollout.completions
    assert m["val/response_length"] == pytest.approx(mean_response_length(rollout.response_mask))
    columns, data = result.table()
    assert columns == ["prompt", "completion", "reward", "gold_reward"]
    assert len(data) == len(prompts)


def test_evaluate_policy_kl_after_the_policy_moves(make_policy, task):
    prompts = task.eval_prompts()[:4]
    policy = make_policy(seed=0, reference="copy")
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    m = evaluate_policy(policy, prompts, max_new_tokens=4).metrics
    rollout = policy.generate(prompts, max_new_tokens=4, greedy=True)
    ref = policy.ref_logprobs(rollout.input_ids, rollout.attention_mask)
    assert m["val/kl"] == pytest.approx(sequence_kl(rollout.logprobs, ref, rollout.response_mask), abs=1e-5)
    assert abs(m["val/kl"]) > 1e-3
    assert "val/reward" not in m and "val/win_rate" not in m


def test_evaluate_policy_win_rate(make_policy, task):
    prompts = task.eval_prompts()[:6]
    policy = make_policy(seed=0)
    assert not policy.has_reference
    # Against an identical reference every pair ties: 0.5.
    same = evaluate_policy(policy, prompts, reward_fn=_length_reward(), reference=make_policy(seed=0),
                           max_new_tokens=5)
    assert "val/kl" not in same.metrics
    assert same.metrics["val/win_rate"] == pytest.approx(0.5)
    # Against another model, sampled (a tiny random model's greedy text is the same for every
    # prompt): the tie-half formula over the rows' own rewards.
    other = evaluate_policy(policy, prompts, reward_fn=_length_reward(), reference=make_policy(seed=1),
                            max_new_tokens=5, max_rows=None, greedy=False,
                            generator=torch.Generator().manual_seed(0))
    rows = other.samples
    assert any(r["reward"] != r["reference_reward"] for r in rows)  # not all ties: the check bites
    assert all(r["reference_reward"] == float(len(r["reference_completion"])) for r in rows)
    expected = sum((r["reward"] > r["reference_reward"]) + 0.5 * (r["reward"] == r["reference_reward"])
                   for r in rows) / len(rows)
    assert other.metrics["val/win_rate"] == pytest.approx(expected)
    assert 0.0 <= other.metrics["val/win_rate"] <= 1.0
    with pytest.raises(ValueError, match="reward_fn"):
        evaluate_policy(policy, prompts, reference=make_policy(seed=1))
    # Without a reward model the gold judge can decide the pairs: the same rows, scored by it.
    by_gold = evaluate_policy(policy, prompts, gold_fn=_length_reward(), win_judge=_length_reward(),
                              reference=make_policy(seed=1), max_new_tokens=5, max_rows=None, greedy=False,
                              generator=torch.Generator().manual_seed(0))
    assert "val/reward" not in by_gold.metrics
    assert by_gold.metrics["val/win_rate"] == pytest.approx(expected)
    assert [r["judge_score"] for r in by_gold.samples] == [r["reward"] for r in rows]
    gold = _length_reward()
    same_fn = evaluate_policy(policy, prompts, gold_fn=gold, win_judge=gold, reference=make_policy(seed=1),
                              max_new_tokens=5, max_rows=None, greedy=False,
                              generator=torch.Generator().manual_seed(0))
    assert [r["reference_gold_reward"] for r in same_fn.samples] == [r["reference_reward"] for r in rows]


def test_evaluate_policy_rouge_and_perplexity(make_policy, task):
    prompts = task.eval_prompts()[:5]
    policy = make_policy(seed=0)
    sampled = dict(max_new_tokens=5, greedy=False)  # varied text, reproducible with a seeded generator
    first = evaluate_policy(policy, prompts, generator=torch.Generator().manual_seed(0), max_rows=None,
                            **sampled)
    own = [r["completion"] for r in first.samples]
    references = ["5", "the answer is 3", own[2], own[3], "7 8 9"]
    result = evaluate_policy(policy, prompts, references=references, generator=torch.Generator().manual_seed(0),
                             max_rows=2, **sampled)
    assert [r["completion"] for r in result.samples] == own[:2]
    m = result.metrics
    for key in ("val/rouge1", "val/rouge2", "val/rougeL", "val/perplexity"):
        assert key in m
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(ref, pred) for pred, ref in zip(own, references, strict=True)]
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(s[key].fmeasure for s in scores) / len(scores)
        assert m[f"val/{key}"] == pytest.approx(expected, abs=1e-6)
        assert 0.0 <= m[f"val/{key}"] <= 1.0
    assert m["val/rouge1"] > 0.0  # rows 2 and 3 are scored against themselves
    # Perplexity of `reference + EOS` given the prompt, token-level: exp of lm_loss on one batch.
    data = SFTDataset([{"prompt": p, "completion": r} for p, r in zip(prompts, references, strict=True)],
                      policy.tokenizer)
    batch = pad_collate([data[i] for i in range(len(data))], policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = policy.logprobs(batch["input_ids"], batch["attention_mask"])
    _, lm = lm_loss(logp, batch["loss_mask"])
    assert m["val/perplexity"] == pytest.approx(lm["perplexity"].item(), rel=1e-5)
    assert m["val/perplexity"] > 1.0
    assert len(result.samples) == 2
    assert [r["reference"] for r in result.samples] == references[:2]
    with pytest.raises(ValueError):
        evaluate_policy(policy, prompts, references=references[:2])


def test_evaluate_policy_sampling_several_per_prompt(make_policy, task):
    prompts = task.eval_prompts()[:3]
    policy = make_policy(seed=0)
    kwargs = dict(reward_fn=_length_reward(), greedy=False, temperature=1.5, samples_per_prompt=2,
                  max_new_tokens=4, references=["1", "2", "3"], max_rows=None)
    result = evaluate_policy(policy, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(result.samples) == 6
    assert [r["prompt"] for r in result.samples] == [p for p in prompts for _ in range(2)]
    assert [r["reference"] for r in result.samples] == ["1", "1", "2", "2", "3", "3"]
    completions = [r["completion"] for r in result.samples]
    assert result.metrics["val/reward"] == pytest.approx(sum(map(len, completions)) / 6)
    again = evaluate_policy(policy, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert again.metrics == result.metrics  # seeded sampling is reproducible
    with pytest.raises(ValueError):
        evaluate_policy(policy, [])
