"""Backbones: named tiny configs for CPU research, the toy models, and any HF causal LM.

`load_backbone` is the one entry point: a named config (`backbone_names()`), a local folder
written by `save_pretrained`, or a Hugging Face Hub id (cache first, then the hub when a network
is there; offline it fails at once with one clear `OSError`).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_lab.models.tokenizer import from_cache_or_hub, looks_like_path

__all__ = ["TINY_CONFIGS", "backbone_names", "build_tiny_model", "load_backbone"]

_TOY_MODULE = "rlhf_lab.models.toy"

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

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "gpt2": GPT2Config,
    "llama": LlamaConfig,
    "opt": OPTConfig,
}

# Llama and OPT build their input embedding with `padding_idx=pad_token_id`: that row starts at
# zero and gets no gradient from the input side. Our tokenizers pad with EOS, whose embedding must
# stay learnable, so these families get no pad id when it equals EOS. (Padding never reaches the
# model unmasked: `attention_mask` covers it, and `Policy` samples with its own loop.)
_PADDING_IDX_FAMILIES = {"llama", "opt"}


def _toy_module() -> ModuleType | None:
    """`rlhf_lab.models.toy` if it exists (imported lazily), else None.

    Importing it also registers the toy configs with the Auto classes, so saved toy models load
    through `AutoModelForCausalLM`. Errors inside an existing toy module are not hidden.
    """
    try:
        return importlib.import_module(_TOY_MODULE)
    except ModuleNotFoundError as err:
        if err.name != _TOY_MODULE:
            raise
        return None


def _toy_configs() -> dict[str, dict]:
    """The toy module's `TOY_CONFIGS` (a copy), or {} while that module does not exist."""
    toy = _toy_module()
    return dict(getattr(toy, "TOY_CONFIGS", {})) if toy is not None else {}


def backbone_names() -> list[str]:
    """Every named backbone: the tiny HF configs, then the toy models (when `toy` is present)."""
    return [*TINY_CONFIGS, *(name for name in _toy_configs() if name not in TINY_CONFIGS)]


def _unknown(name: str) -> ValueError:
    """The error for a name that is no named backbone, listing every name."""
    return ValueError(f"unknown backbone {name!r}; choose from: {', '.join(backbone_names())}")


def build_tiny_model(
    name: str, tokenizer: PreTrainedTokenizerBase, **overrides
) -> PreTrainedModel:
    """A randomly initialised causal LM from a named config, sized to `tokenizer`.

    `name` is a key of `TINY_CONFIGS` (GPT-2, Llama or OPT architectures, ~0.5M parameters plus
    embeddings) or a toy model from `rlhf_lab.models.toy` (built by its `build_toy_model`).
    `overrides` replace config fields, e.g. `n_layer=1` for gpt2-tiny. The vocabulary size and
    the bos/eos/pad ids come from the tokenizer. Seed torch beforehand for reproducible weights.
    Raises ValueError listing `backbone_names()` for an unknown name.
    """
    if name not in TINY_CONFIGS:
        toy = _toy_module()
        if toy is not None and name in getattr(toy, "TOY_CONFIGS", {}):
            return toy.build_toy_model(name, tokenizer, **overrides)
        raise _unknown(name)
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
    config = _CONFIG_CLASSES[family](**ids, **spec)
    return AutoModelForCausalLM.from_config(config)


def load_backbone(
    name_or_path: str, tokenizer: PreTrainedTokenizerBase | None = None, **kwargs
) -> PreTrainedModel:
    """A causal LM by name: a named config, a local HF folder, or a Hugging Face Hub id.

    - A name in `backbone_names()` builds a fresh random model with `build_tiny_model`; it needs
      `tokenizer`, and `kwargs` override config fields.
    - A directory loads with `AutoModelForCausalLM.from_pretrained` (any architecture transformers
      knows, and the toy models); `kwargs` go to `from_pretrained` (e.g. `dtype`).
    - A string that can only be a path ("./x", "/x", "a/b/c") but is no directory fails at once.
    - Anything else is a hub id ("gpt2", "org/model"): the local HF cache first, then the hub if
      it can be reached. Offline (`HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE`, or no connection to the
      hub within ~1.5 s) it raises at once, without the hub client's retries.

    Every failure to find the model is one `OSError` naming `name_or_path`, saying it was not
    found locally and why the hub could not help, and listing the named backbones.
    """
    if name_or_path in TINY_CONFIGS or name_or_path in _toy_configs():
        if tokenizer is None:
            raise ValueError(
                f"backbone {name_or_path!r} is built from a config and needs a tokenizer"
            )
        return build_tiny_model(name_or_path, tokenizer, **kwargs)
    _toy_module()  # registers the toy architectures, so a saved toy model loads from a folder
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    names = f"named backbones: {', '.join(backbone_names())}"
    if looks_like_path(name_or_path):
        raise OSError(f"backbone folder {name_or_path!r} does not exist ({names})")
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
