import re

import pytest

from rlhf_lab.tasks import TASKS, get_task
from rlhf_lab.tasks.arithmetic import (
    ArithmeticTask,
    answer,
    gold_reward,
    is_correct,
    parse_completion,
    problems,
    prompt,
)


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask()


def test_problems_are_all_200_single_digit_pairs():
    ps = problems()
    assert len(ps) == len(set(ps)) == 200
    assert {op for _, op, _ in ps} == {"+", "-"}
    assert all(0 <= a <= 9 and 0 <= b <= 9 for a, _, b in ps)


def test_prompt_format_is_exact():
    assert prompt(2, "+", 3) == "Q: 2+3=\nA:"
    assert prompt(3, "-", 7) == "Q: 3-7=\nA:"


@pytest.mark.parametrize(
    "a, op, b, expected",
    [
        (2, "+", 3, " 5"),
        (3, "-", 7, " -4"),
        (9, "+", 9, " 18"),
        (0, "-", 0, " 0"),
        (9, "-", 0, " 9"),
    ],
)
def test_answers_by_hand(a, op, b, expected):
    assert answer(a, op, b) == expected


def test_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op"):
        answer(1, "*", 2)


P = "Q: 2+3=\nA:"


@pytest.mark.parametrize(
    "completion, reward",
    [
        (" 5", 1.0),
        ("5", 1.0),
        (" 5\nQ: 1+1=\nA: 2", 1.0),  # did not stop: the run-on is ignored
        (" 5 apples", 1.0),
        (" 5<|endoftext|>", 1.0),
        ("\n5", 1.0),
        (" +5", 1.0),
        (" 6", 0.0),
        (" -5", 0.0),
        ("", 0.0),
        ("   \n ", 0.0),
        (" banana", 0.0),
        (" 5apples", 0.0),
        (" 5.", 0.0),
        (" five", 0.0),
        (" six\n5", 0.0),  # only the first line counts
    ],
)
def test_gold_judge(completion, reward):
    assert gold_reward([P], [completion]) == [reward]
    assert is_correct(P, completion) is bool(reward)


def test_gold_judge_negative_and_two_digit_answers():
    assert gold_reward(["Q: 3-7=\nA:", "Q: 9+9=\nA:"], [" -4", " 18"]) == [1.0, 1.0]
    assert gold_reward(["Q: 3-7=\nA:", "Q: 9+9=\nA:"], [" 4", " 1"]) == [0.0, 0.0]


def test_gold_judge_rejects_underscored_and_non_ascii_digits():
    # int() would accept both.
    assert parse_completion(" 1_8") is None
    assert parse_completion(" \u0665") is None  # ARABIC-INDIC DIGIT FIVE


def test_gold_judge_reads_the_last_problem_of_a_few_shot_prompt():
    few_shot = "Q: 1+1=\nA: 2\n" + P
    assert gold_reward([few_shot], [" 5"]) == [1.0]
    assert gold_reward([few_shot], [" 2"]) == [0.0]


def test_gold_judge_raises_on_unparseable_prompt():
    with pytest.raises(ValueError, match="What is two plus three"):
        gold_reward(["What is two plus three?"], [" 5"])


def test_gold_judge_raises_on_length_mismatch():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        gold_reward([P, P], [" 5"])


def test_gold_answers_score_one_and_shifted_answers_mostly_zero(task):
    prompts, answers = task.eval_prompts(), task.eval_answers()
    assert gold_reward(prompts, answers) == [1.0] * 200
    shifted = answers[1:] + answers[:1]
    assert sum(gold_reward(prompts, shifted)) < 50


def test_sft_split_is_disjoint_covers_all_and_is_deterministic(task):
    train, val = task.sft_pairs(seed=0)
    assert (len(train), len(val)) == (160, 40)
    train_p = {d["prompt"] for d in train}
    val_p = {d["prompt"] for d in val}
    assert not train_p & val_p
    assert train_p | val_p == set(task.eval_prompts())
    assert task.sft_pairs(seed=0) == (train, val)
    assert task.sft_pairs(seed=1) != (train, val)


def test_sft_completions_are_the_bare_answers(task):
    train, val = task.sft_pairs()
    for d in train + val:
        assert set(d) == {"prompt", "completion"}
        assert gold_reward([d["prompt"]], [d["completion"]]) == [1.0]
        assert (
            d["completion"] == d["completion"].rstrip() and "<|endoftext|>" not in d["completion"]
        )


def test_val_fraction_changes_the_split():
    train, val = ArithmeticTask(val_fraction=0.5).sft_pairs()
    assert (len(train), len(val)) == (100, 100)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_val_fraction_must_leave_both_splits_non_empty(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        ArithmeticTask(val_fraction=fraction)


def _facts_in(corpus):
    """(a, op, b) of every equation, word sentence and Q/A pair in the corpus."""
    words = "zero one two three four five six seven eight nine".split()
    found = set()
    for doc in corpus:
        for a, op, b in re.findall(r"(\d)([+-])(\d)=", doc):
            found.add((int(a), op, int(b)))
        m = re.match(r"(\w+) (plus|minus) (\w+) is ", doc)
        if m:
            found.add((words.index(m[1]), "+" if m[2] == "plus" else "-", words.index(m[3])))
    return found


def test_corpus_is_deterministic_and_has_every_form(task):
    corpus = task.pretrain_corpus(seed=0)
    assert len(corpus) == 2000 and all(corpus)
    assert corpus == task.pretrain_corpus(seed=0)
    assert corpus != task.pretrain_corpus(seed=1)
    assert any(re.fullmatch(r"\d[+-]\d=-?\d+", d) for d in corpus)
    assert any(" plus " in d for d in corpus) and any(" minus " in d for d in corpus)
    assert any(d.startswith("Q: ") and "\nA: " in d for d in corpus)
    assert len(task.pretrain_corpus(n_lines=7)) == 7


def test_corpus_teaches_every_fact_but_qa_format_only_for_train(task):
    train, val = task.split(seed=0)
    corpus = task.pretrain_corpus(seed=0)
    qa = [d for d in corpus if d.startswith("Q: ")]
    assert _facts_in(qa) == set(train)
    assert not _facts_in(qa) & set(val)
    equations = [d for d in corpus if not d.startswith("Q: ")]
    assert _facts_in(equations) == set(train) | set(val)


def test_corpus_facts_are_true(task):
    for doc in task.pretrain_corpus():
        for a, op, b, r in re.findall(r"(\d)([+-])(\d)=(?:\nA: )?(-?\d+)", doc):
            assert answer(int(a), op, int(b)) == f" {r}"


def test_rl_prompts_are_all_prompts_shuffled_by_seed(task):
    rl = task.rl_prompts(seed=0)
    assert sorted(rl) == sorted(task.eval_prompts())
    assert rl == task.rl_prompts(seed=0)
    assert rl != task.rl_prompts(seed=1)
    assert rl != task.eval_prompts()


def test_eval_prompts_and_answers_are_fixed_and_aligned(task):
    assert task.eval_prompts() == [prompt(*p) for p in problems()]
    assert task.eval_answers() == [answer(*p) for p in problems()]


def test_tokenizer_texts_contain_every_prompt_and_answer(task):
    texts = set(task.tokenizer_texts())
    assert set(task.eval_prompts()) <= texts
    assert set(task.eval_answers()) <= texts


def test_registry():
    from rlhf_lab.tasks.alice import AliceTask

    assert TASKS == {"arithmetic": ArithmeticTask, "alice": AliceTask}
    assert get_task("arithmetic").name == "arithmetic"
    assert get_task("arithmetic", val_fraction=0.5).val_fraction == 0.5
    with pytest.raises(ValueError, match=r"^unknown task 'x'; choose from: alice, arithmetic$"):
        get_task("x")
