"""The built-in `arithmetic` task: "Q: 2+3=\\nA:" -> " 5".

Single-digit sums and differences: a, b in 0..9 and op in "+", "-" (ASCII), so 200 problems whose
answers run from -9 to 18. Everything a tiny end-to-end run needs is generated here,
deterministically from a seed: a pretraining corpus, SFT pairs, RL and eval prompts, the text to
train a tokenizer from, and the gold judge.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "ArithmeticTask",
    "answer",
    "gold_reward",
    "is_correct",
    "parse_completion",
    "parse_prompt",
    "problems",
    "prompt",
    "result",
]

OPS = ("+", "-")
EOS_TEXT = "<|endoftext|>"

# The last "Q: a op b =" in the prompt, so a few-shot prefix before it does not confuse the judge.
# re.ASCII keeps \d to 0-9 (no other scripts' digits).
_PROBLEM_RE = re.compile(r"Q:\s*(\d+)\s*([+-])\s*(\d+)\s*=", re.ASCII)
# Not int(): it also accepts "1_8" and non-ASCII digits, which no answer is written as.
_INT_RE = re.compile(r"[+-]?[0-9]+")

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen"
).split()
_OP_WORDS = {"+": "plus", "-": "minus"}


def problems() -> list[tuple[int, str, int]]:
    """All 200 problems `(a, op, b)`, in a fixed order (op, then a, then b)."""
    return [(a, op, b) for op in OPS for a in range(10) for b in range(10)]


def result(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def prompt(a: int, op: str, b: int) -> str:
    return f"Q: {a}{op}{b}=\nA:"


def answer(a: int, op: str, b: int) -> str:
    """The gold completion: a space, then the result (" 5", " -4", " 18"); no EOS."""
    return f" {result(a, op, b)}"


def parse_prompt(text: str) -> tuple[int, str, int]:
    """The `(a, op, b)` of the last "Q: a op b=" in `text`; ValueError if there is none."""
    matches = _PROBLEM_RE.findall(text)
    if not matches:
        raise ValueError(f"cannot parse an arithmetic problem from prompt {text!r}")
    a, op, b = matches[-1]
    return int(a), op, int(b)


def parse_completion(completion: str) -> int | None:
    """The integer a completion answers with, or None.

    Text from an EOS marker or the first newline on is ignored (a model that did not stop runs on
    into the next "Q:"); of the rest, the first whitespace-separated token must be an integer.
    """
    text = completion.split(EOS_TEXT, 1)[0].strip()
    tokens = text.split("\n", 1)[0].split()
    if not tokens or not _INT_RE.fullmatch(tokens[0]):
        return None
    return int(tokens[0])


def is_correct(prompt: str, completion: str) -> bool:
    """Whether `completion` answers the problem in `prompt` with the right integer."""
    return parse_completion(completion) == result(*parse_prompt(prompt))


def gold_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for each completion that answers its prompt correctly, else 0.0."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    return [float(is_correct(p, c)) for p, c in zip(prompts, completions, strict=True)]


def _words(n: int) -> str:
    return f"minus {_NUMBER_WORDS[-n]}" if n < 0 else _NUMBER_WORDS[n]


@dataclass
class ArithmeticTask:
    """Single-digit arithmetic with a gold judge; every split is a pure function of a seed.

    Stages see the problems this way: pretraining sees every fact as an equation and in words but
    only the SFT-train problems in the Q/A format, SFT trains on the same problems and validates
    on the held-out ones, and RL and eval use all 200 prompts, so the held-out problems are what
    RL can still gain on.
    """

    name: ClassVar[str] = "arithmetic"
    max_new_tokens: ClassVar[int] = 6
    """Response length limit that fits every answer (" -8" and EOS with room to spare)."""
    vocab_size: ClassVar[int] = 512
    """BPE vocabulary size a tokenizer trained on `tokenizer_texts()` should use."""

    val_fraction: float = 0.2
    """Share of the 200 problems held out of pretraining and SFT training (SFT's val split)."""

    def __post_init__(self) -> None:
        n_val = self._n_val()
        if not 1 <= n_val < len(problems()):
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves {n_val} of {len(problems())} problems "
                "for validation; both splits must be non-empty"
            )

    def _n_val(self) -> int:
        return round(len(problems()) * self.val_fraction)

    # Stages hold a task object and call these on it; the module functions stay usable without one.
    problems = staticmethod(problems)
    prompt = staticmethod(prompt)
    answer = staticmethod(answer)
    gold_reward = staticmethod(gold_reward)
    is_correct = staticmethod(is_correct)

    def split(self, seed: int = 0) -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
        """(train, val) problems from a seeded shuffle; disjoint, together all 200."""
        shuffled = problems()
        random.Random(seed).shuffle(shuffled)
        n_val = self._n_val()
        return shuffled[n_val:], shuffled[:n_val]

    def sft_pairs(self, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(train, val) lists of {"prompt", "completion"}; the data pipeline appends EOS."""
        train, val = self.split(seed)

        def pairs(ps: list[tuple[int, str, int]]) -> list[dict[str, str]]:
            return [{"prompt": prompt(*p), "completion": answer(*p)} for p in ps]

        return pairs(train), pairs(val)

    def pretrain_corpus(self, seed: int = 0, n_lines: int = 2000) -> list[str]:
        """`n_lines` short documents for LM pretraining.

        Three surface forms, in turn: equations ("2+3=5") and words ("two plus three is five",
        "three minus seven is minus four") over all 200 problems, and Q/A chains of one to three
        problems in the exact prompt format ("Q: 2+3=\\nA: 5\\nQ: 4-1=\\nA: 3") over the
        SFT-train problems of `seed` only. So pretraining teaches every fact, but the val problems
        are never seen in the Q/A format: SFT's val accuracy measures transfer of a known fact to
        a new format, and RL (prompted with all 200) still has answers to gain, while a reward
        model started from these weights can know the facts it must judge. The chains also teach
        the model to run on into the next "Q:", which SFT (answer then EOS) fixes. Documents may
        contain newlines; join them with "\\n" or EOS.
        """
        if n_lines < 1:
            raise ValueError(f"n_lines must be at least 1, got {n_lines}")
        rng = random.Random(seed)
        facts = self.split(seed)[0]
        every = problems()
        lines = []
        for i in range(n_lines):
            form = i % 3
            if form == 0:
                a, op, b = rng.choice(every)
                lines.append(f"{a}{op}{b}={result(a, op, b)}")
            elif form == 1:
                a, op, b = rng.choice(every)
                lines.append(
                    f"{_words(a)} {_OP_WORDS[op]} {_words(b)} is {_words(result(a, op, b))}"
                )
            else:
                chain = [rng.choice(facts) for _ in range(rng.randint(1, 3))]
                lines.append("\n".join(prompt(*p) + answer(*p) for p in chain))
        rng.shuffle(lines)
        return lines

    def rl_prompts(self, seed: int = 0) -> list[str]:
        """All 200 prompts in a seeded order."""
        prompts = [prompt(*p) for p in problems()]
        random.Random(seed).shuffle(prompts)
        return prompts

    def eval_prompts(self) -> list[str]:
        """All 200 prompts in the fixed order of `problems()`."""
        return [prompt(*p) for p in problems()]

    def eval_answers(self) -> list[str]:
        """The gold completions of `eval_prompts()`, in the same order."""
        return [answer(*p) for p in problems()]

    def tokenizer_texts(self) -> list[str]:
        """Text to train this task's tokenizer from: the default corpus, prompts and answers."""
        prompts, answers = self.eval_prompts(), self.eval_answers()
        full = [p + a for p, a in zip(prompts, answers, strict=True)]
        return self.pretrain_corpus() + prompts + answers + full
