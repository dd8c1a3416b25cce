"""Model folders on disk: the pieces `Policy.save` writes and `Policy.load` reads.

A policy folder is a Hugging Face folder plus a few files of our own:

    config.json, model.safetensors    the model (`save_pretrained`); or, with a LoRA adapter,
    adapter_config.json,              the peft adapter, whose base is `base/` inside the folder
    adapter_model.safetensors         or a local folder the metadata names
    tokenizer files
    scalar_head.safetensors           the value / score head, when there is one
    critic/                           a separate critic (itself a policy folder), or the critic
                                      adapter and its value head
    rlhf_lab_policy.json              metadata: scalar_head, critic, base_model, base_fingerprint,
                                      merged_adapter, plus what the caller adds (a stage's config)

These helpers know models and folders, not the Policy. Every load registers the toy models
first (`rlhf_lab.models.toy.ensure_registered`), so a folder holding one loads in a fresh process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf_lab.errors import CheckpointError
from rlhf_lab.models.lora import base_state_dict, load_adapter, save_adapter, weights_fingerprint

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_FILE", "BASE_DIR", "CRITIC_ADAPTER", "CRITIC_DIR", "HEAD_FILE", "POLICY_FILE",
    "check_base_fingerprint", "find_base", "is_adapter_folder", "load_head", "load_lora_model", "load_model",
    "read_meta", "save_critic_adapter", "save_head", "save_model", "write_meta",
]

HEAD_FILE = "scalar_head.safetensors"
POLICY_FILE = "rlhf_lab_policy.json"
CRITIC_DIR = "critic"
BASE_DIR = "base"  # a LoRA policy's base model, inside its folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
CRITIC_ADAPTER = "critic"  # the name a saved critic adapter gets on the policy's base

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ metadata
def read_meta(path: str) -> dict:
    """The folder's `rlhf_lab_policy.json`, or {} for a folder without one (any HF folder)."""
    meta_path = os.path.join(path, POLICY_FILE)
    if not os.path.exists(meta_path):
        return {}
    with open(meta_path) as f:
        return json.load(f)


def write_meta(path: str, meta: dict) -> None:
    with open(os.path.join(path, POLICY_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=str)


def is_adapter_folder(path: str) -> bool:
    """Whether `path` holds a peft adapter (and so is restored as a base plus that adapter)."""
    return os.path.exists(os.path.join(path, ADAPTER_CONFIG))


# ------------------------------------------------------------------ loading
def load_model(path: str) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path)`, with the toy architectures known."""
    from rlhf_lab.models.toy import ensure_registered

    ensure_registered()
    return AutoModelForCausalLM.from_pretrained(path)


def find_base(path: str, meta: dict) -> str:
    """The base model folder of the LoRA folder `path`: the folder its metadata names, else its
    `base/`, else (for a folder peft wrote) the local `base_model_name_or_path` of its adapter config."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        peft_named = json.load(f).get("base_model_name_or_path") or ""
    named = meta.get("base_model")
    # The metadata's own choice first: a stale base/ left by an earlier save must not win over it.
    candidates = [os.path.join(path, named) if named else "", os.path.join(path, BASE_DIR), peft_named]
    for base_dir in candidates:
        if base_dir and os.path.isdir(base_dir):
            return base_dir
    raise OSError(f"LoRA policy '{path}' has no base model: no '{BASE_DIR}/' inside it, and neither the folder "
                  f"its metadata names ({named!r}) nor its adapter's base ({peft_named!r}) exists")


def load_lora_model(path: str, meta: dict, check_base: bool = True) -> PeftModel:
    """The LoRA folder `path` as its base (see `find_base`) wrapped with its adapter, trainable.

    The base must hold the weights the adapter was trained on: a base whose fingerprint differs
    from the one the metadata recorded at save time is refused (`CheckpointError`), unless
    `check_base=False`. A folder saved before fingerprints were recorded loads with a warning.
    """
    base_dir = find_base(path, meta)
    base = load_model(base_dir)
    if check_base:
        check_base_fingerprint(path, base_dir, base, meta.get("base_fingerprint"))
    return load_adapter(base, path)


def check_base_fingerprint(path: str, base_dir: str, base: PreTrainedModel, recorded: str | None) -> None:
    """Refuse a base that is not the one the LoRA adapter in `path` was saved with (see `load_lora_model`)."""
    if recorded is None:
        log.warning("LoRA policy '%s' records no fingerprint of its base (it was saved before rlhf_lab "
                    "recorded one), so nothing checks that '%s' still holds the weights its adapter was "
                    "trained on", path, base_dir)
        return
    found = weights_fingerprint(base.state_dict())
    if found != recorded:
        raise CheckpointError(
            f"the base model of LoRA policy '{path}' changed since its adapter was trained: '{base_dir}' no "
            f"longer holds the weights the adapter was saved with (base fingerprint {recorded[:19]}..., "
            f"now {found[:19]}...); was it overwritten by another run? Restore that base, or, to put the "
            f"adapter on this base anyway, use Policy.load_adapter('{base_dir}', '{path}')")


def load_head(head: nn.Linear, file: str) -> None:
    head.load_state_dict(load_file(file))


# ------------------------------------------------------------------ saving
def save_head(head: nn.Linear, file: str, state: dict | None = None) -> None:
    """Write the head's weights (or `state`, its state dict gathered from a sharded run)."""
    state = head.state_dict() if state is None else state
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, file)


def save_model(model: PreTrainedModel, path: str, adapter_name: str | None = None, merge: bool = False,
               save_base: bool | None = None, state_dict: dict | None = None) -> dict:
    """Write `model` to the folder `path`; returns the metadata entries that describe what was written.

    Without `adapter_name`: `model.save_pretrained(path)`. With it (`model` is then a PeftModel):
    `merge=True` writes a plain HF model with that adapter merged into the weights
    (`W + (α / r) B A`, metadata `merged_adapter`); otherwise the adapter alone plus its base,
    which `save_base` places (see `_save_base`, metadata `base_model`), and the fingerprint of the
    base's weights (metadata `base_fingerprint`, checked on load). Adapter files an earlier
    save left in `path` are removed when no adapter is written, so loading never mistakes the
    folder for an adapter folder. `state_dict` (no adapter) is written instead of the model's own:
    the whole weights a sharded run gathered.
    """
    meta: dict = {}
    if adapter_name is None:
        model.save_pretrained(path, state_dict=state_dict)
    elif merge:
        model.get_base_model().save_pretrained(path, state_dict=base_state_dict(model, merge_adapter=adapter_name))
        meta["merged_adapter"] = model.peft_config[adapter_name].to_dict()
    else:
        save_adapter(model, adapter_name, path)
        meta["base_model"] = _save_base(model, path, save_base)
        meta["base_fingerprint"] = weights_fingerprint(base_state_dict(model))
    if adapter_name is None or merge:
        for name in (ADAPTER_CONFIG, ADAPTER_FILE):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    return meta


def _save_base(model: PeftModel, path: str, save_base: bool | None) -> str:
    """Write the base to `path/base/`, or name the folder it came from; returns what the metadata names.

    `save_base=True` writes `base/`; False names the local folder the base was loaded from (it
    must still exist when loading); None names that folder when there is one, else writes `base/`.
    """
    base = model.get_base_model()
    source = getattr(base, "name_or_path", "") or ""
    known = os.path.abspath(source) if source and os.path.isdir(source) else None
    if save_base is None:
        save_base = known is None
    if save_base:
        base.save_pretrained(os.path.join(path, BASE_DIR), state_dict=base_state_dict(model))
        return BASE_DIR
    if known is None:
        raise ValueError(f"save_base=False names the base's folder, but this base was not loaded "
                         f"from a local folder (name_or_path={source!r}); save it with save_base=True")
    stale = os.path.join(path, BASE_DIR)
    if os.path.isdir(stale):  # an earlier save into this folder wrote a base; it is not this one
        shutil.rmtree(stale)
    return known


def save_critic_adapter(model: PeftModel, adapter_name: str, head: nn.Linear, folder: str) -> None:
    """Write a critic adapter and its value head to `folder` (a policy folder's `critic/`)."""
    save_adapter(model, adapter_name, folder)
    save_head(head, os.path.join(folder, HEAD_FILE))
