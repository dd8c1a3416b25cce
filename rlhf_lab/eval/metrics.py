"""Evaluation metrics, as pure functions, and `evaluate_policy` that reports them under `val/` names.

The metric functions take tensors, lists or strings and return Python floats (or a dict of
floats); none touches Lightning, a model or a file. `evaluate_policy` generates on a fixed prompt
set and returns the `val/` metrics of DESIGN.md that apply, plus sample rows for a table.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.text import rouge_score as _tm_rouge_score

from rlhf_lab.checks import check_ndim, check_same_shape
from rlhf_lab.data.datasets import SFTDataset, pad_collate
from rlhf_lab.losses.kl import kl_penalty
from rlhf_lab.losses.masked import masked_sum
from rlhf_lab.policy import Policy
from rlhf_lab.rewards.checks import check_scores

__all__ = [
    "perplexity",
    "perplexity_from_nll",
    "rouge",
    "distinct_n",
    "mean_response_length",
    "reward_model_accuracy",
    "win_rate",
    "sequence_kl",
    "mean_reward",
    "EvalResult",
    "evaluate_policy",
    "greedy_completions",
    "gold_accuracy",
]

RewardFn = Callable[[list[str], list[str]], "torch.Tensor | Sequence[float]"]


def _as_1d(name: str, x: torch.Tensor | Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else x, dtype=torch.float64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per sequence), got shape {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------------- perplexity
def perplexity(nll_sum: float | torch.Tensor, n_tokens: int | float | torch.Tensor) -> float:
    """Perplexity from a summed negative log-likelihood and the number of tokens it covers.

    Formula: ppl = exp(nll_sum / n_tokens) = exp(-1/N sum_i log p(y_i | y_<i)), the exponential of
        the token-level mean NLL (in nats). N = 0 gives 1 (the empty mean is 0, as in `lm_loss`).
        Sums and counts add up across batches, so accumulate them and call this once at the end;
        averaging per-batch perplexities (or per-batch means of unequal size) is not the same.
    Reference: Jelinek et al. 1977, "Perplexity - a measure of the difficulty of speech
    recognition tasks".
    """
    nll_sum, n_tokens = float(nll_sum), float(n_tokens)
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return 1.0
    return math.exp(nll_sum / n_tokens)


def perplexity_from_nll(nll: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Perplexity from per-token NLLs (−log p), counting the positions selected by ``mask``.

    Formula: ppl = exp(sum_{b,t} m_{b,t} nll_{b,t} / sum_{b,t} m_{b,t}) (token-level mean, so a
        long sequence weighs more than a short one); no mask counts every position.
    Reference: Jelinek et al. 1977 (see `perplexity`).

    Shape: nll any shape, e.g. (B, T); mask the same shape (0/1 or bool). Padding may hold inf.
    """
    nll = nll.detach()
    if mask is None:
        mask = torch.ones_like(nll)
    check_same_shape("nll", nll, mask=mask)
    return perplexity(masked_sum(nll.double(), mask), mask.to(torch.float64).sum())


# ---------------------------------------------------------------------------------- text overlap
def rouge(predictions: Sequence[str], references: Sequence[str],
          keys: Sequence[str] = ("rouge1", "rouge2", "rougeL"), use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE F-measure of each prediction against its one reference, for each key.

    Formula: per pair, with lowercased alphanumeric tokens, ROUGE-n precision P = hits / #pred
        n-grams and recall R = hits / #ref n-grams (hits = clipped n-gram overlap); ROUGE-L uses
        the longest common subsequence length for hits and token counts for the denominators;
        F = 2PR / (P + R) (0 when P + R = 0, e.g. an empty prediction). Returned: the mean F over
        the pairs, one number per key ("rouge1".."rouge9", "rougeL").
    Reference: Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries".

    Computed by torchmetrics' `rouge_score`, which for these keys reproduces Google's
    `rouge-score` package (`rouge_scorer.RougeScorer(keys).score(reference, prediction)`):
    the same tokenizer (lowercase, non-[a-z0-9] to spaces, the same nltk Porter stemmer when
    `use_stemmer`) and the same formulas; the tests check the two agree to 1e-6. For these keys
    torchmetrics needs no extra dependency (nltk only for the stemmer). "rougeLsum" is refused:
    torchmetrics splits its sentences with nltk's punkt model, a download this offline setup does
    not have, and rouge-score splits on newlines instead, so the two would disagree.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge needs at least one prediction/reference pair")
    keys = tuple(keys)
    for key in keys:
        if key == "rougeLsum":
            raise ValueError("rougeLsum is not supported (torchmetrics needs nltk's punkt download for it); "
                             "use rouge1..rouge9 or rougeL")
        if key != "rougeL" and not (len(key) == 6 and key.startswith("rouge") and key[5] in "123456789"):
            raise ValueError(f"unknown ROUGE key {key!r}; expected one of rouge1..rouge9, rougeL")
    scores = _tm_rouge_score(list(predictions), list(references), accumulate="best",
                             use_stemmer=use_stemmer, rouge_keys=keys)
    return {key: float(scores[f"{key}_fmeasure"]) for key in keys}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: the number of distinct n-grams over the set divided by the total number of n-grams.

    Formula: distinct_n = |U_i set(ngrams_n(t_i))| / sum_i |ngrams_n(t_i)|, with whitespace tokens
        and n-grams taken inside each text (none spans two texts). 0 when there is no n-gram at all
        (every text shorter than n tokens). 1 means no n-gram repeats anywhere in the set.
    Reference: Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
    Models" (NAACL).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.split()
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


# ---------------------------------------------------------------------------------- rollouts
def mean_response_length(response_mask: torch.Tensor) -> float:
    """Mean number of generated tokens per sequence (EOS included, padding not).

    Formula: (1/B) sum_b sum_t m_{b,t}.
    Reference: none (the `train/response_length` of every online stage).

    Shape: response_mask (B, T), 0/1 or bool.
    """
    check_ndim("response_mask", response_mask, 2, "(B, T)")
    if response_mask.shape[0] == 0:
        raise ValueError("mean_response_length needs at least one sequence")
    return float(response_mask.detach().to(torch.float64).sum(dim=1).mean())


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                estimator: str = "k3") -> float:
    """KL(pi || pi_ref) per sequence: a per-token estimate summed over the sampled tokens, averaged.

    Formula: KL = (1/B) sum_b sum_t m_{b,t} k(x_{b,t}), on tokens x sampled from pi, with k the
        per-token estimator named by `estimator` (`rlhf_lab.losses.kl.KL_ESTIMATORS`). The default
        k3 = exp(r) - r - 1 with r = log pi_ref(x) - log pi(x) is >= 0 for every token (e^r >= 1 + r)
        and, since E_pi[e^r] = 1, has the same expectation as k1 = -r: at each position t, given
        the tokens before it, both are unbiased for KL(pi(.|x_<t) || pi_ref(.|x_<t)), and the sum of
        those over t is the sequence-level KL (chain rule). So a per-sequence sum is >= 0 by
        construction and unbiased, where k1 (the `train/kl` of the online stages) is unbiased too
        but can come out negative on a finite batch, and is meaningless on greedy (not sampled)
        tokens. `val/kl` is this function with k3 on temperature-1 samples.
    Reference: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    (k1, k3); Ziegler et al. 2019 (the per-sequence KL to the reference).

    Shape: logprobs, ref_logprobs, mask (B, T) (mask: the response tokens). Returns a float.
    """
    check_ndim("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if logprobs.shape[0] == 0:
        raise ValueError("sequence_kl needs at least one sequence")
    per_token = kl_penalty(logprobs.detach().double(), ref_logprobs.detach().double(), estimator)
    return float(masked_sum(per_token, mask, dim=1).mean())


# ---------------------------------------------------------------------------------- scores
def mean_reward(scores: torch.Tensor | Sequence[float]) -> float:
    """Mean score per sequence.

    Formula: (1/B) sum_b r_b.
    Reference: none (`train/reward`, `val/reward`, `val/gold_reward`).

    Shape: scores (B,).
    """
    s = _as_1d("scores", scores)
    if s.numel() == 0:
        raise ValueError("mean_reward needs at least one score")
    return float(s.mean())


def _pairwise_wins(name_a: str, a: torch.Tensor | Sequence[float],
                   name_b: str, b: torch.Tensor | Sequence[float]) -> float:
    a, b = _as_1d(name_a, a), _as_1d(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has {a.numel()} scores but {name_b} has {b.numel()}")
    if a.numel() == 0:
        raise ValueError("needs at least one pair")
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def reward_model_accuracy(chosen_scores: torch.Tensor | Sequence[float],
                          rejected_scores: torch.Tensor | Sequence[float]) -> float:
    """Fraction of preference pairs the reward model ranks the right way round; a tie counts half.

    Formula: acc = (1/B) sum_b (1[r_c,b > r_r,b] + 1/2 1[r_c,b = r_r,b]). Ties count half so that
        a constant (uninformative) model scores 0.5, chance, not 0 (as with a strict ">") or 1.
    Reference: Stiennon et al. 2020, "Learning to summarize from human feedback" (reward-model
    validation accuracy); Ouyang et al. 2022.

    Shape: chosen_scores (B,), rejected_scores (B,).
    """
    return _pairwise_wins("chosen_scores", chosen_scores, "rejected_scores", rejected_scores)


def win_rate(policy_scores: torch.Tensor | Sequence[float],
             reference_scores: torch.Tensor | Sequence[float]) -> float:
    """Fraction of prompts on which the policy's completion beats the reference's; a tie counts half.

    Formula: win = (1/B) sum_b (1[s_pi,b > s_ref,b] + 1/2 1[s_pi,b = s_ref,b]), with s the judge's
        scores of the two completions of prompt b. Ties count half, so a policy equal to its
        reference has win rate 0.5.
    Reference: Stiennon et al. 2020 and Rafailov et al. 2023 (DPO), win rate against a baseline.

    Shape: policy_scores (B,), reference_scores (B,).
    """
    return _pairwise_wins("policy_scores", policy_scores, "reference_scores", reference_scores)


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    """What `evaluate_policy` returns: `metrics` (`val/...` name -> float) and `samples` (table rows)."""

    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list]]:
        """`(columns, data)` of the samples, e.g. for `WandbLogger.log_table(key, columns, data)`."""
        columns = list(self.samples[0]) if self.samples else []
        return columns, [[row[c] for c in columns] for row in self.samples]


def _scores(fn: RewardFn, prompts: list[str], completions: list[str], what: str = "reward") -> torch.Tensor:
    """`fn`'s scores, checked (one finite score per row, else a `RewardError`), as float64 on the CPU."""
    return check_scores(fn(prompts, completions), len(completions), fn, prompts, device="cpu",
                        dtype=torch.float64, what=what)


@contextlib.contextmanager
def _model_in_eval(policy: Policy) -> Iterator[None]:
    """Run the block with the policy's model in eval mode (no dropout), then restore its flag.

    Only the model: a frozen reference copy stays in eval whatever the policy's mode.
    """
    was_training = policy.model.training
    policy.model.eval()
    try:
        yield
    finally:
        policy.model.train(was_training)


def _position_limit(policy: Policy, max_length: int | None) -> int | None:
    """The longest row the model can score: `max_length` capped by its position table (None: no cap)."""
    limits = [n for n in (max_length, getattr(policy.model.config, "max_position_embeddings", None)) if n]
    return min(limits) if limits else None


@torch.no_grad()
def _reference_nll(policy: Policy, prompts: list[str], references: list[str],
                   batch_size: int, max_length: int | None) -> tuple[float, float, int]:
    """Summed NLL (nats), token count and number of cut rows of `reference + EOS` given each prompt.

    Rows are scored whole, teacher-forced. Only a row longer than the model can take (see
    `_position_limit`) is cut, to its last `limit` tokens: the start of the prompt goes first,
    and a reference that alone exceeds the limit also loses its first tokens. Those are counted.
    """
    # sys.maxsize: SFTDataset cuts (and warns about) nothing; the rows are cut here, counted.
    data = SFTDataset([{"prompt": p, "completion": r} for p, r in zip(prompts, references, strict=True)],
                      policy.tokenizer, sys.maxsize)
    limit = _position_limit(policy, max_length)
    items, n_cut = [], 0
    for i in range(len(data)):
        item = data[i]
        if limit is not None and item["input_ids"].shape[0] > limit:
            item = {key: value[-limit:] for key, value in item.items()}
            n_cut += 1
        items.append(item)
    pad = policy.tokenizer.pad_token_id
    nll_sum, n_tokens = 0.0, 0.0
    with _model_in_eval(policy):
        for start in range(0, len(items), batch_size):
            batch = pad_collate(items[start:start + batch_size], pad)
            ids, attn = batch["input_ids"].to(policy.device), batch["attention_mask"].to(policy.device)
            logp = policy.logprobs(ids, attn).double()  # (B, T)
            mask = batch["loss_mask"].to(logp.device).clone()
            mask[:, 0] = 0  # column 0 has no context (a cut row may start inside the reference)
            nll_sum += float(masked_sum(-logp, mask))
            n_tokens += float(mask.sum())
    return nll_sum, n_tokens, n_cut


@torch.no_grad()
def _per_sequence_kl(policy: Policy, rollout) -> torch.Tensor:
    """k3 KL(pi || pi_ref) summed over each row's response tokens (see `sequence_kl`). Shape: (B,).

    The policy's log-probs are recomputed teacher-forced (not the ones recorded while sampling
    with the KV cache) so that both sides go through the same full forward pass: a reference
    equal to the policy then gives exactly 0, not the rounding gap between the two paths.
    """
    with _model_in_eval(policy):
        logp = policy.logprobs(rollout.input_ids, rollout.attention_mask).double()
    ref = policy.ref_logprobs(rollout.input_ids, rollout.attention_mask).double()
    per_token = kl_penalty(logp, ref, "k3")
    return masked_sum(per_token, rollout.response_mask.to(per_token.device), dim=1).cpu()


@torch.no_grad()
def evaluate_policy(
    policy: Policy,
    prompts: list[str],
    reward_fn: RewardFn | None = None,
    gold_fn: RewardFn | None = None,
    reference: Policy | None = None,
    max_new_tokens: int = 16,
    references: list[str] | None = None,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    samples_per_prompt: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    max_rows: int | None = 16,
    max_length: int | None = None,
    win_judge: RewardFn | None = None,
) -> EvalResult:
    """Generate on a fixed prompt set and compute the `val/` metrics that apply.

    Keys of `EvalResult.metrics` (each present only when its inputs are):
      - `val/response_length` (`mean_response_length`), `val/distinct_1`, `val/distinct_2`
        (`distinct_n` over all completions): always.
      - `val/reward`: `mean_reward` of `reward_fn` scores; `val/gold_reward`: the same for `gold_fn`.
      - `val/kl`: `sequence_kl` (k3, >= 0 by construction) against the policy's own reference
        (`policy.has_reference`), always on responses *sampled from the policy at temperature 1*
        (no top-p): the evaluation's own responses when it samples them that way, else (greedy
        decoding, another temperature or top-p) one extra sampled batch of `samples_per_prompt`
        responses per prompt, drawn with `generator` (the global RNG when None).
      - `val/win_rate`: `win_rate` of the policy's completion against `reference`'s completion of
        the same prompt (same decoding settings; greedy by default), both judged by `win_judge`
        (default `reward_fn`; e.g. `gold_fn` when there is no reward model).
        `reference` is an explicit Policy (e.g. the SFT checkpoint) because `Policy.generate`
        always samples from the policy itself; its own reference is only reachable for log-probs.
      - when `references` (one target text per prompt) are given: `val/rouge1`, `val/rouge2`,
        `val/rougeL` (`rouge`, completion vs the prompt's reference), `val/reference_perplexity`
        (`perplexity` of `reference + EOS` given the prompt, teacher-forced, token-level over the
        whole set, every reference token counted; not `val/perplexity`, which is the LM stages'
        perplexity of their validation set) and `val/references_truncated`: how many
        `prompt + reference` rows were longer than `max_length` tokens (None: the model's position
        limit; no limit if it has none) and kept only their last tokens (a `UserWarning` says so,
        once per message as Python's warnings do).
    `EvalResult.samples` holds the first `max_rows` rows (None: all) as dicts with `prompt`,
    `completion` and, where available, `reward`, `gold_reward`, `reference` (the target text),
    `reference_completion`, and the reference completion's score under the win-rate judge
    (`reference_reward` or `reference_gold_reward` when the judge is `reward_fn` or `gold_fn`; else
    `judge_score` and `reference_judge_score`).

    Prompts go through `policy.generate` in batches of `batch_size`; with `samples_per_prompt > 1`
    each prompt gets that many adjacent rows (the reference as many), all counted in the means.
    """
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"got {len(references)} references for {len(prompts)} prompts")
    win_judge = win_judge or reward_fn
    if reference is not None and win_judge is None:
        raise ValueError("val/win_rate judges the two completions with win_judge (default reward_fn); "
                         "pass one of them with reference")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                    samples_per_prompt=samples_per_prompt, generator=generator)
    # val/kl is an expectation under pi itself: reuse the responses only if they were drawn from it.
    kl_on_own_samples = not greedy and temperature == 1.0 and top_p == 1.0
    rows_prompts: list[str] = []
    completions: list[str] = []
    ref_completions: list[str] = []
    lengths: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        rollout = policy.generate(batch, **sampling)
        rows_prompts.extend(rollout.prompts)
        completions.extend(rollout.completions)
        lengths.append(rollout.response_mask.sum(dim=1).double().cpu())
        if policy.has_reference:
            kl_rollout = rollout if kl_on_own_samples else policy.generate(
                batch, max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, generator=generator)
            kls.append(_per_sequence_kl(policy, kl_rollout))
        if reference is not None:
            ref_completions.extend(reference.generate(batch, **sampling).completions)

    metrics: dict[str, float] = {}
    columns: dict[str, list] = {"prompt": rows_prompts, "completion": completions}
    if reward_fn is not None:
        rewards = _scores(reward_fn, rows_prompts, completions)
        metrics["val/reward"] = mean_reward(rewards)
        columns["reward"] = rewards.tolist()
    if gold_fn is not None:
        gold = _scores(gold_fn, rows_prompts, completions, what="gold reward")
        metrics["val/gold_reward"] = mean_reward(gold)
        columns["gold_reward"] = gold.tolist()
    if kls:
        metrics["val/kl"] = float(torch.cat(kls).mean())
    if reference is not None:
        # The policy's scores under the judge are already in hand when it is reward_fn or gold_fn.
        if win_judge is reward_fn:
            name, scores = "reward", rewards
        elif win_judge is gold_fn:
            name, scores = "gold_reward", gold
        else:
            name, scores = "judge_score", _scores(win_judge, rows_prompts, completions)
            columns[name] = scores.tolist()
        ref_scores = _scores(win_judge, rows_prompts, ref_completions)
        metrics["val/win_rate"] = win_rate(scores, ref_scores)
        columns["reference_completion"] = ref_completions
        columns[f"reference_{name}"] = ref_scores.tolist()
    metrics["val/distinct_1"] = distinct_n(completions, 1)
    metrics["val/distinct_2"] = distinct_n(completions, 2)
    metrics["val/response_length"] = float(torch.cat(lengths).mean())
    if references is not None:
        targets = [r for r in references for _ in range(samples_per_prompt)]
        for key, value in rouge(completions, targets).items():
            metrics[f"val/{key}"] = value
        nll_sum, n_tokens, n_cut = _reference_nll(policy, prompts, references, batch_size, max_length)
        metrics["val/reference_perplexity"] = perplexity(nll_sum, n_tokens)
        metrics["val/references_truncated"] = float(n_cut)
        if n_cut:
            # stacklevel 3: the caller of evaluate_policy, past torch.no_grad's wrapper.
            warnings.warn(f"evaluate_policy: {n_cut} of {len(references)} prompt + reference rows exceed "
                          f"{_position_limit(policy, max_length)} tokens and keep only their last ones for "
                          f"val/reference_perplexity (counted in val/references_truncated)", stacklevel=3)
        columns["reference"] = targets

    n_rows = len(completions) if max_rows is None else min(max_rows, len(completions))
    samples = [{name: values[i] for name, values in columns.items()} for i in range(n_rows)]
    return EvalResult(metrics=metrics, samples=samples)


# ---------------------------------------------------------------------------------- greedy gold
@torch.no_grad()
def greedy_completions(policy: Policy, prompts: list[str], max_new_tokens: int = 8,
                       batch_size: int = 256) -> list[str]:
    """Greedy (temperature-0) completions of `prompts`, in order."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rollout = policy.generate(prompts[start:start + batch_size], max_new_tokens=max_new_tokens, greedy=True)
        out.extend(rollout.completions)
    return out


def gold_accuracy(policy: Policy, prompts: list[str], judge: RewardFn, max_new_tokens: int = 8,
                  batch_size: int = 256) -> float:
    """Mean gold score of greedy completions (for a 0/1 judge: the fraction answered correctly).

    Formula: (1/N) sum_i judge(p_i, greedy(p_i)); `val/greedy_gold_reward` of `EvalCallback`.
    Reference: none (the demo's and the comparison's headline number).
    """
    completions = greedy_completions(policy, prompts, max_new_tokens, batch_size)
    return mean_reward(_scores(judge, list(prompts), completions))
