import math

import pytest
import torch
from rouge_score import rouge_scorer

from rlhf_lab.data.datasets import SFTDataset, pad_collate
from rlhf_lab.eval.metrics import (
    EvalResult,
    distinct_n,
    evaluate_policy,
    gold_accuracy,
    greedy_completions,
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
from rlhf_lab.models.backbones import build_tiny_model
from rlhf_lab.policy import Policy
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
    # k3 per token, r = ref - logp, k3 = e^r - r - 1:
    # row 0: r = -0.5 -> e^-0.5 + 0.5 - 1 = 0.1065307; r = 1 -> e - 2 = 0.7182818; sum 0.8248125
    # row 1: r = 0.25 -> e^0.25 - 1.25 = 0.0340254; the -inf sits on padding and is ignored
    # mean over sequences: (0.8248125 + 0.0340254) / 2 = 0.4294190
    k3_row0 = (math.exp(-0.5) + 0.5 - 1) + (math.exp(1.0) - 1 - 1)
    k3_row1 = math.exp(0.25) - 0.25 - 1
    assert sequence_kl(logprobs, ref, mask) == pytest.approx((k3_row0 + k3_row1) / 2, rel=1e-12)
    assert sequence_kl(logprobs, ref, mask) == pytest.approx(0.4294190, abs=1e-7)
    # k1 on the same tokens: row 0: 0.5 - 1 = -0.5, row 1: -0.25 -> mean -0.375 (negative; k3 is not).
    assert sequence_kl(logprobs, ref, mask, estimator="k1") == pytest.approx(-0.375)
    # k1 is the online stage's train/kl expression.
    stage = (logprobs - ref).nan_to_num(posinf=0.0, neginf=0.0).mul(mask).sum(1).mean()
    assert sequence_kl(logprobs, ref, mask, estimator="k1") == pytest.approx(stage.item())
    # A reference equal to the policy: exactly 0.
    assert sequence_kl(logprobs, logprobs.clone(), mask) == 0.0
    with pytest.raises(ValueError):
        sequence_kl(logprobs, ref[:, :3], mask)
    with pytest.raises(ValueError, match="estimator"):
        sequence_kl(logprobs, ref, mask, estimator="k4")


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
    # The reference is an untouched copy: both sides go through the same forward pass, so KL is 0.
    assert m["val/kl"] == 0.0
    assert m["val/distinct_1"] == pytest.approx(distinct_n(completions, 1))
    assert m["val/distinct_2"] == pytest.approx(distinct_n(completions, 2))
    # Greedy decoding matches policy.generate(greedy=True) in one batch.
    rollout = policy.generate(prompts, max_new_tokens=5, greedy=True)
    assert completions == rollout.completions
    assert m["val/response_length"] == pytest.approx(mean_response_length(rollout.response_mask))
    columns, data = result.table()
    assert columns == ["prompt", "completion", "reward", "gold_reward"]
    assert len(data) == len(prompts)


def _flattened(make_policy):
    """A policy at temperature 2 of its own reference: ln_f halved halves GPT-2's (bias-free) logits.

    Same argmax, flatter distribution: every greedy token has a lower log-prob under the policy
    than under the reference, so k1 on greedy tokens is negative although KL > 0.
    """
    policy = make_policy(seed=0, reference="copy")
    with torch.no_grad():
        policy.model.transformer.ln_f.weight.mul_(0.5)
        policy.model.transformer.ln_f.bias.mul_(0.5)
    return policy


def _k(policy, rollout, estimator="k3"):
    logp = policy.logprobs(rollout.input_ids, rollout.attention_mask)
    ref = policy.ref_logprobs(rollout.input_ids, rollout.attention_mask)
    return sequence_kl(logp, ref, rollout.response_mask, estimator=estimator)


def test_val_kl_is_k3_on_temperature_one_samples_when_evaluation_is_greedy(make_policy, task):
    prompts = task.eval_prompts()[:6]
    policy = _flattened(make_policy)
    policy.eval()
    greedy = policy.generate(prompts, max_new_tokens=4, greedy=True)
    greedy_k1 = _k(policy, greedy, "k1")
    assert greedy_k1 < -1e-3  # what the old val/kl reported for this policy
    m = evaluate_policy(policy, prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0)).metrics
    # Greedy decoding draws nothing, so the KL batch is the generator's first draw, at temperature 1.
    sampled = policy.generate(prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert m["val/kl"] == pytest.approx(_k(policy, sampled), rel=1e-9)
    assert m["val/kl"] > 1e-3
    assert "val/reward" not in m and "val/win_rate" not in m


def test_val_kl_reuses_samples_only_when_they_come_from_the_policy_itself(make_policy, task):
    prompts = task.eval_prompts()[:4]
    policy = _flattened(make_policy)
    policy.eval()
    kw = dict(max_new_tokens=4, greedy=False, samples_per_prompt=2)
    # Temperature 1, no top-p: the evaluation's own samples.
    m = evaluate_policy(policy, prompts, generator=torch.Generator().manual_seed(3), **kw).metrics
    own = policy.generate(prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert m["val/kl"] == pytest.approx(_k(policy, own), rel=1e-9)
    # Temperature 1.5: the completions are drawn at 1.5, then one more batch at 1 for the KL.
    hot = evaluate_policy(policy, prompts, temperature=1.5, generator=torch.Generator().manual_seed(3),
                          max_rows=None, **kw)
    gen = torch.Generator().manual_seed(3)
    first = policy.generate(prompts, temperature=1.5, generator=gen, **kw)
    second = policy.generate(prompts, generator=gen, **kw)
    assert [r["completion"] for r in hot.samples] == first.completions
    assert hot.metrics["val/kl"] == pytest.approx(_k(policy, second), rel=1e-9)
    assert hot.metrics["val/kl"] != pytest.approx(_k(policy, first), rel=1e-6)


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
    assert "val/perplexity" not in m  # that name is the LM stages' validation-set perplexity
    assert m["val/references_truncated"] == 0.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(ref, pred) for pred, ref in zip(own, references, strict=True)]
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(s[key].fmeasure for s in scores) / len(scores)
        assert m[f"val/{key}"] == pytest.approx(expected, abs=1e-6)
    assert m["val/rouge1"] > 0.0  # rows 2 and 3 are scored against themselves
    # Perplexity of `reference + EOS` given the prompt, token-level: exp of lm_loss on one batch.
    data = SFTDataset([{"prompt": p, "completion": r} for p, r in zip(prompts, references, strict=True)],
                      policy.tokenizer)
    batch = pad_collate([data[i] for i in range(len(data))], policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = policy.logprobs(batch["input_ids"], batch["attention_mask"])
    _, lm = lm_loss(logp, batch["loss_mask"])
    assert m["val/reference_perplexity"] == pytest.approx(lm["perplexity"].item(), rel=1e-5)
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


def _reference_ppl_by_hand(policy, prompts, references, keep=None):
    """exp of the token-mean NLL of `reference + EOS`, each row cut to its last `keep` tokens."""
    tok = policy.tokenizer
    nll, count = 0.0, 0
    for p, r in zip(prompts, references, strict=True):
        prompt = tok(p, add_special_tokens=False)["input_ids"]
        target = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, is_target = prompt + target, [0] * len(prompt) + [1] * len(target)
        if keep is not None:
            ids, is_target = ids[-keep:], is_target[-keep:]
        with torch.no_grad():
            logp = policy.logprobs(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        for t in range(1, len(ids)):  # position 0 has no context
            if is_target[t]:
                nll -= float(logp[t])
                count += 1
    return math.exp(nll / count), count


def test_reference_perplexity_counts_every_reference_token(make_policy, task):
    # References far longer than max_new_tokens are scored whole: the generation length plays no part.
    prompts = task.eval_prompts()[:3]
    references = ["1 2 3 4 5 6 7 8 9", "the answer is 3 and not 4", "12"]
    policy = make_policy(seed=0)
    expected, count = _reference_ppl_by_hand(policy, prompts, references)
    assert count > 3 * 2  # more tokens than max_new_tokens allows per row
    m = evaluate_policy(policy, prompts, references=references, max_new_tokens=2, batch_size=2).metrics
    assert m["val/reference_perplexity"] == pytest.approx(expected, rel=1e-6)
    assert m["val/references_truncated"] == 0.0


def test_reference_rows_longer_than_the_limit_are_cut_counted_and_warned(make_policy, task):
    prompts = task.eval_prompts()[:3]
    references = ["1 2 3 4 5 6 7 8 9", "the answer is 3 and not 4", "2"]
    policy = make_policy(seed=0)
    tok = policy.tokenizer
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) + len(tok(r, add_special_tokens=False)["input_ids"])
               + 1 for p, r in zip(prompts, references, strict=True)]  # prompt + reference + EOS
    keep = 20
    # Rows of 28 and 33 tokens are cut (the second one's reference, 23 tokens, loses its start too);
    # the row of 12 is whole.
    assert lengths == [28, 33, 12]
    n_long = 2
    expected, _ = _reference_ppl_by_hand(policy, prompts, references, keep=keep)
    with pytest.warns(UserWarning, match=f"{n_long} of 3 prompt \\+ reference rows exceed {keep} tokens"):
        m = evaluate_policy(policy, prompts, references=references, max_new_tokens=2, max_length=keep).metrics
    assert m["val/references_truncated"] == float(n_long)
    assert m["val/reference_perplexity"] == pytest.approx(expected, rel=1e-6)
    # Without max_length the limit is the model's position table: the same cut for a 20-position model.
    torch.manual_seed(0)
    short = Policy(build_tiny_model("gpt2-tiny", tok, n_layer=1, n_embd=32, n_head=2, n_positions=keep), tok)
    expected, _ = _reference_ppl_by_hand(short, prompts, references, keep=keep)
    with pytest.warns(UserWarning, match=f"{n_long} of 3 prompt \\+ reference rows exceed {keep} tokens"):
        m = evaluate_policy(short, prompts, references=references, max_new_tokens=2).metrics
    assert m["val/references_truncated"] == float(n_long)
    assert m["val/reference_perplexity"] == pytest.approx(expected, rel=1e-6)


def test_gold_accuracy_is_the_mean_gold_score_of_greedy_completions(make_policy, task):
    prompts = task.eval_prompts()[:5]
    policy = make_policy(seed=0)
    completions = greedy_completions(policy, prompts, max_new_tokens=3, batch_size=2)
    assert completions == policy.generate(prompts, max_new_tokens=3, greedy=True).completions

    def judge(ps, cs):  # a tensor-valued judge: prompt length + completion length
        return torch.tensor([len(p) + len(c) for p, c in zip(ps, cs, strict=True)], dtype=torch.float32)

    expected = sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True)) / len(prompts)
    assert gold_accuracy(policy, prompts, judge, max_new_tokens=3) == pytest.approx(expected)
