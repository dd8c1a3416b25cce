"""The Policy: the one door to a model, shared by every stage.

It wraps any Hugging Face causal LM and its tokenizer, with an optional LoRA adapter, an optional
scalar head (a PPO critic's value head, or a reward model's score head), an optional reference
and an optional critic. Stages never call the model themselves; the Policy never knows which
algorithm uses it.

With a LoRA adapter (`lora=LoraSettings(...)`) one frozen base serves everything: the policy is
base + adapter "default", the reference is the same base with the adapter disabled, and a PPO
critic (`critic="adapter"`) is base + adapter "critic" + a value head. Nothing is copied.

Alignment convention (see `rlhf_lab.rollout`): per-token outputs are `(B, T)` over the whole
sequence and column t refers to token t — `logprobs[:, t] = log π(x_t | x_<t)` and
`values[:, t] = V(x_<t)`, the value of the state in which x_t was chosen. Column 0 has no
context and is 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_lab.models.lora import (
    LoraSettings,
    adapter_is_zero,
    adapter_parameters,
    add_adapter,
    apply_lora,
    base_state_dict,
    copy_adapter,
    load_adapter,
)
from rlhf_lab.models.lora import save_adapter as write_adapter
from rlhf_lab.models.tokenizer import load_tokenizer
from rlhf_lab.rollout import Rollout

log = logging.getLogger(__name__)

HEAD_FILE = "scalar_head.safetensors"
POLICY_FILE = "rlhf_lab_policy.json"
CRITIC_DIR = "critic"
BASE_DIR = "base"  # a LoRA policy's base model, inside its folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
CRITIC_ADAPTER = "critic"  # the PPO critic's adapter on the policy's base
REFERENCE_ADAPTER = "reference"  # a frozen copy of a non-zero initial policy adapter


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens with mass ≥ top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the top token always stays.
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _new_head(hidden: int) -> nn.Linear:
    head = nn.Linear(hidden, 1)
    # A small init keeps the first values/scores near 0, so early updates are sane.
    nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    return head


def _save_head(head: nn.Linear, file: str) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, file)


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, POLICY_FILE)
    if not os.path.exists(meta_path):
        return {}
    with open(meta_path) as f:
        return json.load(f)


def _load_base(path: str, meta: dict) -> PreTrainedModel:
    """The base model of the LoRA folder `path`: its `base/`, else the folder its metadata names,
    else (for a folder peft wrote) the local `base_model_name_or_path` of its adapter config."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        peft_named = json.load(f).get("base_model_name_or_path") or ""
    named = meta.get("base_model")
    # The metadata's own choice first: a stale base/ left by an earlier save must not win over it.
    candidates = [os.path.join(path, named) if named else "", os.path.join(path, BASE_DIR), peft_named]
    for base_dir in candidates:
        if base_dir and os.path.isdir(base_dir):
            return AutoModelForCausalLM.from_pretrained(base_dir)
    raise OSError(f"LoRA policy '{path}' has no base model: no '{BASE_DIR}/' inside it, and neither the folder "
                  f"its metadata names ({named!r}) nor its adapter's base ({peft_named!r}) exists")


def _restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


class Policy(nn.Module):
    """A causal LM with generation, log-probs, values and a reference, behind one interface.

    Args:
        model: any Hugging Face causal LM (`AutoModelForCausalLM`), or one already wrapped with a
            LoRA adapter (a `peft.PeftModel`: its active adapter becomes the policy's adapter).
        tokenizer: its tokenizer; a missing pad token is set to EOS.
        scalar_head: add a linear head on the last hidden state, read per token by `values`
            (PPO's critic) or at the last real token by `scores` (a reward model).
        reference: the frozen policy `ref_logprobs` scores against.
            "copy": the policy as constructed. Without an adapter, a frozen copy of the weights.
            With one, no base weight is copied: a fresh adapter (B = 0) changes nothing, so the
            adapter-disabled base *is* the initial policy; a loaded, trained adapter gets a
            frozen copy of the adapter alone (adapter "reference") on the same base.
            "base": the adapter-disabled base, whatever the adapter holds (needs an adapter).
            None: no reference.
        critic: where `values` come from instead of a head on this model. A `Policy` with a
            scalar head (its own model, e.g. loaded from a reward model as in Ouyang et al. 2022;
            it must share the tokenizer), or "adapter": a second LoRA adapter ("critic") on this
            policy's frozen base with its own value head (needs an adapter). Either way the value
            loss never reaches the policy's weights; `critic_parameters()` lists the critic's.
        lora: wrap `model` with a fresh LoRA adapter (Hu et al. 2021); the base weights are then
            frozen and only the adapters and the heads train.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scalar_head: bool = False,
        reference: str | None = None,
        critic: Policy | str | None = None,
        lora: LoraSettings | None = None,
    ):
        super().__init__()
        if reference not in (None, "copy", "base"):
            raise ValueError(f"reference must be None, 'copy' or 'base', got {reference!r}")
        if isinstance(critic, str) and critic != "adapter":
            raise ValueError(f"critic must be a Policy, 'adapter' or None, got {critic!r}")
        if isinstance(critic, Policy):
            critic._require_head("values")
            if critic.tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError("critic must use the same tokenizer (vocabulary) as the policy")
        if lora is not None:
            model = apply_lora(model, lora)
        adapter = model.active_adapter if isinstance(model, PeftModel) else None
        if adapter is None and reference == "base":
            raise ValueError("reference='base' is the adapter-disabled base and needs a LoRA adapter "
                             "(lora=LoraSettings()); use reference='copy' for a frozen copy")
        if adapter is None and critic == "adapter":
            raise ValueError("critic='adapter' needs a LoRA adapter on the policy (lora=LoraSettings())")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self.adapter_name: str | None = adapter  # the policy's LoRA adapter, None = full fine-tuning
        hidden = model.config.get_text_config().hidden_size
        self.scalar_head = _new_head(hidden) if scalar_head else None
        self.critic: Policy | None = critic if isinstance(critic, Policy) else None
        self.critic_adapter: str | None = None
        self.critic_head: nn.Linear | None = None  # the value head read on the critic adapter's states
        if critic == "adapter":
            if CRITIC_ADAPTER not in model.peft_config:
                add_adapter(model, CRITIC_ADAPTER, like=adapter)
            self.critic_adapter = CRITIC_ADAPTER
            self.critic_head = _new_head(hidden)
        self.reference_mode = reference
        self.reference: PreTrainedModel | None = None  # the frozen copy, when the reference is one
        self._reference_adapter: str | None = None  # with an adapter: None runs the base, adapters off
        if reference == "copy" and adapter is None:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        elif reference == "copy" and not adapter_is_zero(model, adapter):
            copy_adapter(model, adapter, REFERENCE_ADAPTER)
            self._reference_adapter = REFERENCE_ADAPTER
        if adapter is not None:
            # The base (and a reference adapter) stay frozen; the policy and critic adapters train.
            model.requires_grad_(False)
            for name in (adapter, self.critic_adapter):
                if name is not None:
                    for p in adapter_parameters(model, name):
                        p.requires_grad_(True)

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def load(cls, path: str, scalar_head: bool | None = None, reference: str | None = None,
             critic: Policy | str | None = None, lora: LoraSettings | None = None) -> Policy:
        """Load a folder written by `save` (or any HF causal-LM folder with a tokenizer).

        `scalar_head=None` restores a head exactly when the folder has one; True adds a fresh
        head when it has none (e.g. a reward model started from an SFT policy). A saved critic
        (a separate model, or a critic adapter, in `critic/`) is restored unless `critic` is given.
        A LoRA folder (one with `adapter_config.json`) is restored as its base plus the adapter:
        the base from `base/` inside it, else from the folder its metadata names. `lora` wraps
        the model of a plain folder with a fresh adapter.
        """
        if not os.path.isdir(path):
            raise OSError(f"policy folder '{path}' does not exist")
        meta = _read_meta(path)
        tokenizer = load_tokenizer(path)
        critic_path = os.path.join(path, CRITIC_DIR)
        saved_critic_adapter = meta.get("critic") == "adapter"
        if os.path.exists(os.path.join(path, ADAPTER_CONFIG)):
            if lora is not None:
                raise ValueError(f"'{path}' already holds a LoRA adapter; load it without lora=")
            model = load_adapter(_load_base(path, meta), path)
            if critic is None and saved_critic_adapter:
                load_adapter(model, critic_path, adapter_name=CRITIC_ADAPTER)
                critic = "adapter"
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
        if critic is None and os.path.isdir(critic_path) and not saved_critic_adapter:
            critic = cls.load(critic_path)
        head_path = os.path.join(path, HEAD_FILE)
        has_head = os.path.exists(head_path)
        policy = cls(model, tokenizer, scalar_head=has_head if scalar_head is None else scalar_head,
                     reference=reference, critic=critic, lora=lora)
        if has_head and policy.scalar_head is not None:
            policy.scalar_head.load_state_dict(load_file(head_path))
        critic_head_path = os.path.join(critic_path, HEAD_FILE)
        if saved_critic_adapter and policy.critic_head is not None and os.path.exists(critic_head_path):
            policy.critic_head.load_state_dict(load_file(critic_head_path))
        return policy

    @classmethod
    def load_adapter(cls, base: str | Policy, adapter_path: str, **kwargs) -> Policy:
        """A Policy of a base plus the LoRA adapter in `adapter_path` (written by `save_adapter`).

        `base` is an HF folder with a tokenizer, or a Policy without an adapter (its model is
        wrapped in place, so use the returned Policy from then on). `kwargs` go to the
        constructor (`scalar_head`, `reference`, `critic`).
        """
        if not os.path.exists(os.path.join(adapter_path, ADAPTER_CONFIG)):
            raise OSError(f"'{adapter_path}' holds no LoRA adapter ({ADAPTER_CONFIG} is missing)")
        if isinstance(base, Policy):
            if base.adapter_name is not None:
                raise ValueError("base Policy already has an adapter; pass one without")
            model, tokenizer = base.model, base.tokenizer
        else:
            if not os.path.isdir(base):
                raise OSError(f"base model folder '{base}' does not exist")
            model, tokenizer = AutoModelForCausalLM.from_pretrained(base), load_tokenizer(base)
        return cls(load_adapter(model, adapter_path), tokenizer, **kwargs)

    def save(self, path: str, extra: dict | None = None, merge: bool = False,
             save_base: bool | None = None) -> None:
        """Write an HF folder: model, tokenizer, the scalar head if any, and `extra` metadata.

        With a LoRA adapter the folder is a peft adapter folder (`adapter_config.json`,
        `adapter_model.safetensors`; a critic adapter and its value head go to `critic/`) plus
        its base. `save_base=True` writes the base to `base/`; False only names, in the metadata,
        the local folder the base was loaded from (it must still exist when loading); None (the
        default) names that folder when there is one and writes `base/` otherwise.
        `merge=True` writes instead a plain HF model with the policy adapter merged into the
        weights (`W + (α / r) B A`), which `AutoModelForCausalLM.from_pretrained` loads; a critic
        adapter is not part of it (a separate critic model is).
        """
        os.makedirs(path, exist_ok=True)
        meta: dict = {"scalar_head": self.scalar_head is not None}
        lora = self.adapter_name is not None and not merge
        if self.adapter_name is None:
            self.model.save_pretrained(path)
        elif merge:
            self.model.get_base_model().save_pretrained(
                path, state_dict=base_state_dict(self.model, merge_adapter=self.adapter_name))
            meta["merged_adapter"] = self.model.peft_config[self.adapter_name].to_dict()
        else:
            self.save_adapter(path)
            meta["base_model"] = self._save_base(path, save_base)
        if not lora:  # a stale adapter file would make `load` read the folder as an adapter
            for name in (ADAPTER_CONFIG, ADAPTER_FILE):
                if os.path.exists(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
        self.tokenizer.save_pretrained(path)
        if self.scalar_head is not None:
            _save_head(self.scalar_head, os.path.join(path, HEAD_FILE))
        if self.critic is not None:
            self.critic.save(os.path.join(path, CRITIC_DIR), extra={"role": "critic"})
        elif self.critic_adapter is not None and lora:
            write_adapter(self.model, self.critic_adapter, os.path.join(path, CRITIC_DIR))
            _save_head(self.critic_head, os.path.join(path, CRITIC_DIR, HEAD_FILE))
        meta["critic"] = "adapter" if self.critic_adapter is not None and lora else self.critic is not None
        meta.update(extra or {})
        with open(os.path.join(path, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2, default=str)

    def save_adapter(self, path: str) -> None:
        """Write the policy's LoRA adapter alone (a peft folder); `Policy.load_adapter` puts it on a base."""
        if self.adapter_name is None:
            raise ValueError("this Policy has no LoRA adapter to save (construct it with lora=LoraSettings())")
        write_adapter(self.model, self.adapter_name, path)

    def _save_base(self, path: str, save_base: bool | None) -> str:
        """Write the base to `path/base/`, or name the folder it came from; returns what the metadata names."""
        base = self.model.get_base_model()
        source = getattr(base, "name_or_path", "") or ""
        known = os.path.abspath(source) if source and os.path.isdir(source) else None
        if save_base is None:
            save_base = known is None
        if save_base:
            base.save_pretrained(os.path.join(path, BASE_DIR), state_dict=base_state_dict(self.model))
            return BASE_DIR
        if known is None:
            raise ValueError(f"save_base=False names the base's folder, but this base was not loaded "
                             f"from a local folder (name_or_path={source!r}); save it with save_base=True")
        stale = os.path.join(path, BASE_DIR)
        if os.path.isdir(stale):  # an earlier save into this folder wrote a base; it is not this one
            shutil.rmtree(stale)
        return known

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def has_separate_critic(self) -> bool:
        """Whether `values` come from weights the policy loss never trains (a critic model or adapter)."""
        return self.critic is not None or self.critic_adapter is not None

    def critic_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters only `values` uses: a separate critic's, or the critic adapter and its head.

        Empty when the values come from a head on the policy's own trunk, which the policy loss
        trains too.
        """
        if self.critic is not None:
            return self.critic.trainable_parameters()
        if self.critic_adapter is not None:
            params = adapter_parameters(self.model, self.critic_adapter) + list(self.critic_head.parameters())
            return [p for p in params if p.requires_grad]
        return []

    def actor_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside `critic_parameters()`: the policy's (and a shared-trunk head's)."""
        critic = {id(p) for p in self.critic_parameters()}
        return [p for p in self.trainable_parameters() if id(p) not in critic]

    def disable_dropout(self) -> Policy:
        """Zero every dropout rate, so sampling and the update see the same distribution."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return self

    @contextlib.contextmanager
    def eager_attention(self):
        """Use plain-matmul attention inside the block.

        Fused SDPA kernels have no double backward on CPU, which TRPO's Fisher-vector product
        needs; eager attention computes the same function with ordinary differentiable ops.
        """
        model = self.model
        previous = getattr(model.config, "_attn_implementation", None)
        if previous in (None, "eager") or not hasattr(model, "set_attn_implementation"):
            yield
            return
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation(previous)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ text helpers
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask, so every prompt ends at the same column."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def decode_responses(self, rollout_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Decode each row's response tokens, dropping special tokens (EOS, padding)."""
        rows = [ids[m.bool()].tolist() for ids, m in zip(rollout_ids, response_mask, strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # ------------------------------------------------------------------ forward passes
    def _forward(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 hidden: bool = False):
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=hidden,
            use_cache=False,
        )

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                        with_entropy: bool):
        logits = logits[:, :-1].float() / temperature  # (B, T-1, V) predicts tokens 1..T-1
        logp_all = logits.log_softmax(dim=-1)
        logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        logp = nn.functional.pad(logp, (1, 0))  # column 0 has no context
        if not with_entropy:
            return logp, None
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
        return logp, nn.functional.pad(entropy, (1, 0))

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 temperature: float = 1.0, return_entropy: bool = False):
        """Teacher-forced log-prob of each token given the ones before it.

        Shape: input (B, T) → (B, T), column 0 is 0. With `return_entropy` also returns the
        entropy (nats) of the next-token distribution each token was drawn from, (B, T).
        """
        out = self._forward(self.model, input_ids, attention_mask)
        logp, entropy = self._token_logprobs(out.logits, input_ids, temperature, return_entropy)
        return (logp, entropy) if return_entropy else logp

    def logprobs_and_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            temperature: float = 1.0):
        """`(logprobs, entropy, values)`: what a PPO update needs (one pass without a separate critic)."""
        if self.has_separate_critic:
            logp, entropy = self.logprobs(input_ids, attention_mask, temperature, return_entropy=True)
            return logp, entropy, self.values(input_ids, attention_mask)
        self._require_head("logprobs_and_values")
        out = self._forward(self.model, input_ids, attention_mask, hidden=True)
        logp, entropy = self._token_logprobs(out.logits, input_ids, temperature, True)
        return logp, entropy, self._values_from_hidden(out.hidden_states[-1], self.scalar_head)

    @property
    def has_reference(self) -> bool:
        """Whether `ref_logprobs` works (`reference` is "copy" or "base")."""
        return self.reference_mode is not None

    @contextlib.contextmanager
    def _adapter(self, name: str | None):
        """Run the model with adapter `name` active (None: every adapter off), then the policy's again.

        peft's switches also set requires_grad (only the active adapter trains); the flags are put
        back at once, so the policy and critic adapters both stay trainable whichever one runs.
        """
        model = self.model
        if name == self.adapter_name:
            yield
            return
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            if name is None:
                with model.disable_adapter():
                    _restore_requires_grad(flags)
                    yield
            else:
                model.set_adapter(name)
                _restore_requires_grad(flags)
                yield
        finally:
            if name is not None:
                model.set_adapter(self.adapter_name)
            _restore_requires_grad(flags)

    @torch.no_grad()
    def ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
        """`logprobs` under the frozen reference policy (in eval mode, like a frozen copy). Shape: (B, T)."""
        if not self.has_reference:
            raise ValueError("this Policy has no reference (construct it with reference='copy')")
        if self.reference is not None:
            out = self._forward(self.reference, input_ids, attention_mask)
        else:  # the shared base, adapter off (or the frozen reference adapter on)
            was_training = self.model.training
            self.model.eval()
            try:
                with self._adapter(self._reference_adapter):
                    out = self._forward(self.model, input_ids, attention_mask)
            finally:
                self.model.train(was_training)
        return self._token_logprobs(out.logits, input_ids, temperature, False)[0]

    @property
    def has_values(self) -> bool:
        """Whether `values` works: a separate critic, a critic adapter or a scalar head on this model."""
        return self.has_separate_critic or self.scalar_head is not None

    def _require_head(self, what: str) -> None:
        if what == "values" and self.has_separate_critic:
            return
        if self.scalar_head is None:
            raise ValueError(f"Policy.{what} needs a scalar head (construct with scalar_head=True)")

    @staticmethod
    def _values_from_hidden(hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        v = head(hidden[:, :-1].to(head.weight.dtype)).squeeze(-1)
        return nn.functional.pad(v.float(), (1, 0))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token values `values[:, t] = V(x_<t)`, from the critic or the head. Shape: (B, T)."""
        if self.critic is not None:
            return self.critic.values(input_ids, attention_mask)
        if self.critic_adapter is not None:
            with self._adapter(self.critic_adapter):
                out = self._forward(self.model, input_ids, attention_mask, hidden=True)
            return self._values_from_hidden(out.hidden_states[-1], self.critic_head)
        self._require_head("values")
        out = self._forward(self.model, input_ids, attention_mask, hidden=True)
        return self._values_from_hidden(out.hidden_states[-1], self.scalar_head)

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence: the head read at the last real (non-pad) token. Shape: (B,)."""
        self._require_head("scores")
        out = self._forward(self.model, input_ids, attention_mask, hidden=True)
        hidden = out.hidden_states[-1]  # (B, T, H)
        t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * t).argmax(dim=1)  # index of the last 1 in each row
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.scalar_head(picked.to(self.scalar_head.weight.dtype)).squeeze(-1).float()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        samples_per_prompt: int = 1,
        suppress_eos: bool = False,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample responses for a batch of prompts, with a KV cache, stopping at EOS.

        Prompts are left-padded so every row's next token sits in the same column; each step feeds
        one token per row and reuses the cache, so a response of n tokens costs one prompt pass
        and n single-token passes. Each prompt is repeated `samples_per_prompt` times in adjacent
        rows (`group_ids` names the prompt). The recorded `logprobs` are those of the
        temperature-scaled full distribution (before top-p truncation and EOS suppression), so
        they equal `logprobs(..., temperature)` recomputed on the returned sequences.
        `suppress_eos` forbids EOS (fixed-length responses, as in the benchmark).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, max_new_tokens, temperature if not greedy else 1.0,
                                  top_p, greedy, samples_per_prompt, suppress_eos, generator)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts, max_new_tokens, temperature, top_p, greedy, samples_per_prompt,
                  suppress_eos, generator) -> Rollout:
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and prompt_ids.shape[1] + max_new_tokens > limit:
            # Keep the end of each prompt (next to the answer) so prompt + response fits the model.
            keep = limit - max_new_tokens
            if keep < 1:
                raise ValueError(f"max_new_tokens = {max_new_tokens} leaves no room for a prompt in the "
                                 f"model's {limit} positions")
            n_cut = int((prompt_mask.sum(dim=1) > keep).sum())
            prompt_ids, prompt_mask = prompt_ids[:, -keep:], prompt_mask[:, -keep:]
            if n_cut:
                log.warning("generate: cut the start of %d of %d prompts to %d tokens (the model has %d "
                            "positions, %d go to the response)", n_cut, len(prompts), keep, limit, max_new_tokens)
        if samples_per_prompt > 1:
            prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
        b = prompt_ids.shape[0]
        device = prompt_ids.device
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps, alive = [], [], []
        mask = prompt_mask
        positions = position_ids_from_mask(prompt_mask)
        step_ids, step_pos, cache = prompt_ids, positions, None
        for _ in range(max_new_tokens):
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float() / temperature  # (B, V)
            logp_all = logits.log_softmax(dim=-1)
            sample_logits = logits
            if suppress_eos:
                sample_logits = sample_logits.clone()
                sample_logits[:, eos] = float("-inf")
            if greedy:
                token = sample_logits.argmax(dim=-1)
            else:
                if top_p < 1.0:
                    sample_logits = _top_p_filter(sample_logits, top_p)
                probs = sample_logits.softmax(dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            live = ~finished
            token = torch.where(live, token, torch.full_like(token, pad))
            logp = logp_all.gather(-1, token[:, None]).squeeze(-1) * live
            tokens.append(token)
            logps.append(logp)
            alive.append(live)
            finished = finished | (live & (token == eos))
            # The next step attends to this token only if it is part of a live response.
            mask = torch.cat([mask, live.long()[:, None]], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = token[:, None]
            if bool(finished.all()):
                break
        response_ids = torch.stack(tokens, dim=1)  # (B, N)
        response_mask = torch.stack(alive, dim=1).long()
        n_prompt = prompt_ids.shape[1]
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        full_response_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
        logprobs = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.float),
                              torch.stack(logps, dim=1)], dim=1)
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        return Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=full_response_mask,
            logprobs=logprobs,
            prompt_length=n_prompt,
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt),
            ended_with_eos=finished,
            prompts=repeated,
            completions=self.decode_responses(response_ids, response_mask),
        )
