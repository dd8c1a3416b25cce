"""Backbones: named tiny configs for CPU research, the toy models, and any HF causal LM.

`load_backbone` is the one entry point: a named config (`backbone_names()`), a local folder
written by `save_pretrained`, or a Hugging Face Hub id (cache first, then the hub when a network
is there; offline it fails at once with one clear `OSError`).

Listing the names (`backbone_names()`, `TINY_CONFIGS`, `TOY_NAMES`) imports nothing heavy, since
the CLI builds its `--help` choices from them; torch and transformers load only when a model is
built or loaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["TINY_CONFIGS", "TOY_NAMES", "backbone_names", "build_tiny_model", "check_backbone_name", "load_backbone"]

# Randomly initialised configs sized to train in seconds on a laptop CPU. Dropout is off: RL
# needs the log-probs recorded at sampling to equal the ones recomputed for the update.
# `family` picks the config class; every other key is passed to it (and may be overridden).
TINY_CONFIGS: dict[str, dict] = {
    "gpt2-tiny": dict(
        family="gpt2",
        n_layer=2,
        n_head=4,
        n_embd=128,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,  # unused by the LM head; zero so every rate reads 0
    ),
    "llama-tiny": dict(
        family="llama",
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama 2/3
        intermediate_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    ),
    "opt-tiny": dict(
        family="opt",
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        ffn_dim=256,
        max_position_embeddings=128,
        word_embed_proj_dim=128,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
    ),
}

# The toy models of `rlhf_lab.models.toy` (the keys of its `TOY_CONFIGS`, which a test keeps
# equal to this), named here so that listing them needs no torch.
TOY_NAMES: tuple[str, ...] = ("bigram", "lstm", "attention")

# family -> the name of its config class in `transformers` (looked up when a model is built)
_CONFIG_CLASSES: dict[str, str] = {
    "gpt2": "GPT2Config",
    "llama": "LlamaConfig",
    "opt": "OPTConfig",
}

# Llama and OPT build their input embedding with `padding_idx=pad_token_id`: that row starts at
# zero and gets no gradient from the input side. Our tokenizers pad with EOS, whose embedding must
# stay learnable, so these families get no pad id when it equals EOS. (Padding never reaches the
# model unmasked: `attention_mask` covers it, and `Policy` samples with its own loop.)
_PADDING_IDX_FAMILIES = {"llama", "opt"}


def backbone_names() -> list[str]:
    """Every named backbone: the tiny HF configs, then the toy models."""
    return [*TINY_CONFIGS, *(name for name in TOY_NAMES if name not in TINY_CONFIGS)]


def _did_you_mean(name: str) -> str:
    """" did you mean 'gpt2-tiny'?" for a near miss of a named backbone (difflib), else ""."""
    import difflib

    close = difflib.get_close_matches(name, backbone_names(), n=3, cutoff=0.8)
    return f" did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _unknown(name: str) -> ValueError:
    """The error for a name that is no named backbone, listing every name."""
    from rlhf_lab.errors import ConfigError

    hint = _did_you_mean(name)
    return ConfigError(f"unknown backbone {name!r};{hint or ''} choose from: {', '.join(backbone_names())}")


def check_backbone_name(name: str, field: str = "backbone") -> None:
    """Refuse a near miss of a named backbone ("gpt2-tiy") before it is looked up on the hub.

    A name that is a named backbone, an existing path, or has a "/" (a hub id "org/model" or a
    path) passes; so does any name with no close named backbone ("gpt2", "distilgpt2"), which
    stays a hub id for users with a network. Raises `rlhf_lab.errors.ConfigError`:
    "model.backbone: unknown backbone 'gpt2-tiy'; did you mean 'gpt2-tiny'? ...".
    """
    if name in backbone_names() or "/" in name or os.sep in name or os.path.exists(os.path.expanduser(name)):
        return
    hint = _did_you_mean(name)
    if hint:
        from rlhf_lab.errors import ConfigError

        raise ConfigError(f"{field}: unknown backbone {name!r};{hint} (named backbones: "
                          f"{', '.join(backbone_names())}; a local folder or a hub id also works)")


def build_tiny_model(
    name: str, tokenizer: PreTrainedTokenizerBase, **overrides
) -> PreTrainedModel:
    """A randomly initialised causal LM from a named config, sized to `tokenizer`.

    `name` is a key of `TINY_CONFIGS` (GPT-2, Llama or OPT architectures, ~0.5M parameters plus
    embeddings) or a toy model of `TOY_NAMES` (built by `rlhf_lab.models.toy.build_toy_model`).
    `overrides` replace config fields, e.g. `n_layer=1` for gpt2-tiny. The vocabulary size and
    the bos/eos/pad ids come from the tokenizer. Seed torch beforehand for reproducible weights.
    Raises ValueError listing `backbone_names()` for an unknown name.
    """
    if name not in TINY_CONFIGS:
        if name in TOY_NAMES:
            from rlhf_lab.models.toy import build_toy_model, ensure_registered

            ensure_registered()
            return build_toy_model(name, tokenizer, **overrides)
        raise _unknown(name)
    import transformers

    spec = {**TINY_CONFIGS[name], **overrides}
    family = spec.pop("family")
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"backbone family {family!r} has no config class")
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family in _PADDING_IDX_FAMILIES and ids["pad_token_id"] == ids["eos_token_id"]:
        ids["pad_token_id"] = None
    config = getattr(transformers, _CONFIG_CLASSES[family])(**ids, **spec)
    return transformers.AutoModelForCausalLM.from_config(config)


def load_backbone(
    name_or_path: str, tokenizer: PreTrainedTokenizerBase | None = None, **kwargs
) -> PreTrainedModel:
    """A causal LM by name: a named config, a local HF folder, or a Hugging Face Hub id.

    - A name in `backbone_names()` builds a fresh random model with `build_tiny_model`; it needs
      `tokenizer`, and `kwargs` override config fields.
    - A directory loads with `AutoModelForCausalLM.from_pretrained` (any architecture transformers
      knows, and the toy models); `kwargs` go to `from_pretrained` (e.g. `dtype`).
    - A string that can only be a path ("./x", "/x", "a/b/c") but is no directory fails at once.
    - A near miss of a named backbone without a "/" ("gpt2-tiy") fails at once with a
      `ConfigError` naming the closest names (`check_backbone_name`).
    - Anything else is a hub id ("gpt2", "org/model"): the local HF cache first, then the hub if
      it can be reached. Offline (`HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE`, or no connection to the
      hub within ~1.5 s) it raises at once, without the hub client's retries.

    Every failure to find the model is one `OSError` naming `name_or_path`, saying it was not
    found locally and why the hub could not help, and listing the named backbones.
    """
    if name_or_path in TINY_CONFIGS or name_or_path in TOY_NAMES:
        if tokenizer is None:
            raise ValueError(
                f"backbone {name_or_path!r} is built from a config and needs a tokenizer"
            )
        return build_tiny_model(name_or_path, tokenizer, **kwargs)
    from transformers import AutoModelForCausalLM

    from rlhf_lab.models.tokenizer import from_cache_or_hub, looks_like_path
    from rlhf_lab.models.toy import ensure_registered

    ensure_registered()  # so a saved toy model loads from a folder
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    check_backbone_name(name_or_path)  # "gpt2-tiy": a typo of a named backbone, not a hub id
    names = f"named backbones: {', '.join(backbone_names())}"
    if looks_like_path(name_or_path):
        raise FileNotFoundError(f"backbone folder {name_or_path!r} does not exist ({names})")
    local_only = kwargs.pop("local_files_only", False)
    user_adapter_kwargs = kwargs.pop("adapter_kwargs", None) or {}

    def load(local: bool) -> PreTrainedModel:
        # transformers does not pass local_files_only on to its PEFT-adapter lookup, which would
        # then ask the hub (with retries) even for a cache-only load; pass it explicitly.
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            local_files_only=local,
            adapter_kwargs={**user_adapter_kwargs, "local_files_only": local},
            **kwargs,
        )

    return from_cache_or_hub(
        load,
        name_or_path,
        what="backbone",
        local_files_only=local_only,
        cache_dir=kwargs.get("cache_dir"),
        extra_hint=names,
    )
