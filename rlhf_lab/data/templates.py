"""Prompt templates: how a raw prompt (and optional context) becomes the text a policy continues.

Each template is a small frozen dataclass in the `TEMPLATES` registry; `get_template(name)` looks
one up and `format_prompt(template, prompt, input=None, tokenizer=None)` applies it. Every
template ends where the model's answer should begin, so a completion is appended as is.

- `plain`: `{prompt}`
- `qa`: `Q: {prompt}\\nA:` (the built-in arithmetic task's form)
- `instruction`: `### Instruction:\\n{prompt}\\n\\n### Response:\\n`, with
  `### Input:\\n{input}\\n\\n` before `### Response:` when there is an input (Alpaca/Dolly)
- `user_assistant`: `User: {prompt}\\n\\nAssistant:`
- `hh`: `\\n\\nHuman: {prompt}\\n\\nAssistant:` (Anthropic HH-RLHF dialogues)
- `chat`: the tokenizer's own chat template, one user turn, with the generation prompt

`input` is extra context for the prompt (Dolly's `context`, Alpaca's `input`). `instruction`
places it in its `### Input:` block and `chat` appends it to the user turn after a blank line;
the other templates have no place for it and raise ValueError rather than guess. An empty or
whitespace-only `input` counts as none, as in Dolly rows without context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

__all__ = [
    "ChatTemplate",
    "PromptTemplate",
    "TEMPLATES",
    "TextTemplate",
    "format_prompt",
    "get_template",
    "template_names",
]


def _context(input: str | None) -> str | None:
    """`input`, or None when it is missing, empty or whitespace only."""
    return input if input is not None and input.strip() else None


@dataclass(frozen=True)
class PromptTemplate(ABC):
    """Base of all templates: a `name` and a `format` that turns a prompt into model input."""

    name: str

    @abstractmethod
    def format(
        self,
        prompt: str,
        input: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> str:
        """The text the model continues; subclasses define it."""


@dataclass(frozen=True)
class TextTemplate(PromptTemplate):
    """A fixed-text template.

    Args:
        name: registry name.
        text: a `str.format` pattern with a `{prompt}` field, used when there is no input.
        text_with_input: the pattern with `{prompt}` and `{input}` fields, used when an input is
            given; None means the template takes no input (passing one raises ValueError).
    """

    text: str = "{prompt}"
    text_with_input: str | None = None

    def format(
        self,
        prompt: str,
        input: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> str:
        """Fill the pattern; `tokenizer` is ignored. Raises ValueError for an unusable input."""
        context = _context(input)
        if context is None:
            return self.text.format(prompt=prompt)
        if self.text_with_input is None:
            raise ValueError(
                f"template {self.name!r} has no place for an input; put the context into the "
                "prompt, or use the 'instruction' or 'chat' template"
            )
        return self.text_with_input.format(prompt=prompt, input=context)


@dataclass(frozen=True)
class ChatTemplate(PromptTemplate):
    """The tokenizer's own chat template (`tokenizer.chat_template`, Jinja).

    The prompt (plus the input after a blank line, if any) becomes a single user message, rendered
    with `apply_chat_template(..., add_generation_prompt=True, tokenize=False)` so the text ends
    where the assistant's reply begins. Raises ValueError when no tokenizer is given or the
    tokenizer has no chat template (base models such as GPT-2 have none).
    """

    def format(
        self,
        prompt: str,
        input: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> str:
        """Render one user turn with the tokenizer's chat template."""
        if tokenizer is None:
            raise ValueError(
                f"template {self.name!r} needs the tokenizer whose chat template it uses"
            )
        if not getattr(tokenizer, "chat_template", None):
            who = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"tokenizer {who!r} has no chat template, so the {self.name!r} prompt template "
                "cannot be used with it; pick a text template (plain, qa, instruction, "
                "user_assistant, hh) or set tokenizer.chat_template"
            )
        context = _context(input)
        content = prompt if context is None else f"{prompt}\n\n{context}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        TextTemplate("plain", "{prompt}"),
        TextTemplate("qa", "Q: {prompt}\nA:"),
        TextTemplate(
            "instruction",
            "### Instruction:\n{prompt}\n\n### Response:\n",
            "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n",
        ),
        TextTemplate("user_assistant", "User: {prompt}\n\nAssistant:"),
        TextTemplate("hh", "\n\nHuman: {prompt}\n\nAssistant:"),
        ChatTemplate("chat"),
    )
}


def template_names() -> list[str]:
    """The registered template names, in registry order."""
    return list(TEMPLATES)


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """The template registered as `name` (a template passes through); ValueError lists choices."""
    if isinstance(name, PromptTemplate):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown prompt template {name!r}; choose from: {', '.join(TEMPLATES)}"
        ) from None


def format_prompt(
    template: str | PromptTemplate,
    prompt: str,
    input: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """Apply `template` (a name or a `PromptTemplate`) to `prompt` and an optional `input`.

    `tokenizer` is needed only by "chat". Raises ValueError for an unknown template, an input the
    template has no place for, or "chat" without a tokenizer that has a chat template.
    """
    return get_template(template).format(prompt, input=input, tokenizer=tokenizer)
