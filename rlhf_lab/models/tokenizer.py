"""Tokenizers: train a byte-level BPE from a task's text, or load one from a folder or the hub.

Nothing here downloads anything unless given a hub name and a network; tests and the demo use
`train_bpe_tokenizer` or local folders. This module also holds the offline-aware hub lookup that
`rlhf_lab.models.backbones` shares (`from_cache_or_hub`, `hub_unreachable_reason`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "PAD_TOKEN",
    "ensure_pad_token",
    "from_cache_or_hub",
    "hub_unreachable_reason",
    "load_tokenizer",
    "looks_like_path",
    "train_bpe_tokenizer",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Byte-level BPE always keeps all 256 byte symbols, so any string round-trips exactly.
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()

# Added as the pad token when a tokenizer has neither a pad nor an EOS token.
PAD_TOKEN = "<|pad|>"

# How long the connectivity probe waits for the hub before calling the machine offline.
HUB_PROBE_TIMEOUT_S = 1.5


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


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give `tokenizer` a pad token if it has none; return True when the vocabulary grew.

    - A pad token already set: nothing changes.
    - No pad but an EOS token (GPT-2, Llama): `pad_token = eos_token`. The vocabulary is unchanged,
      so a model built for the tokenizer still fits it.
    - Neither: a new special token `PAD_TOKEN` ("<|pad|>") is added, a warning is logged, and the
      function returns True: the vocabulary is one larger, so a pretrained model must be resized
      with `model.resize_token_embeddings(len(tokenizer))` before use.

    Pad positions are always masked out by `attention_mask`, so losses must mask by
    `attention_mask`/`response_mask`, never by `input_ids == pad_token_id`: with pad = EOS that
    would drop the EOS a response ends with. Which side to pad on is not set here: `Policy` pads
    prompts on the left itself (`padding_side="left"` per call), and collators pad on the right.
    """
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    log.warning(
        "tokenizer %r had neither a pad nor an EOS token: added %r as pad token (id %d); its "
        "vocabulary is now %d, so resize a pretrained model's embeddings to match",
        getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        PAD_TOKEN,
        tokenizer.pad_token_id,
        len(tokenizer),
    )
    return True


def load_tokenizer(path_or_name: str, **kwargs) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder or, given a network, a Hugging Face Hub name.

    The result always has a pad token (see `ensure_pad_token`): a tokenizer without one (GPT-2)
    gets `pad_token = eos_token`; one with neither pad nor EOS gets a new "<|pad|>" special token,
    which grows its vocabulary by one and logs a warning saying so.

    A string that looks like a path ("./x", "/x", "~/x", "a/b/c") but is no directory fails at
    once. Any other name is a hub id: looked up in the local HF cache first (no network needed),
    then on the hub, but only when the hub is reachable: with `HF_HUB_OFFLINE` or
    `TRANSFORMERS_OFFLINE` set (read at call time), or when a TCP connect to the hub fails within
    about a second and a half, it fails at once instead of retrying for a minute. Every failure to
    find the tokenizer is a single `OSError` naming `path_or_name` and saying why.

    Args:
        path_or_name: a folder written by `save_pretrained`, or a hub repo id such as "gpt2".
        **kwargs: passed to `AutoTokenizer.from_pretrained` (`local_files_only=True` forbids the
            hub even with a network).
    """
    path = os.path.expanduser(path_or_name)
    if os.path.isdir(path):
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    elif looks_like_path(path_or_name):
        # A hub id is "name" or "org/name"; anything else is a mistyped path, so say so at once
        # instead of waiting on the hub.
        raise FileNotFoundError(f"tokenizer folder {path_or_name!r} does not exist")
    else:
        local_only = kwargs.pop("local_files_only", False)
        tok = from_cache_or_hub(
            lambda local: AutoTokenizer.from_pretrained(
                path_or_name, local_files_only=local, **kwargs
            ),
            path_or_name,
            what="tokenizer",
            local_files_only=local_only,
            cache_dir=kwargs.get("cache_dir"),
        )
    ensure_pad_token(tok)
    return tok


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a filesystem path, never a hub id ("name" or "org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def offline_env() -> str | None:
    """The offline variable that is set ("HF_HUB_OFFLINE" or "TRANSFORMERS_OFFLINE"), or None.

    Read at call time: huggingface_hub reads `HF_HUB_OFFLINE` only once, at import.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return None


def _hub_address() -> tuple[str, int]:
    """(host, port) a hub request would first connect to: the HTTPS proxy if any, else the hub."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parts.hostname:
            return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    return host, port


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hugging Face Hub looks reachable, else a short reason why not.

    Offline when `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` is set, or when a TCP connect to the
    hub (`HF_ENDPOINT`, default huggingface.co:443, or the HTTPS proxy in the environment) does
    not succeed within `timeout` seconds. The probe runs in a daemon thread joined with the same
    bound, so a stuck DNS lookup cannot hold the caller either: this returns within about
    `timeout` seconds, and at once where the sandbox refuses connections or name lookups.
    """
    var = offline_env()
    if var is not None:
        return f"{var} is set"
    host, port = _hub_address()
    outcome: dict[str, object] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["ok"] = True
        except Exception as err:  # any failure means "not reachable"
            outcome["error"] = err

    thread = threading.Thread(target=probe, name="rlhf-lab-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome.get("ok"):
        return None
    err = outcome.get("error")
    detail = f"{type(err).__name__}: {err}" if err is not None else f"no answer in {timeout:g} s"
    return f"no network (could not connect to {host}:{port}: {detail})"


def _cache_hint(name: str, cache_dir: str | None) -> str:
    """'not in the Hugging Face cache (<dir>)', or 'incomplete in ...' when the repo is there."""
    from huggingface_hub import constants

    root = cache_dir or constants.HF_HUB_CACHE
    cached = os.path.isdir(os.path.join(root, "models--" + name.replace("/", "--")))
    return f"{'incomplete' if cached else 'not'} in the Hugging Face cache ({root})"


def from_cache_or_hub(
    load: Callable[[bool], T],
    name: str,
    what: str,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    extra_hint: str = "",
) -> T:
    """Load a hub id from the local HF cache, else from the hub when it can be reached.

    `load(local_files_only)` does the actual `from_pretrained` call. It is first called with True
    (a cache hit needs no network, so a user who downloaded once works offline), then, only when
    `local_files_only` is False and `hub_unreachable_reason()` finds the hub reachable, with False.
    Every failure is raised as one `OSError` (no chained traceback) that names `what` and `name`,
    says it was not found locally, and why the hub could not help; `extra_hint` is appended.
    """
    suffix = f"; {extra_hint}" if extra_hint else ""
    with contextlib.suppress(OSError, ValueError):  # not cached (or incomplete): the hub below
        return load(True)
    where = f"no such folder, {_cache_hint(name, cache_dir)}"
    reason = "local_files_only=True" if local_files_only else hub_unreachable_reason()
    if reason is not None:
        raise OSError(
            f"{what} {name!r} was not found locally ({where}) and the hub could not be "
            f"reached: {reason}{suffix}"
        ) from None
    try:
        return load(False)
    except (OSError, ValueError) as hub_err:
        lines = str(hub_err).strip().splitlines()
        first = lines[0] if lines else type(hub_err).__name__
        raise OSError(
            f"{what} {name!r} was not found locally ({where}) and could not be loaded from "
            f"the hub: {first}{suffix}"
        ) from None
