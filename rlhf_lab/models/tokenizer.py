"""Tokenizers: train a small byte-level BPE from a task's text, or load one from a folder or the hub.

Nothing here downloads anything unless given a hub name and a network; tests and the demo use
`train_bpe_tokenizer` or local folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["train_bpe_tokenizer", "load_tokenizer"]

# Byte-level BPE always keeps all 256 byte symbols, so any string round-trips exactly.
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on `texts` and wrap it for transformers.

    Every digit is its own pre-token, so numbers are never merged: "123" is always "1", "2", "3",
    which keeps arithmetic answers digit-by-digit. `decode(encode(x)) == x` for any string.
    `special_tokens[0]` serves as bos, eos, pad and unk (as in GPT-2); the rest become extra
    special tokens. No special tokens are added by `encode`, and padding side is left to the caller.

    Args:
        texts: training text; iterated once.
        vocab_size: upper bound on the vocabulary, including the 256 byte symbols and the special
            tokens; training stops earlier when no pair reaches `min_frequency`.
        min_frequency: a pair must occur this often to be merged.
        special_tokens: at least one; never split by the pre-tokenizer.
        model_max_length: stored on the tokenizer as the longest sequence a model may take.
    """
    special_tokens = list(special_tokens)
    if not special_tokens:
        raise ValueError("special_tokens must name at least one token (used as bos/eos/pad/unk)")
    floor = len(_BYTE_ALPHABET) + len(special_tokens)
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is below {floor}: the 256 byte symbols and "
            f"{len(special_tokens)} special token(s) always belong to a byte-level vocabulary"
        )

    backend = Tokenizer(models.BPE())
    # Digits first: ByteLevel's regex alone would keep " 123" as one pre-token and let BPE merge it.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=_BYTE_ALPHABET,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)

    main = special_tokens[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=main,
        eos_token=main,
        pad_token=main,
        unk_token=main,
        extra_special_tokens=special_tokens[1:],
        model_max_length=model_max_length,
    )


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def load_tokenizer(path_or_name: str, **kwargs) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder or, given a network, a Hugging Face Hub name.

    A tokenizer without a pad token (GPT-2) gets `pad_token = eos_token`: batched generation and
    training need some pad id, and every pad position is masked out by `attention_mask`. Losses
    must therefore mask by `attention_mask`/`response_mask`, never by `input_ids == pad_token_id`,
    or the EOS a response ends with would be dropped too.

    A string that looks like a path ("./x", "/x", "a/b/c") but is no directory fails at once. Any
    other name is a hub id: looked up in the local HF cache first, then on the hub (skipped when
    `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` is set, read at call time). Without a network and
    without those variables, huggingface_hub retries with backoff for about a minute before it
    gives up. Every failure to find the tokenizer is one `OSError` naming `path_or_name`.

    Args:
        path_or_name: a folder written by `save_pretrained`, or a hub repo id such as "gpt2".
        **kwargs: passed to `AutoTokenizer.from_pretrained`.
    """
    path = os.path.expanduser(path_or_name)
    if os.path.isdir(path):
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    elif _looks_like_path(path_or_name):
        # A hub id is "name" or "org/name"; anything else is a mistyped path, so say so at once
        # instead of waiting on the hub.
        raise OSError(f"tokenizer folder {path_or_name!r} does not exist")
    else:
        tok = _from_cache_or_hub(path_or_name, **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _from_cache_or_hub(name: str, **kwargs) -> PreTrainedTokenizerBase:
    local_only = kwargs.pop("local_files_only", False)
    try:
        # A cache hit needs no network at all, so a user who downloaded once works offline.
        return AutoTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cache_err:
        if local_only or _offline():
            why = "local_files_only=True" if local_only else "HF_HUB_OFFLINE is set"
            raise OSError(
                f"tokenizer {name!r} was not found locally (no such directory, not in the Hugging "
                f"Face cache) and the hub could not be reached: {why}"
            ) from cache_err
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as hub_err:
        lines = str(hub_err).strip().splitlines()
        reason = lines[0] if lines else type(hub_err).__name__
        raise OSError(
            f"tokenizer {name!r} was not found locally (no such directory, not in the Hugging "
            f"Face cache) and could not be loaded from the hub: {reason}"
        ) from hub_err
