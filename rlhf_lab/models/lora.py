"""LoRA adapters on any Hugging Face causal LM, through peft (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models").

A LoRA layer keeps the base weight W frozen and learns a low-rank update, so the layer computes
`W x + (α / r) · B A x` with A: (r, in), B: (out, r), and B initialised to zero: a fresh adapter
is exactly the base model. Disabling the adapter gives the base back without a second copy of
its weights, which is how the Policy serves its reference (and, with a second adapter, its
critic) from one base in memory.

This module holds the settings, the per-architecture default targets and small helpers over a
`peft.PeftModel` (adapter parameters, a clean base state dict, a merged one); the Policy decides
when to use them.

peft, torch and transformers are imported inside the helpers, not at the top: `LoraSettings` is
part of the configs the CLI builds, and a run without LoRA never loads peft at all.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_lab.checks import check_positive

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from torch import nn

# The attention projections LoRA adapts by default, per `config.model_type` (the choice of the
# LoRA paper: query and value; GPT-2 and GPT-NeoX fuse q, k, v into one projection).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "rlhf_lab_attention": ["qkv"],  # the toy one-head attention LM (models/toy.py), fused like GPT-2
}
# The toy bigram and LSTM LMs ("rlhf_lab_bigram", "rlhf_lab_lstm") have no default: their only
# layers LoRA can wrap are the embedding and the output head, a choice left to the user.


def _adaptable_types() -> tuple[type, ...]:
    """The layer types peft's LoRA can wrap; used to check targets and suggest names in errors."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, Conv1D)


@dataclass
class LoraSettings:
    """What a LoRA adapter adapts and how large it is."""

    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # scale: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (RL stages zero it, like every dropout)
    target_modules: list[str] | None = None  # module names to adapt; None = DEFAULT_TARGET_MODULES

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ValueError(f"r must be an int, got {self.r!r}")
        check_positive("r", self.r)
        check_positive("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
            self.target_modules = list(self.target_modules)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def default_target_modules(model_type: str) -> list[str]:
    """`DEFAULT_TARGET_MODULES[model_type]`, or a ValueError that says what to pass instead."""
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"no default LoRA target modules for model_type '{model_type}'; pass "
                         f"target_modules=[...] (defaults exist for: {', '.join(DEFAULT_TARGET_MODULES)})")
    return list(DEFAULT_TARGET_MODULES[model_type])


def _adaptable_names(model: nn.Module) -> list[str]:
    """Last name component of every layer LoRA could wrap, e.g. ['c_attn', 'c_proj', 'lm_head']."""
    adaptable = _adaptable_types()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, adaptable)}
    return sorted(names)


def lora_config(model: nn.Module, settings: LoraSettings) -> LoraConfig:
    """The peft `LoraConfig` of `settings` for this model, with its targets checked against it."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    model_type = _model_type(model)
    try:
        targets = settings.target_modules or default_target_modules(model_type)
    except ValueError as err:
        raise ValueError(f"{err}; layers LoRA can adapt here: {_adaptable_names(model) or 'none'}") from None
    # peft's rule for a list of names: a module is adapted when its dotted name ends with one.
    found = [m for name, m in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]
    if not found:
        raise ValueError(f"LoRA target_modules {targets} match no layer of model_type '{model_type}'; "
                         f"layers LoRA can adapt here: {_adaptable_names(model) or 'none'}")
    unsupported = sorted({type(m).__name__ for m in found if not isinstance(m, _adaptable_types())})
    if unsupported:
        raise ValueError(f"LoRA target_modules {targets} of model_type '{model_type}' name {', '.join(unsupported)} "
                         f"layers, which LoRA cannot adapt; choose from: {_adaptable_names(model) or 'none'}")
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        # GPT-2's Conv1D stores its weight as (in, out); peft must know to transpose the update.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in found),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, settings: LoraSettings, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` (in place) with a fresh LoRA adapter; only the adapter's weights train.

    The adapter starts at B = 0, so the wrapped model computes exactly what `model` did.
    """
    from peft import get_peft_model

    if is_peft_model(model):
        raise ValueError("model already has LoRA adapters (it is a PeftModel); add another with add_adapter")
    config = lora_config(model, settings)
    with _quiet_peft():
        return get_peft_model(model, config, adapter_name=adapter_name)


def load_adapter(model: nn.Module, folder: str, adapter_name: str = "default") -> PeftModel:
    """Put the adapter saved in `folder` on `model` (a plain model, or a PeftModel to add it to), trainable."""
    from peft import PeftModel

    with _quiet_peft():
        if is_peft_model(model):
            model.load_adapter(folder, adapter_name=adapter_name, is_trainable=True)
            return model
        return PeftModel.from_pretrained(model, folder, adapter_name=adapter_name, is_trainable=True)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel`, without importing peft: none exists until peft is loaded."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextlib.contextmanager
def _quiet_peft():
    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_adapter(model: PeftModel, adapter_name: str, like: str | None = None,
                settings: LoraSettings | None = None) -> None:
    """Add a fresh adapter `adapter_name` to `model`, with `settings` or the config of adapter `like`."""
    if settings is not None:
        config = lora_config(model.get_base_model(), settings)
    else:
        config = copy.deepcopy(model.peft_config[like or model.active_adapter])
        config.inference_mode = False
    model.add_adapter(adapter_name, config)


def copy_adapter(model: PeftModel, source: str, target: str) -> None:
    """Add adapter `target` holding a copy of adapter `source`'s weights (adapter-sized, not base-sized)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    add_adapter(model, target, like=source)
    state = get_peft_model_state_dict(model, adapter_name=source, save_embedding_layers=False)
    set_peft_model_state_dict(model, {k: v.detach().clone() for k, v in state.items()}, adapter_name=target)


def save_adapter(model: PeftModel, adapter_name: str, folder: str) -> None:
    """Write one adapter as a peft folder (`adapter_config.json`, `adapter_model.safetensors`).

    Unlike `PeftModel.save_pretrained`, any adapter lands in `folder` itself (peft puts adapters
    other than "default" in a sub-folder), so `PeftModel.from_pretrained(base, folder)` reads it.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(folder)


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The parameters of one adapter (its A and B matrices in every adapted layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn

    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layers = getattr(module, layer_name)
                if adapter_name in layers:
                    sub = layers[adapter_name]
                    params.extend(sub.parameters() if isinstance(sub, nn.Module) else [sub])
    return params


def adapter_is_zero(model: nn.Module, adapter_name: str) -> bool:
    """Whether the adapter's update B A is exactly zero (a fresh adapter): then it changes nothing."""
    from peft.tuners.lora import LoraLayer
    from torch import nn

    found = False
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for layer_name in ("lora_B", "lora_embedding_B"):
                layers = getattr(module, layer_name, {})
                if adapter_name in layers:
                    found = True
                    sub = layers[adapter_name]
                    weights = sub.parameters() if isinstance(sub, nn.Module) else [sub]
                    if any(bool(w.detach().any()) for w in weights):
                        return False
    return found


def _is_adapter_key(key: str) -> bool:
    return any(part.startswith("lora_") for part in key.split("."))


def base_state_dict(model: PeftModel, merge_adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own (un-peft-ed) names, optionally with one adapter merged.

    Without `merge_adapter` the tensors are the live base weights (no copy); with it, each adapted
    weight becomes `W + (α / r) B A` (a new tensor) and the result loads into the plain model class.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        if merge_adapter is not None:
            for name, module in base.named_modules():
                if isinstance(module, LoraLayer) and (merge_adapter in module.lora_A
                                                      or merge_adapter in module.lora_embedding_A):
                    deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(merge_adapter)
        state = {}
        for key, value in base.state_dict().items():
            if _is_adapter_key(key):
                continue
            if key in deltas:
                value = value + deltas[key].to(value.dtype)
            state[key.replace(".base_layer.", ".")] = value
    return state


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """'sha256:<hex>' over a state dict: each tensor's name, shape and values, in name order.

    A LoRA policy records its base's fingerprint when saved, so a load can tell that the base
    folder still holds the weights the adapter was trained on. It depends on the values only, not
    on how they were stored (one file or shards) or loaded: floating tensors of 32 bits or fewer
    are hashed as float32, which holds a bf16 or fp16 value exactly. It reads every byte once
    (about a second per GB).
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.is_floating_point() and tensor.element_size() <= 4:
            tensor = tensor.float()
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers.

    Tensors that share memory (tied embeddings, a reference that runs the policy's own base
    weights) are counted once, so this measures what the module really holds, unlike
    `sum(p.numel() * p.element_size())`.
    """
    storages: dict[int, int] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())
