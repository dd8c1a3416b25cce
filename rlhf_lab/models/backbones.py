"""Backbones: named tiny configs for CPU research, and any local Hugging Face causal LM."""

from __future__ import annotations

import os

from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel, PreTrainedTokenizerBase

# Randomly initialised configs sized to train in seconds on a laptop CPU. Dropout is off: RL
# needs the log-probs recorded at sampling to equal the ones recomputed for the update.
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
    ),
}


def build_tiny_model(name: str, tokenizer: PreTrainedTokenizerBase, **overrides) -> PreTrainedModel:
    """A randomly initialised causal LM from a named tiny config, sized to `tokenizer`."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown backbone '{name}'; choose from: {', '.join(TINY_CONFIGS)}")
    spec = {**TINY_CONFIGS[name], **overrides}
    family = spec.pop("family")
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "gpt2":
        config = GPT2Config(**ids, **spec)
    else:  # pragma: no cover - guarded by the registry above
        raise ValueError(f"backbone family '{family}' has no builder")
    return AutoModelForCausalLM.from_config(config)


def load_backbone(name_or_path: str, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A named tiny config (needs `tokenizer`), or an HF causal LM from a folder or hub name."""
    if name_or_path in TINY_CONFIGS:
        if tokenizer is None:
            raise ValueError(f"backbone '{name_or_path}' is built from a config and needs a tokenizer")
        return build_tiny_model(name_or_path, tokenizer)
    if not os.path.isdir(name_or_path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise OSError(
            f"backbone '{name_or_path}' is neither a named tiny config ({', '.join(TINY_CONFIGS)}) "
            "nor a local folder, and HF_HUB_OFFLINE=1 forbids the hub"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"could not load backbone '{name_or_path}': not a local folder with a model, and the "
            f"hub could not provide it ({type(err).__name__})"
        ) from None
