"""The built-in `alice` task: "Q: Who hosts the mad tea party?\\nA:" -> " the Mad Hatter".

Short-answer questions over a small fact set about Alice's Adventures in Wonderland, written for
this task (43 facts). Each fact has a question, a short canonical answer (two to six words), the
key words a correct answer must mention, the character the fact is about, and three sentences that
state it in different words. As in `arithmetic`, everything a tiny end-to-end run needs is
generated here, deterministically from a seed: a pretraining corpus, SFT pairs, RL and eval
prompts, the text to train a tokenizer from, and a rule-based gold judge (see `score`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

__all__ = [
    "CHARACTERS",
    "AliceTask",
    "Fact",
    "answer",
    "characters_named",
    "fact_for_prompt",
    "facts",
    "gold_reward",
    "keyword_coverage",
    "prompt",
    "score",
]

EOS_TEXT = "<|endoftext|>"

MIN_WORDS = 2
"""An answer with fewer words than this is too short (see `score`)."""
SHORT_PENALTY = 0.5
"""Subtracted from the score of a too-short answer."""
MIXUP_PENALTY = 0.5
"""Subtracted from the score once per character named in the answer that does not belong to the
question (mixed-up characters)."""


@dataclass(frozen=True)
class Fact:
    """One question with its canonical answer; hashable, so splits can be compared as sets."""

    question: str
    answer: str
    """The canonical answer without the leading space the completion carries."""
    keywords: tuple[str, ...]
    """Lower-case words or phrases that a correct answer must all mention."""
    character: str
    """The character the fact is about: a key of `CHARACTERS`."""
    statements: tuple[str, ...]
    """Sentences stating the fact in different words, for the pretraining corpus."""


CHARACTERS: dict[str, tuple[str, ...]] = {
    # name -> the lower-case words or phrases by which an answer names the character. Aliases are
    # chosen not to clash: "cat" alone could be Dinah, and "white" alone could be a white rose.
    "Alice": ("alice",),
    "Alice's sister": ("sister",),
    "Dinah": ("dinah",),
    "White Rabbit": ("white rabbit", "rabbit"),
    "Dodo": ("dodo",),
    "Mouse": ("mouse",),
    "Bill the Lizard": ("bill", "lizard"),
    "Caterpillar": ("caterpillar",),
    "Pigeon": ("pigeon",),
    "Duchess": ("duchess",),
    "Cook": ("cook",),
    "Cheshire Cat": ("cheshire",),
    "Mad Hatter": ("hatter",),
    "March Hare": ("hare",),
    "Dormouse": ("dormouse",),
    "Queen of Hearts": ("queen",),
    "King of Hearts": ("king",),
    "Knave of Hearts": ("knave",),
    "Gardeners": ("gardener", "gardeners"),
    "Gryphon": ("gryphon",),
    "Mock Turtle": ("turtle",),
}

# (question, answer, keywords, character, statements), in a fixed order that follows the story.
_FACTS: tuple[tuple[str, str, tuple[str, ...], str, tuple[str, str, str]], ...] = (
    ("Who sits with Alice on the riverbank at the start?", "her sister", ("sister",),
     "Alice's sister", (
         "At the start Alice sits on the riverbank with her older sister.",
         "Alice's sister reads a book with no pictures by the river.",
         "Alice grows bored beside her sister on the bank of the river.")),
    ("Who does Alice follow down the rabbit hole?", "the White Rabbit", ("white", "rabbit"),
     "White Rabbit", (
         "Alice follows the White Rabbit down a rabbit hole.",
         "The White Rabbit runs past Alice, and she chases him underground.",
         "Curious Alice hurries after the White Rabbit and tumbles down a hole.")),
    ("What does the White Rabbit take out of his waistcoat pocket?", "a watch",
     ("watch",), "White Rabbit", (
         "The White Rabbit takes a watch out of his waistcoat pocket.",
         "Alice has never before seen a rabbit with a pocket watch.",
         "The White Rabbit checks his watch and worries about being late.")),
    ("What is the name of Alice's cat?", "her cat Dinah", ("dinah",), "Dinah", (
        "Alice has a cat at home named Dinah.",
        "Dinah is the cat that Alice misses while she falls.",
        "Alice often talks about her cat Dinah.")),
    ("What words are on the little bottle?", "drink me", ("drink me",), "Alice", (
        "The little bottle on the table has a label saying drink me.",
        "Alice reads the words drink me on a small bottle.",
        "A tiny bottle tells Alice to drink me, so she does.")),
    ("What happens when Alice drinks from the bottle?", "she shrinks",
     ("shrinks",), "Alice", (
         "After drinking from the bottle, Alice shrinks very small.",
         "The bottle makes Alice small: she shrinks to ten inches high.",
         "Alice shrinks until she is small enough for the little door.")),
    ("What words are on the little cake?", "eat me", ("eat me",), "Alice", (
        "A little cake in a glass box is marked eat me in currants.",
        "Alice finds a cake with the words eat me on it.",
        "The small cake asks Alice to eat me, and she takes a bite.")),
    ("What happens when Alice eats the cake?", "she grows tall", ("grows", "tall"),
     "Alice", (
         "After eating the cake, Alice grows very tall.",
         "The cake works, and Alice grows tall like a telescope opening out.",
         "Alice grows so tall from the cake that her head hits the roof.")),
    ("What does Alice's crying make when she is a giant?", "a pool of tears", ("tears",),
     "Alice", (
         "As a giant, Alice cries until she makes a pool of tears.",
         "Later, when she is small, Alice swims in a pool of her own tears.",
         "The hall floods with Alice's tears while she is huge.")),
    ("What does Alice see through the little door?", "a garden", ("garden",), "Alice", (
        "Through the little door Alice sees a lovely garden.",
        "Alice longs to get into the garden behind the tiny door.",
        "The most beautiful garden lies beyond the little door.")),
    ("What opens the little door?", "a golden key", ("golden", "key"), "Alice", (
        "A tiny golden key on a glass table opens the little door.",
        "Alice unlocks the little door with the golden key.",
        "The golden key fits only the smallest door in the hall.")),
    ("Who runs the caucus race?", "the Dodo", ("dodo",), "Dodo", (
        "The Dodo runs a caucus race so the wet animals can get dry.",
        "In the caucus race set up by the Dodo, everybody wins.",
        "The Dodo says that everyone must run in a caucus race.")),
    ("Who tells a dry history to dry everyone off?", "the Mouse", ("mouse",), "Mouse", (
        "The Mouse tells a very dry history to dry everyone off.",
        "To dry the soaked animals, the Mouse recites a dull history lesson.",
        "Dripping wet, the animals listen as the Mouse tells a dry tale.")),
    ("Who does the White Rabbit send down the chimney?", "Bill the Lizard", ("bill", "lizard"),
     "Bill the Lizard", (
         "The White Rabbit sends Bill the Lizard down the chimney.",
         "Alice kicks Bill the Lizard right out of the chimney.",
         "Poor Bill the Lizard flies up out of the chimney like a rocket.")),
    ("Who does the White Rabbit think Alice is?", "his maid Mary Ann", ("mary", "ann"),
     "White Rabbit", (
         "The White Rabbit mistakes Alice for his housemaid Mary Ann.",
         "Thinking she is Mary Ann, the White Rabbit sends Alice to fetch his gloves.",
         "Alice is taken for Mary Ann, the maid of the White Rabbit.")),
    ("What does the Caterpillar smoke?", "a hookah", ("hookah",), "Caterpillar", (
        "The Caterpillar sits smoking a long hookah.",
        "A blue Caterpillar puffs slowly on a hookah.",
        "Alice watches the Caterpillar take the hookah out of its mouth.")),
    ("What does the Caterpillar sit on?", "a mushroom", ("mushroom",), "Caterpillar", (
        "The Caterpillar sits on top of a large mushroom.",
        "Alice peeps over the edge of a mushroom and sees the Caterpillar.",
        "The seat of the Caterpillar is a big mushroom.")),
    ("What does the Caterpillar ask Alice?", "who are you", ("who are you",), "Caterpillar", (
        "The Caterpillar looks at Alice and asks who are you.",
        "Who are you, the Caterpillar asks Alice in a sleepy voice.",
        "Alice cannot answer well when the Caterpillar asks who are you.")),
    ("What do the two sides of the mushroom do?", "grow or shrink",
     ("grow", "shrink"), "Caterpillar", (
         "One side of the mushroom makes Alice grow and the other makes her shrink.",
         "The Caterpillar says one side will make you grow and the other will make you shrink.",
         "By nibbling the mushroom, Alice can grow or shrink as she likes.")),
    ("Who thinks Alice is a serpent?", "the Pigeon", ("pigeon",), "Pigeon", (
        "When Alice's neck grows long, the Pigeon thinks she is a serpent.",
        "The Pigeon calls Alice a serpent who wants its eggs.",
        "A Pigeon in a treetop screams at Alice, sure she is a serpent.")),
    ("What does the Duchess's baby turn into?", "a pig", ("pig",), "Duchess", (
        "The baby of the Duchess turns into a pig in Alice's arms.",
        "Alice carries the baby outside, and it becomes a pig.",
        "The howling baby of the Duchess grows into a pig and trots away.")),
    ("What does the cook put too much of in the soup?", "too much pepper", ("pepper",),
     "Cook", (
         "The cook puts far too much pepper in the soup.",
         "Everyone in the kitchen of the Duchess sneezes from the pepper.",
         "The air in the kitchen of the cook is full of pepper.")),
    ("What does the Duchess find in everything?", "a moral", ("moral",), "Duchess", (
        "The Duchess insists that everything has a moral.",
        "Walking with Alice, the Duchess finds a moral in everything.",
        "Whatever Alice says, the Duchess turns it into a moral.")),
    ("What does the Cheshire Cat always do?", "it grins", ("grins",),
     "Cheshire Cat", (
         "The Cheshire Cat grins from ear to ear.",
         "Sitting in a tree, the Cheshire Cat grins at Alice.",
         "The Duchess says her cat grins because it is a Cheshire Cat.")),
    ("What is left when the Cheshire Cat vanishes?", "its grin", ("grin",),
     "Cheshire Cat", (
         "When the Cheshire Cat vanishes, only its grin is left.",
         "The Cheshire Cat fades away tail first until just the grin remains.",
         "Alice sees a grin without a cat after the Cheshire Cat vanishes.")),
    ("What does the Cheshire Cat say everyone here is?", "all mad", ("mad",),
     "Cheshire Cat", (
         "The Cheshire Cat tells Alice that everyone here is mad.",
         "According to the Cheshire Cat, Alice must be mad too, or she would not have come.",
         "The Cheshire Cat claims that the whole place is mad.")),
    ("Who hosts the mad tea party?", "the Mad Hatter", ("hatter",), "Mad Hatter", (
        "The Mad Hatter hosts a tea party that never ends.",
        "Alice joins the Mad Hatter at his long tea table.",
        "The host of the mad tea party is the Hatter.")),
    ("Who sits at the tea table with the Hatter?", "the March Hare and the Dormouse",
     ("hare", "dormouse"), "March Hare", (
         "The March Hare and the Dormouse share the tea table with the Hatter.",
         "At the tea party, the Hatter sits with the March Hare and a sleepy Dormouse.",
         "The Dormouse sleeps between the March Hare and the Hatter.")),
    ("What time is it always at the tea party?", "six o'clock", ("six",), "Mad Hatter", (
        "At the tea party of the Hatter it is always six o'clock.",
        "Time stopped at six o'clock, so the tea party never ends.",
        "Since the Hatter quarrelled with Time, it is always six at his table.")),
    ("What does the Hatter's riddle compare?", "raven and writing desk", ("raven", "desk"),
     "Mad Hatter", (
         "The Hatter asks Alice why a raven is like a writing desk.",
         "The riddle about a raven and a writing desk has no answer.",
         "Alice tries to guess the riddle of the raven and the desk.")),
    ("Who keeps falling asleep at the tea party?", "the Dormouse", ("dormouse",),
     "Dormouse", (
         "The Dormouse keeps falling asleep at the tea party.",
         "The Hatter and the March Hare rest their elbows on the sleeping Dormouse.",
         "At the end of the party they try to put the Dormouse into the teapot.")),
    ("Where do the sisters in the Dormouse's story live?", "a treacle well",
     ("treacle", "well"), "Dormouse", (
         "In the story of the Dormouse, three sisters live in a treacle well.",
         "The Dormouse tells of three little sisters at the bottom of a treacle well.",
         "The sisters in the tale of the Dormouse draw treacle from a treacle well.")),
    ("What does the Queen of Hearts keep shouting?", "off with their heads", ("off", "heads"),
     "Queen of Hearts", (
         "The Queen of Hearts shouts off with their heads at the smallest fault.",
         "Whenever she is angry, the Queen of Hearts orders off with their heads.",
         "Off with their heads is the answer of the Queen to every problem.")),
    ("What are the croquet mallets?", "live flamingos", ("flamingos",), "Queen of Hearts", (
        "At the croquet game of the Queen the mallets are live flamingos.",
        "Alice tries to play croquet using flamingos as mallets.",
        "The flamingos twist their necks round when Alice tries to hit with them.")),
    ("What are the croquet balls?", "live hedgehogs", ("hedgehogs",), "Queen of Hearts", (
        "In the croquet game of the Queen the balls are live hedgehogs.",
        "The hedgehogs used as croquet balls keep crawling away.",
        "During the croquet game the hedgehogs start fighting each other.")),
    ("Why do the gardeners paint the roses red?", "white roses by mistake",
     ("white", "mistake"), "Gardeners", (
         "The gardeners paint the roses red because they planted white ones by mistake.",
         "By mistake, the card gardeners planted a white rose tree instead of a red one.",
         "Fearing the Queen, the gardeners hide their mistake by painting white roses red.")),
    ("What are the Queen's soldiers and courtiers?", "playing cards", ("cards",),
     "Queen of Hearts", (
         "The soldiers and courtiers of the Queen are all playing cards.",
         "The gardeners, soldiers and royal children of Wonderland are cards.",
         "At the end Alice says they are nothing but a pack of cards.")),
    ("Who takes Alice to meet the Mock Turtle?", "the Gryphon", ("gryphon",), "Gryphon", (
        "The Gryphon takes Alice to meet the Mock Turtle.",
        "On the orders of the Queen, a Gryphon leads Alice to the Mock Turtle.",
        "Alice follows the Gryphon down to the sea to hear the Mock Turtle.")),
    ("What dance do the Mock Turtle and the Gryphon show Alice?", "the Lobster Quadrille",
     ("lobster", "quadrille"), "Mock Turtle", (
         "The Mock Turtle and the Gryphon dance the Lobster Quadrille for Alice.",
         "In the Lobster Quadrille, the dancers throw a lobster out to sea.",
         "The Gryphon and the Mock Turtle show Alice the steps of the Lobster Quadrille.")),
    ("What does the Mock Turtle keep doing?", "sobbing and sighing", ("sobbing",),
     "Mock Turtle", (
         "The Mock Turtle keeps sobbing while he tells his story.",
         "Sighing and sobbing, the Mock Turtle remembers his school in the sea.",
         "Alice waits while the Mock Turtle stops sobbing long enough to speak.")),
    ("Who is on trial for stealing the tarts?", "the Knave of Hearts", ("knave",),
     "Knave of Hearts", (
         "The Knave of Hearts is put on trial for stealing the tarts.",
         "At the trial, the Knave stands accused of taking the tarts of the Queen.",
         "The Knave of Hearts is said to have stolen the tarts.")),
    ("Who is the judge at the trial?", "the King of Hearts", ("king",), "King of Hearts", (
        "The King of Hearts is the judge at the trial.",
        "At the trial the King sits as judge, wearing his crown over a wig.",
        "The King of Hearts asks the witnesses questions at the trial.")),
    ("How does Alice's adventure end?", "she wakes up", ("wakes",), "Alice", (
        "At the end Alice wakes up on the riverbank beside her sister.",
        "It was all a dream, and Alice wakes up on the bank.",
        "Alice wakes up to find the falling cards are only dry leaves.")),
)


@lru_cache(maxsize=1)
def _all_facts() -> tuple[Fact, ...]:
    return tuple(Fact(q, a, kw, ch, st) for q, a, kw, ch, st in _FACTS)


def facts() -> list[Fact]:
    """All 43 facts, in a fixed order (the order of the story)."""
    return list(_all_facts())


def prompt(fact: Fact) -> str:
    return f"Q: {fact.question}\nA:"


def answer(fact: Fact) -> str:
    """The gold completion: a space, then the canonical answer (" the Mad Hatter"); no EOS."""
    return f" {fact.answer}"


@lru_cache(maxsize=1024)
def _phrase_re(phrase: str) -> re.Pattern[str]:
    # A lower-case word or phrase as whole words: not inside a longer word ("hare" is not in
    # "share", "mouse" not in "dormouse"), and the words of a phrase apart by spaces or hyphens.
    body = r"[\s-]+".join(re.escape(w) for w in phrase.split())
    return re.compile(rf"(?<![a-z0-9]){body}(?![a-z0-9])")


def _mentions(text: str, phrase: str) -> bool:
    return _phrase_re(phrase).search(text.lower()) is not None


def characters_named(text: str) -> set[str]:
    """The `CHARACTERS` that `text` names by any of their aliases (case-insensitive)."""
    return {
        name for name, aliases in CHARACTERS.items() if any(_mentions(text, a) for a in aliases)
    }


def keyword_coverage(fact: Fact, text: str) -> float:
    """The fraction of `fact.keywords` that `text` mentions as whole words (case-insensitive)."""
    return sum(_mentions(text, k) for k in fact.keywords) / len(fact.keywords)


def _allowed_characters(fact: Fact) -> set[str]:
    # The fact's own character and any the question or the canonical answer name ("Who sits at the
    # tea table with the Hatter?" -> "the March Hare and the Dormouse" names three).
    return {fact.character} | characters_named(fact.question) | characters_named(fact.answer)


def _answer_text(completion: str) -> str:
    """The part of a completion the judge reads: up to an EOS marker or the first newline."""
    text = completion.split(EOS_TEXT, 1)[0].strip()
    return text.split("\n", 1)[0]


def _n_words(text: str) -> int:
    return len(re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text.lower()))


# The last "Q: <question>" line followed by an "A:" line, so a few-shot prefix does not confuse
# the lookup.
_QUESTION_RE = re.compile(r"Q:[ \t]*([^\n]*?)[ \t]*\n[ \t]*A:")


@lru_cache(maxsize=1)
def _by_question() -> dict[str, Fact]:
    return {f.question: f for f in _all_facts()}


def fact_for_prompt(text: str) -> Fact:
    """The fact whose question is the last "Q: ...\\nA:" in `text`; ValueError naming the prompt
    when there is none or the question is not one of the task's."""
    matches = _QUESTION_RE.findall(text)
    fact = _by_question().get(matches[-1]) if matches else None
    if fact is None:
        raise ValueError(f"prompt {text!r} is not one of the alice task's questions")
    return fact


def score(fact: Fact, completion: str) -> float:
    """The gold score of `completion` as an answer to `fact`, in [0, 1].

    Only the completion up to an EOS marker or its first newline is read (a model that did not
    stop runs on into the next "Q:"). Of that text `a`:

        score = max(0, coverage - 0.5 * mixups - 0.5 * short)

    - coverage: the fraction of `fact.keywords` that `a` mentions, each as whole words,
      case-insensitive (`keyword_coverage`);
    - mixups: how many `CHARACTERS` `a` names that belong to neither the fact's character nor
      the question nor the canonical answer (mixed-up characters: "the Queen of Hearts" for the
      tea party's host);
    - short: 1 when `a` has fewer than 2 words (runs of letters and digits, with inner
      apostrophes: "o'clock" is one word), else 0.

    Every canonical answer scores 1.0. For example, for "Who hosts the mad tea party?": " the Mad
    Hatter" scores 1.0, " Hatter" 1 - 0.5 = 0.5, " the Hatter and the Queen" 1 - 0.5 = 0.5 and
    " the Queen of Hearts" max(0, 0 - 0.5) = 0.0.
    """
    text = _answer_text(completion)
    coverage = keyword_coverage(fact, text)
    mixups = len(characters_named(text) - _allowed_characters(fact))
    short = _n_words(text) < MIN_WORDS
    return max(0.0, coverage - MIXUP_PENALTY * mixups - SHORT_PENALTY * short)


def gold_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """`score` of each completion against the fact its prompt asks about (see `score`)."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    return [score(fact_for_prompt(p), c) for p, c in zip(prompts, completions, strict=True)]


@dataclass
class AliceTask:
    """Alice in Wonderland questions with a rule-based gold judge; every split is a pure function
    of a seed.

    Stages see the facts as with `ArithmeticTask`: pretraining reads every fact in plain sentences
    but only the SFT-train facts in the Q/A format, SFT trains on the same facts and validates on
    the held-out ones, and RL and eval use all 43 prompts, so the held-out facts are what RL can
    still gain on.
    """

    name: ClassVar[str] = "alice"
    max_new_tokens: ClassVar[int] = 8
    """Response length limit: answers are at most 6 tokens with a 1024-entry BPE, plus EOS."""
    vocab_size: ClassVar[int] = 1024
    """BPE vocabulary size for `tokenizer_texts()`: whole words, so answers stay short."""

    val_fraction: float = 0.2
    """Share of the 43 facts held out of the Q/A pretraining lines and SFT training (SFT's val
    split)."""

    def __post_init__(self) -> None:
        n_val = self._n_val()
        if not 1 <= n_val < len(_all_facts()):
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves {n_val} of {len(_all_facts())} facts "
                "for validation; both splits must be non-empty"
            )

    def _n_val(self) -> int:
        return round(len(_all_facts()) * self.val_fraction)

    # Stages hold a task object and call these on it; the module functions stay usable without one.
    facts = staticmethod(facts)
    prompt = staticmethod(prompt)
    answer = staticmethod(answer)
    gold_reward = staticmethod(gold_reward)
    score = staticmethod(score)
    fact_for_prompt = staticmethod(fact_for_prompt)

    def split(self, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
        """(train, val) facts from a seeded shuffle; disjoint, together all 43."""
        shuffled = facts()
        random.Random(seed).shuffle(shuffled)
        n_val = self._n_val()
        return shuffled[n_val:], shuffled[:n_val]

    def sft_pairs(self, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """(train, val) lists of {"prompt", "completion"}; the data pipeline appends EOS."""
        train, val = self.split(seed)

        def pairs(fs: list[Fact]) -> list[dict[str, str]]:
            return [{"prompt": prompt(f), "completion": answer(f)} for f in fs]

        return pairs(train), pairs(val)

    def pretrain_corpus(self, seed: int = 0, n_lines: int = 2000) -> list[str]:
        """`n_lines` short documents for LM pretraining.

        Two lines in three are sentences stating a fact ("The Mad Hatter hosts a tea party that
        never ends."), drawn from all 43 facts' three paraphrases without repeats until each has
        been used once (so any `n_lines >= 194` states every paraphrase of every fact). Every third
        line is a Q/A chain of one to three facts in the exact prompt format ("Q: Who hosts the
        mad tea party?\\nA: the Mad Hatter\\nQ: ...") over the SFT-train facts of `seed` only.
        So pretraining teaches every fact, but the val facts are never seen in the Q/A format:
        SFT's val score measures transfer of a known fact to a new format, and RL (prompted with
        all 43) still has answers to gain. Documents may contain newlines; join them with "\\n"
        or EOS.
        """
        if n_lines < 1:
            raise ValueError(f"n_lines must be at least 1, got {n_lines}")
        rng = random.Random(seed)
        train = self.split(seed)[0]
        every = [s for f in _all_facts() for s in f.statements]
        pool: list[str] = []
        lines = []
        for i in range(n_lines):
            if i % 3 == 2:
                chain = [rng.choice(train) for _ in range(rng.randint(1, 3))]
                lines.append("\n".join(prompt(f) + answer(f) for f in chain))
            else:
                if not pool:
                    pool = every[:]
                    rng.shuffle(pool)
                lines.append(pool.pop())
        rng.shuffle(lines)
        return lines

    def rl_prompts(self, seed: int = 0) -> list[str]:
        """All 43 prompts (the SFT-val questions too) in a seeded order."""
        prompts = [prompt(f) for f in _all_facts()]
        random.Random(seed).shuffle(prompts)
        return prompts

    def eval_prompts(self) -> list[str]:
        """All 43 prompts in the fixed order of `facts()`."""
        return [prompt(f) for f in _all_facts()]

    def eval_answers(self) -> list[str]:
        """The gold completions of `eval_prompts()`, in the same order."""
        return [answer(f) for f in _all_facts()]

    def tokenizer_texts(self) -> list[str]:
        """Text to train this task's tokenizer from: the default corpus, prompts and answers."""
        prompts, answers = self.eval_prompts(), self.eval_answers()
        full = [p + a for p, a in zip(prompts, answers, strict=True)]
        return self.pretrain_corpus() + prompts + answers + full
