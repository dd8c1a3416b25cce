import dataclasses
import re

import pytest

from rlhf_lab.data.templates import (
    TEMPLATES,
    PromptTemplate,
    TextTemplate,
    format_prompt,
    get_template,
    template_names,
)
from rlhf_lab.models.tokenizer import train_bpe_tokenizer
from rlhf_lab.tasks import arithmetic

# A tiny Jinja chat template: "<|user|>\n{content}\n" per message, "<|assistant|>\n" to reply.
TINY_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    tok = train_bpe_tokenizer(["hello world"], vocab_size=300)
    tok.chat_template = TINY_CHAT
    return tok


@pytest.mark.parametrize(
    "name, expected",
    [
        ("plain", "What is 2+3?"),
        ("qa", "Q: What is 2+3?\nA:"),
        ("instruction", "### Instruction:\nWhat is 2+3?\n\n### Response:\n"),
        ("user_assistant", "User: What is 2+3?\n\nAssistant:"),
        ("hh", "\n\nHuman: What is 2+3?\n\nAssistant:"),
    ],
)
def test_text_templates_give_exact_strings(name, expected):
    assert format_prompt(name, "What is 2+3?") == expected
    assert get_template(name).format("What is 2+3?") == expected


def test_qa_matches_the_arithmetic_task_prompt():
    assert format_prompt("qa", "2+3=") == arithmetic.prompt(2, "+", 3) == "Q: 2+3=\nA:"


def test_instruction_with_input_adds_the_input_block():
    text = format_prompt("instruction", "Summarise the text.", input="Alice fell down a hole.")
    assert text == (
        "### Instruction:\nSummarise the text.\n\n"
        "### Input:\nAlice fell down a hole.\n\n"
        "### Response:\n"
    )


@pytest.mark.parametrize("empty", [None, "", "  \n"])
def test_empty_input_counts_as_none(empty):
    assert format_prompt("instruction", "Say hi.", input=empty) == (
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert format_prompt("hh", "Say hi.", input=empty) == "\n\nHuman: Say hi.\n\nAssistant:"


@pytest.mark.parametrize("name", ["plain", "qa", "user_assistant", "hh"])
def test_templates_without_an_input_slot_refuse_an_input(name):
    with pytest.raises(ValueError, match=f"template '{name}' has no place for an input"):
        format_prompt(name, "Summarise.", input="some context")


def test_chat_uses_the_tokenizers_template(chat_tokenizer):
    assert format_prompt("chat", "What is 2+3?", tokenizer=chat_tokenizer) == (
        "<|user|>\nWhat is 2+3?\n<|assistant|>\n"
    )
    assert format_prompt("chat", "Summarise.", input="Some text.", tokenizer=chat_tokenizer) == (
        "<|user|>\nSummarise.\n\nSome text.\n<|assistant|>\n"
    )


def test_chat_without_a_chat_template_names_the_tokenizer(tmp_path):
    tok = train_bpe_tokenizer(["hello world"], vocab_size=300)
    tok.save_pretrained(tmp_path)
    tok.name_or_path = str(tmp_path)
    expected = re.escape(f"tokenizer {str(tmp_path)!r} has no chat template")
    with pytest.raises(ValueError, match=expected):
        format_prompt("chat", "Hi", tokenizer=tok)


def test_chat_without_a_tokenizer_raises():
    with pytest.raises(ValueError, match="needs the tokenizer"):
        format_prompt("chat", "Hi")


def test_unknown_template_lists_the_choices():
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'") as info:
        get_template("alpaca")
    assert all(name in str(info.value) for name in template_names())


def test_registry_holds_frozen_templates_by_name():
    assert template_names() == ["plain", "qa", "instruction", "user_assistant", "hh", "chat"]
    for name, template in TEMPLATES.items():
        assert template.name == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            template.name = "other"


def test_a_template_object_can_be_passed_instead_of_a_name():
    custom = TextTemplate("tldr", "{prompt}\nTL;DR:")
    assert isinstance(custom, PromptTemplate)
    assert get_template(custom) is custom
    assert format_prompt(custom, "A long post.") == "A long post.\nTL;DR:"
