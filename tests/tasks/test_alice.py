import inspect
import re

import pytest

from rlhf_lab.data.datasets import SFTDataset
from rlhf_lab.models.tokenizer import train_bpe_tokenizer
from rlhf_lab.tasks import TASKS, get_task
from rlhf_lab.tasks.alice import (
    CHARACTERS,
    AliceTask,
    Fact,
    answer,
    characters_named,
    fact_for_prompt,
    facts,
    gold_reward,
    keyword_coverage,
    prompt,
    score,
)
from rlhf_lab.tasks.arithmetic import ArithmeticTask


@pytest.fixture(scope="module")
def task():
    return AliceTask()


@pytest.fixture(scope="module")
def alice_tokenizer(task):
    return train_bpe_tokenizer(task.tokenizer_texts())


HOST = "Q: Who hosts the mad tea party?\nA:"  # keywords: hatter; allowed: Mad Hatter
TABLE = "Q: Who sits at the tea table with the Hatter?\nA:"  # keywords: hare, dormouse
RABBIT = "Q: Who does Alice follow down the rabbit hole?\nA:"  # keywords: white, rabbit
BOTTLE = "Q: What words are on the little bottle?\nA:"  # keyword: the phrase "drink me"


def _fact(question: str) -> Fact:
    return next(f for f in facts() if f.question == question)


# ---------------------------------------------------------------- the fact set


def test_fact_set_is_well_formed():
    fs = facts()
    assert 30 <= len(fs) <= 50 and len(fs) == 43
    assert len({f.question for f in fs}) == len(fs)
    for f in fs:
        assert f.character in CHARACTERS
        assert f.keywords and all(k == k.lower() and k.strip() == k for k in f.keywords)
        assert 2 <= len(f.answer.split()) <= 6, f.answer
        assert "\n" not in f.question and "\n" not in f.answer
        assert len(set(f.statements)) == 3
        # Every paraphrase states the fact: it mentions all the key words.
        for s in f.statements:
            assert keyword_coverage(f, s) == 1.0, (f.question, s)


def test_prompt_and_answer_format_is_exact():
    f = _fact("Who hosts the mad tea party?")
    assert prompt(f) == HOST
    assert answer(f) == " the Mad Hatter"


def test_characters_named_by_whole_words_only():
    assert characters_named("the March Hare and the Dormouse") == {"March Hare", "Dormouse"}
    # "mouse" is not inside "dormouse", "hare" not inside "share", "king" not inside "asking".
    assert characters_named("they share a dormouse while asking") == {"Dormouse"}
    # Two aliases of one character name it once.
    assert characters_named("Bill the Lizard") == {"Bill the Lizard"}
    assert characters_named("THE QUEEN") == {"Queen of Hearts"}


# ---------------------------------------------------------------- the judge


def test_canonical_answers_score_one_for_every_fact(task):
    assert gold_reward(task.eval_prompts(), task.eval_answers()) == [1.0] * 43


def test_no_other_facts_answer_scores_one():
    fs = facts()
    for i, f in enumerate(fs):
        for j, g in enumerate(fs):
            if i != j:
                assert score(f, answer(g)) < 1.0, (f.question, g.answer)


@pytest.mark.parametrize(
    "p, completion, reward",
    [
        # score = max(0, coverage - 0.5 * mixups - 0.5 * [fewer than 2 words])
        (HOST, " the Mad Hatter", 1.0),  # 1/1 key words, no mix-up, 3 words
        (HOST, " THE MAD HATTER", 1.0),  # case-insensitive
        (HOST, " the Hatter's", 1.0),  # "hatter" then an apostrophe is still the whole word
        (HOST, " the Mad Hatter<|endoftext|> and Alice", 1.0),  # text after EOS is ignored
        (HOST, " the Hatter\nQ: Who is the judge at the trial?\nA: the King", 1.0),  # run-on
        (HOST, " the Hatters", 0.0),  # not the word "hatter": 0 - 0 - 0
        (HOST, " the Chatter", 0.0),  # "hatter" inside a longer word does not count
        # Half-right: one of two key words.
        (TABLE, " the March Hare", 0.5),  # 1/2; the Hatter is in the question, no mix-up
        (TABLE, " the Dormouse", 0.5),  # 1/2
        (TABLE, " the Hatter and the Dormouse", 0.5),  # 1/2; naming the Hatter is allowed
        (RABBIT, " the Rabbit", 0.5),  # "rabbit" yes, "white" no: 1/2
        # Mixed-up characters: 0.5 off per character the question is not about.
        (HOST, " the Mad Hatter and the Queen", 0.5),  # 1 - 0.5 * 1
        (HOST, " the Hatter and Bill the Lizard", 0.5),  # 1 - 0.5 * 1 (two aliases, one name)
        (TABLE, " the March Hare, the Dormouse and the Queen", 0.5),  # 2/2 - 0.5 * 1
        (HOST, " the Hatter, the Queen and Alice", 0.0),  # 1 - 0.5 * 2
        (HOST, " the Queen of Hearts", 0.0),  # max(0, 0 - 0.5 * 1)
        (TABLE, " the Hare and the Mouse", 0.0),  # 1/2 - 0.5 * 1 (the Mouse is not the Dormouse)
        # Too short: 0.5 off below 2 words.
        (HOST, " Hatter", 0.5),  # 1 - 0.5
        (TABLE, " Dormouse", 0.0),  # 1/2 - 0.5
        (HOST, " Queen", 0.0),  # max(0, 0 - 0.5 - 0.5)
        (HOST, "", 0.0),  # max(0, 0 - 0.5)
        (HOST, "  \n ", 0.0),
        # A key phrase matches as whole words, apart by spaces or a hyphen.
        (BOTTLE, " drink me", 1.0),
        (BOTTLE, " Drink-me!", 1.0),  # "drink", "me": 2 words
        (BOTTLE, " drinkme", 0.0),  # no phrase, and 1 word: max(0, 0 - 0.5)
        (BOTTLE, " drink it", 0.0),
    ],
)
def test_gold_judge_by_hand(p, completion, reward):
    assert gold_reward([p], [completion]) == [reward]


def test_gold_judge_reads_the_last_question_of_a_few_shot_prompt():
    few_shot = "Q: Who runs the caucus race?\nA: the Dodo\n" + HOST
    assert gold_reward([few_shot], [" the Mad Hatter"]) == [1.0]
    assert gold_reward([few_shot], [" the Dodo"]) == [0.0]  # max(0, 0 - 0.5): the Dodo is mixed up


@pytest.mark.parametrize(
    "bad",
    [
        "Q: Who is Humpty Dumpty?\nA:",
        "Who hosts the mad tea party?",  # not in the prompt format
        "Q: Who runs the caucus race?\nA: the Dodo\nQ: Who is the White Queen?\nA:",
    ],
)
def test_unknown_prompt_raises_naming_the_prompt(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        gold_reward([bad], [" the Mad Hatter"])
    with pytest.raises(ValueError, match="not one of the alice task's questions"):
        fact_for_prompt(bad)


def test_gold_judge_raises_on_length_mismatch():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        gold_reward([HOST, HOST], [" the Mad Hatter"])


# ---------------------------------------------------------------- splits and data


def test_split_is_disjoint_covers_all_and_is_deterministic(task):
    train, val = task.split(seed=0)
    assert (len(train), len(val)) == (34, 9)  # round(43 * 0.2) = 9 held out
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(facts())
    assert task.split(seed=0) == (train, val)
    assert task.split(seed=1) != (train, val)
    assert AliceTask().split(seed=3) == task.split(seed=3)


def test_sft_pairs_follow_the_split_and_are_bare_answers(task):
    train, val = task.sft_pairs(seed=0)
    ftrain, fval = task.split(seed=0)
    assert [d["prompt"] for d in train] == [prompt(f) for f in ftrain]
    assert [d["prompt"] for d in val] == [prompt(f) for f in fval]
    assert task.sft_pairs(seed=0) == (train, val)
    assert task.sft_pairs(seed=1) != (train, val)
    for d in train + val:
        assert set(d) == {"prompt", "completion"}
        assert d["prompt"].startswith("Q: ") and d["prompt"].endswith("?\nA:")
        c = d["completion"]
        assert c.startswith(" ") and not c.startswith("  ") and c == c.rstrip()
        assert "<|endoftext|>" not in c
        assert gold_reward([d["prompt"]], [c]) == [1.0]


def test_sft_dataset_appends_exactly_one_eos(task, alice_tokenizer):
    train, _ = task.sft_pairs()
    ds = SFTDataset(train[:5], alice_tokenizer)
    eos = alice_tokenizer.eos_token_id
    for item in ds.items:
        ids = item["input_ids"].tolist()
        assert ids[-1] == eos and ids.count(eos) == 1


def test_val_fraction_changes_the_split():
    train, val = AliceTask(val_fraction=0.5).split()
    assert (len(train), len(val)) == (21, 22)  # round(21.5) = 22 (banker's rounding)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_val_fraction_must_leave_both_splits_non_empty(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        AliceTask(val_fraction=fraction)


_QA_RE = re.compile(r"Q: ([^\n]*)\nA: ([^\n]*)")


def test_corpus_is_deterministic_and_sized(task):
    corpus = task.pretrain_corpus(seed=0)
    assert len(corpus) == 2000 and all(corpus)
    assert corpus == task.pretrain_corpus(seed=0)
    assert corpus != task.pretrain_corpus(seed=1)
    assert len(task.pretrain_corpus(n_lines=7)) == 7
    with pytest.raises(ValueError, match="n_lines"):
        task.pretrain_corpus(n_lines=0)


def test_corpus_states_every_fact_but_qa_format_only_for_train(task):
    train, val = task.split(seed=0)
    corpus = task.pretrain_corpus(seed=0)
    qa = [d for d in corpus if d.startswith("Q: ")]
    prose = [d for d in corpus if not d.startswith("Q: ")]
    assert len(qa) == 666  # every third line: i % 3 == 2 for i < 2000
    by_question = {f.question: f for f in facts()}
    seen = set()
    for doc in qa:
        pairs = _QA_RE.findall(doc)
        assert 1 <= len(pairs) <= 3 and doc.count("Q: ") == len(pairs)
        for q, a in pairs:
            f = by_question[q]
            assert a == f.answer  # the chains state true facts
            seen.add(f)
    assert seen == set(train)
    assert not seen & set(val)
    # Every paraphrase of every fact appears, so every fact's key words are in the prose.
    assert set(prose) == {s for f in facts() for s in f.statements}
    for f in facts():
        assert any(keyword_coverage(f, d) == 1.0 for d in prose), f.question
    for d in prose:
        assert "Q:" not in d and "A:" not in d


def test_short_corpus_still_states_every_paraphrase(task):
    # 194 lines: 130 prose lines, at least the 43 * 3 = 129 paraphrases, each used once first.
    prose = [d for d in task.pretrain_corpus(n_lines=194) if not d.startswith("Q: ")]
    assert set(prose) == {s for f in facts() for s in f.statements}


def test_rl_prompts_include_questions_outside_sft_train(task):
    train, val = task.sft_pairs(seed=0)
    rl = task.rl_prompts(seed=0)
    assert sorted(rl) == sorted(task.eval_prompts())
    outside = set(rl) - {d["prompt"] for d in train}
    assert outside == {d["prompt"] for d in val} and len(outside) == 9
    assert rl == task.rl_prompts(seed=0)
    assert rl != task.rl_prompts(seed=1)
    assert rl != task.eval_prompts()


def test_eval_prompts_and_answers_are_fixed_and_aligned(task):
    assert task.eval_prompts() == [prompt(f) for f in facts()]
    assert task.eval_answers() == [answer(f) for f in facts()]
    for p, a in zip(task.eval_prompts(), task.eval_answers(), strict=True):
        assert fact_for_prompt(p).answer == a[1:]


def test_tokenizer_texts_contain_every_prompt_and_answer(task):
    texts = set(task.tokenizer_texts())
    assert set(task.eval_prompts()) <= texts
    assert set(task.eval_answers()) <= texts


def test_tokenizer_round_trips_every_prompt_and_answer(task, alice_tokenizer):
    tok = alice_tokenizer
    statements = [s for f in facts() for s in f.statements]
    full = [p + a for p, a in zip(task.eval_prompts(), task.eval_answers(), strict=True)]
    for text in full + task.eval_prompts() + task.eval_answers() + statements:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


# ---------------------------------------------------------------- interface and registry


@pytest.mark.parametrize(
    "method",
    ["split", "sft_pairs", "pretrain_corpus", "rl_prompts", "eval_prompts", "eval_answers",
     "gold_reward", "tokenizer_texts"],
)
def test_same_interface_as_arithmetic(method):
    assert inspect.signature(getattr(AliceTask, method)).parameters.keys() == inspect.signature(
        getattr(ArithmeticTask, method)).parameters.keys()
    for name, param in inspect.signature(getattr(ArithmeticTask, method)).parameters.items():
        assert inspect.signature(getattr(AliceTask, method)).parameters[name].default == (
            param.default)


def test_registry():
    assert TASKS["alice"] is AliceTask
    assert TASKS["arithmetic"] is ArithmeticTask
    task = get_task("alice")
    assert isinstance(task, AliceTask) and task.name == "alice"
    assert get_task("alice", val_fraction=0.5).val_fraction == 0.5
    with pytest.raises(ValueError, match=r"choose from: alice, arithmetic$"):
        get_task("x")
