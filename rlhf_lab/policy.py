"""The Policy: the one door to a model, shared by every stage.

It wraps any Hugging Face causal LM and its tokenizer, with an optional LoRA adapter, an optional
scalar head (a PPO critic's value head, or a reward model's score head), an optional reference
and an optional critic. Stages never call the model themselves; the Policy never knows which
algorithm uses it.

With a LoRA adapter (`lora=LoraSettings(...)`) one frozen base serves everything: the policy is
base + adapter "default", the reference is the same base with the adapter disabled, and a PPO
critic (`critic="adapter"`) is base + adapter "critic" + a value head. Nothing is copied.

The Policy delegates the mechanics: folder I/O to `rlhf_lab.models.io`, the sampling loop to
`rlhf_lab.sampling`. It imports peft only once a LoRA adapter is used.

Alignment convention (see `rlhf_lab.rollout`): per-token outputs are `(B, T)` over the whole
sequence and column t refers to token t — `logprobs[:, t] = log π(x_t | x_<t)` and
`values[:, t] = V(x_<t)`, the value of the state in which x_t was chosen. Column 0 has no
context and is 0.

Precision: log-probs, entropies, values and scores are fp32 whatever the model's dtype and the
autocast context (Lightning's `bf16-mixed` / `16-mixed`): the logits (or hidden states) are upcast
and the log-softmax and heads run with autocast off (`rlhf_lab.sampling.fp32`); the model's own
matmuls may stay in low precision. In fp32 nothing changes, bit for bit. `save` writes the weights
in their own dtype (an fp32 model trained under `bf16-mixed` stays fp32 on disk).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_lab import distributed, sampling
from rlhf_lab.errors import CheckpointError, NonFiniteError
from rlhf_lab.models.io import (
    ADAPTER_CONFIG,
    CRITIC_ADAPTER,
    CRITIC_DIR,
    HEAD_FILE,
    is_adapter_folder,
    load_head,
    load_lora_model,
    load_model,
    read_meta,
    save_critic_adapter,
    save_head,
    save_model,
    write_meta,
)
from rlhf_lab.models.lora import (
    LoraSettings,
    adapter_is_zero,
    adapter_parameters,
    add_adapter,
    apply_lora,
    copy_adapter,
    is_peft_model,
    load_adapter,
)
from rlhf_lab.models.lora import save_adapter as write_adapter
from rlhf_lab.models.tokenizer import load_tokenizer
from rlhf_lab.rollout import Rollout
from rlhf_lab.sampling import position_ids_from_mask

__all__ = ["LOGPROB_CHUNK_ELEMENTS", "PREFIX_SHARING_MIN_SAVED", "Policy", "check_checkpoint_kind",
           "checkpoint_stage", "first_nonfinite", "first_scored_column", "head_logprobs",
           "position_ids_from_mask", "token_logprobs"]

REFERENCE_ADAPTER = "reference"  # a frozen copy of a non-zero initial policy adapter


class ScalarHead(nn.Linear):
    """A linear (H → 1) head for values or scores, computed in fp32 whatever the autocast context
    and the weights' dtype.

    It is one product, too cheap to run in low precision, and its output feeds advantages and the
    Bradley–Terry loss directly. For fp32 weights and states outside autocast this is exactly
    `nn.Linear`; gradients reach bf16/fp16 weights in their own dtype. It is always called as a
    module, so a sharded strategy (FSDP2) gathers its weights for its forward.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with sampling.fp32(hidden):
            return nn.functional.linear(hidden.float(), self.weight.float(),
                                        None if self.bias is None else self.bias.float())


def _new_head(hidden: int) -> nn.Linear:
    head = ScalarHead(hidden, 1)
    # A small init keeps the first values/scores near 0, so early updates are sane.
    nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    return head


def _restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def checkpoint_stage(path: str) -> str | None:
    """The stage that wrote the checkpoint folder `path` (its metadata's `stage`, or the `stage` of
    the `stage_config` a stage's `SavePolicy` records), or None for a folder that records none."""
    meta = read_meta(path)
    stage_config = meta.get("stage_config")
    return meta.get("stage") or (stage_config.get("stage") if isinstance(stage_config, dict) else None)


def check_checkpoint_kind(path: str, kind: str, field: str) -> None:
    """Refuse a checkpoint folder of the wrong kind for `field`, saying what it is and what was expected.

    `kind="policy"`: a reward model's folder (stage reward_model) is refused. `kind="reward_model"`:
    a folder a policy stage wrote (pretrain, sft, ppo, ...) is refused, and so is a folder that
    records no stage and has no score head (a plain HF model: its score head would be random).
    Raises `rlhf_lab.errors.CheckpointError`.
    """
    stage = checkpoint_stage(path)
    if kind == "policy":
        if stage == "reward_model":
            raise CheckpointError(f"{path} is a reward model (stage reward_model); {field} needs a policy "
                                  "checkpoint (pretrain, sft, or an RL or DPO stage's)")
    elif kind == "reward_model":
        if stage is not None and stage != "reward_model":
            raise CheckpointError(f"{path} is a policy (stage {stage}), not a reward model; {field} needs a "
                                  "reward-model checkpoint (stage reward_model)")
        if stage is None and not os.path.exists(os.path.join(path, HEAD_FILE)):
            raise CheckpointError(f"{path} has no score head ({HEAD_FILE}), so it is not a reward model; "
                                  f"{field} needs a reward-model checkpoint (stage reward_model)")
    else:
        raise ValueError(f"kind must be 'policy' or 'reward_model', got {kind!r}")


def first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """`(name, "3 nan, 1 inf of 4096 values")` of the first tensor with NaN or ±inf, else None."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            return name, f"{n_nan} nan, {int(torch.isinf(t).sum())} inf of {t.numel()} values"
    return None


# ---------------------------------------------------------------------- log-probs in bounded memory
#
# The plain formula, log_softmax over the vocabulary then gather, holds a (B, T, V) fp32
# log-softmax, and the entropy adds the softmax and their product: at V = 150k, T = 1024, B = 4
# each is 2.4 GB. Here no tensor larger than one slice of positions, B × c × V ≤
# LOGPROB_CHUNK_ELEMENTS, is made besides the logits themselves, and for a large vocabulary
# (`Policy._logprobs_of`) not even the logits: the LM head runs one slice at a time too.
LOGPROB_CHUNK_ELEMENTS = 2 ** 22  # 16 MB of fp32 per slice temporary
# A log-prob pass runs rows' shared prefix once (`Policy._shared_prefix`) when that skips at least
# this fraction of the B × T positions; below it, a second model call costs more than it saves.
PREFIX_SHARING_MIN_SAVED = 0.1


def _slice_positions(batch: int, vocab: int, chunk_size: int | None) -> int:
    """Positions per slice: `chunk_size`, else as many as keep B × c × V within the budget."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, LOGPROB_CHUNK_ELEMENTS // max(1, batch * vocab))


def _slice_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """The plain formula on one slice: fp32 log-softmax of logits / τ, the targets' entries, the entropy."""
    with sampling.fp32(logits):
        logp_all = (logits.float() / temperature).log_softmax(dim=-1)  # (B, c, V)
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)  # (B, c)
        if not with_entropy:
            return logp
        return logp, -(logp_all.exp() * logp_all).sum(dim=-1)


class _TokenLogprobs(torch.autograd.Function):
    """Per-token log-probs (and entropies) of (B, T, V) logits, one slice of positions at a time.

    Forward keeps only the logits (which exist anyway) for backward. Backward recomputes each
    slice's log-softmax L and p = exp(L) and writes the slice of d/dlogits into one buffer:
        d logp_t / dz = onehot(x_t) − p,    d H / dz = −p ⊙ (L + H),    z = logits / τ,
    so grad = (g_logp (onehot − p) − g_H p ⊙ (L + H)) / τ. Under `create_graph` (TRPO's
    Fisher-vector product differentiates this backward again) the same formula runs as ordinary
    differentiable ops.
    """

    @staticmethod
    def forward(ctx, logits, input_ids, temperature: float, chunk: int, with_entropy: bool):
        b, t, _ = logits.shape
        n = t - 1  # column t of the logits predicts token t + 1
        logp = logits.new_empty((b, n), dtype=torch.float32)
        entropy = logits.new_empty((b, n), dtype=torch.float32) if with_entropy else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            out = _slice_logprobs(logits[:, s:e], input_ids[:, s + 1:e + 1], temperature, with_entropy)
            if with_entropy:
                logp[:, s:e], entropy[:, s:e] = out
            else:
                logp[:, s:e] = out
        ctx.save_for_backward(logits, input_ids)
        ctx.temperature, ctx.chunk = temperature, chunk
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, input_ids = ctx.saved_tensors
        b, t, v = logits.shape
        n, tau = t - 1, ctx.temperature
        graph = torch.is_grad_enabled()  # create_graph: build the gradient from differentiable ops
        parts: list[torch.Tensor] = []
        grad = None
        if not graph:
            grad = torch.empty_like(logits)
            grad[:, n:] = 0
        with sampling.fp32(logits):
            g_logp = grad_logp.float() / tau
            g_ent = None if grad_entropy is None else grad_entropy.float() / tau
            for s in range(0, n, ctx.chunk):
                e = min(s + ctx.chunk, n)
                gl, targets = g_logp[:, s:e, None], input_ids[:, s + 1:e + 1, None]
                logp_all = (logits[:, s:e].float() / tau).log_softmax(dim=-1)
                p = logp_all.exp()
                if graph:
                    g = -p * gl
                    if g_ent is not None:
                        h = -(p * logp_all).sum(dim=-1, keepdim=True)
                        g = g - g_ent[:, s:e, None] * p * (logp_all + h)
                    parts.append(g.scatter_add(-1, targets, gl))
                    continue
                # The same formula in place on the slice's own temporaries.
                if g_ent is not None:
                    h = (p * logp_all).sum(dim=-1, keepdim=True).neg_()
                    g = p.mul_(logp_all.add_(h).mul_(g_ent[:, s:e, None]).add_(gl)).neg_()
                else:
                    g = p.mul_(gl).neg_()
                grad[:, s:e] = g.scatter_add_(-1, targets, gl)
        if graph:
            parts.append(logits.new_zeros((b, t - n, v), dtype=torch.float32))
            grad = torch.cat(parts, dim=1).to(logits.dtype)
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, chunk_size: int | None = None):
    """Teacher-forced log-probs (and entropies) of `logits`, in fp32, a slice of positions at a time.

    `logprobs[:, t] = log softmax(logits[:, t-1] / τ)[input_ids[:, t]]` and
    `entropy[:, t] = −Σ_v p_v log p_v` of the same distribution; column 0 has no context and is 0.
    Each slice of `chunk_size` positions (default: as many as keep B × c × V within
    `LOGPROB_CHUNK_ELEMENTS`) is the plain formula, so the values equal the whole-tensor
    log-softmax bit for bit, but no (B, T, V) log-softmax or softmax is ever held: with
    gradients the pass keeps the logits and, in backward, their gradient (`_TokenLogprobs`).

    Shape: logits (B, T, V), input_ids (B, T) → logprobs (B, T) and entropy (B, T) or None.
    """
    b, _, v = logits.shape
    chunk = _slice_positions(b, v, chunk_size)
    out = _TokenLogprobs.apply(logits, input_ids, float(temperature), chunk, with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    logp = nn.functional.pad(logp, (1, 0))
    return logp, None if entropy is None else nn.functional.pad(entropy, (1, 0))


def head_logprobs(head: nn.Module, states: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False, chunk_size: int | None = None):
    """`token_logprobs(head(states), ...)` without the (B, T, V) logits: the LM head runs one slice
    of positions at a time, each slice under activation checkpointing when gradients are on (its
    logits and softmax are recomputed in backward, one slice at a time).

    Costs one more LM-head product per slice in backward; holds only the states (B, T, H), one
    slice's (B, c, V) temporaries and the head's weight gradient. Shape: states (B, T, H),
    input_ids (B, T) → (B, T) and (B, T) or None.
    """
    from torch.utils.checkpoint import checkpoint

    b, t = input_ids.shape
    vocab = head.weight.shape[0]
    chunk = _slice_positions(b, vocab, chunk_size)

    def one_slice(hidden: torch.Tensor, targets: torch.Tensor):
        return _slice_logprobs(head(hidden), targets, temperature, with_entropy)

    grads = torch.is_grad_enabled() and (states.requires_grad or any(p.requires_grad for p in head.parameters()))
    outs = []
    for s in range(0, t - 1, chunk):
        e = min(s + chunk, t - 1)
        args = (states[:, s:e], input_ids[:, s + 1:e + 1])
        outs.append(checkpoint(one_slice, *args, use_reentrant=False) if grads else one_slice(*args))
    if with_entropy:
        logp, entropy = (torch.cat(parts, dim=1) for parts in zip(*outs, strict=True))
        return nn.functional.pad(logp, (1, 0)), nn.functional.pad(entropy, (1, 0))
    return nn.functional.pad(torch.cat(outs, dim=1), (1, 0)), None


def first_scored_column(mask: torch.Tensor) -> int:
    """The first column where any row of `mask` (B, T) is nonzero: the `start` of a log-prob pass
    whose loss reads only `mask`ed columns (T when none is). Reads the mask on the host."""
    columns = mask.any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else mask.shape[1]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return bool(sampling._last_logits_only(model))


def _start_column(start: int, t: int) -> int:
    """`start` of a (B, t) pass, within 1..t − 1 (column 0 has no context)."""
    return min(max(1, int(start)), max(1, t - 1))


def _takes_cache(model: nn.Module) -> bool:
    """Whether `model` takes a KV cache (a keyword of its forward) and may return one: not while
    gradient checkpointing is on, which turns the cache off."""
    base = sampling._unwrapped(model)
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers 5.x; the old name warns
    if checkpointing if checkpointing is not None else getattr(base, "is_gradient_checkpointing", False):
        return False
    return sampling._cache_keyword(model) in inspect.signature(base.forward).parameters


@contextlib.contextmanager
def _head_inputs(head: nn.Module):
    """Within the block, a forward of the model hands its LM head only the last position and keeps
    the head's whole input (B, T, H) in the yielded dict under "states" (absent when the head saw
    anything else than one (B, T, H) tensor, or was called more than once)."""
    captured: dict = {}

    def pre_hook(module, args, kwargs):
        captured["calls"] = captured.get("calls", 0) + 1
        states = args[0] if args else None
        if captured["calls"] > 1 or not torch.is_tensor(states) or states.dim() != 3:
            captured.pop("states", None)
            return None
        captured["states"] = states
        return (states[:, -1:], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


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
        adapter = model.active_adapter if is_peft_model(model) else None
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
             critic: Policy | str | None = None, lora: LoraSettings | None = None,
             expect: str | None = None, field: str = "the checkpoint") -> Policy:
        """Load a folder written by `save` (or any HF causal-LM folder with a tokenizer).

        `scalar_head=None` restores a head exactly when the folder has one; True adds a fresh
        head when it has none (e.g. a reward model started from an SFT policy). A saved critic
        (a separate model, or a critic adapter, in `critic/`) is restored unless `critic` is given.
        A LoRA folder (one with `adapter_config.json`) is restored as its base plus the adapter:
        the base from `base/` inside it, else from the folder its metadata names. `lora` wraps
        the model of a plain folder with a fresh adapter.

        `expect` ("policy" or "reward_model") refuses a folder of the other kind with a
        `CheckpointError` that names `field` (the config key or argument that gave `path`), e.g.
        a reward model given as `model.backbone`; see `check_checkpoint_kind`. None loads any folder.
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"policy folder '{path}' does not exist")
        if expect is not None:
            check_checkpoint_kind(path, expect, field)
        meta = read_meta(path)
        tokenizer = load_tokenizer(path)
        critic_path = os.path.join(path, CRITIC_DIR)
        saved_critic_adapter = meta.get("critic") == "adapter"
        if is_adapter_folder(path):
            if lora is not None:
                raise ValueError(f"'{path}' already holds a LoRA adapter; load it without lora=")
            model = load_lora_model(path, meta)
            if critic is None and saved_critic_adapter:
                load_adapter(model, critic_path, adapter_name=CRITIC_ADAPTER)
                critic = "adapter"
        else:
            model = load_model(path)
        if critic is None and os.path.isdir(critic_path) and not saved_critic_adapter:
            critic = cls.load(critic_path)
        head_path = os.path.join(path, HEAD_FILE)
        has_head = os.path.exists(head_path)
        policy = cls(model, tokenizer, scalar_head=has_head if scalar_head is None else scalar_head,
                     reference=reference, critic=critic, lora=lora)
        if has_head and policy.scalar_head is not None:
            load_head(policy.scalar_head, head_path)
        critic_head_path = os.path.join(critic_path, HEAD_FILE)
        if saved_critic_adapter and policy.critic_head is not None and os.path.exists(critic_head_path):
            load_head(policy.critic_head, critic_head_path)
        return policy

    @classmethod
    def load_adapter(cls, base: str | Policy, adapter_path: str, **kwargs) -> Policy:
        """A Policy of a base plus the LoRA adapter in `adapter_path` (written by `save_adapter`).

        `base` is an HF folder with a tokenizer, or a Policy without an adapter (its model is
        wrapped in place, so use the returned Policy from then on). `kwargs` go to the
        constructor (`scalar_head`, `reference`, `critic`).
        """
        if not is_adapter_folder(adapter_path):
            raise OSError(f"'{adapter_path}' holds no LoRA adapter ({ADAPTER_CONFIG} is missing)")
        if isinstance(base, Policy):
            if base.adapter_name is not None:
                raise ValueError("base Policy already has an adapter; pass one without")
            model, tokenizer = base.model, base.tokenizer
        else:
            if not os.path.isdir(base):
                raise OSError(f"base model folder '{base}' does not exist")
            model, tokenizer = load_model(base), load_tokenizer(base)
        return cls(load_adapter(model, adapter_path), tokenizer, **kwargs)

    def save(self, path: str, extra: dict | None = None, merge: bool = False,
             save_base: bool | None = None, write: bool = True) -> None:
        """Write an HF folder: model, tokenizer, the scalar head if any, and `extra` metadata.

        With a LoRA adapter the folder is a peft adapter folder (`adapter_config.json`,
        `adapter_model.safetensors`; a critic adapter and its value head go to `critic/`) plus
        its base. `save_base=True` writes the base to `base/`; False only names, in the metadata,
        the local folder the base was loaded from (it must still exist when loading); None (the
        default) names that folder when there is one and writes `base/` otherwise.
        `merge=True` writes instead a plain HF model with the policy adapter merged into the
        weights (`W + (α / r) B A`), which `AutoModelForCausalLM.from_pretrained` loads; a critic
        adapter is not part of it (a separate critic model is).

        A sharded policy (`shard`) is gathered whole first, which every rank must take part in:
        call `save` on every rank with `write` true on one (rank 0). `write=False` on an unsharded
        policy does nothing.

        Weights that are not finite are never written: a parameter with NaN or ±inf, or a buffer
        with NaN, raises `NonFiniteError` naming it, before the folder is created.
        """
        states = self._full_states() if self.is_sharded else None  # a collective: before any return
        if write:
            self._write(path, states, extra, merge, save_base)

    def _full_states(self) -> dict:
        """Every part of a sharded policy whole (on rank 0): the model, the heads, the critic."""
        full = distributed.full_state_dict(self.model)
        # Each tied weight once (the LM head shares the embedding), as `save_pretrained` writes it.
        names = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        states = {"model": {k: v for k, v in full.items() if k in names}}
        for name in ("scalar_head", "critic_head"):
            if getattr(self, name) is not None:
                states[name] = distributed.full_state_dict(getattr(self, name))
        if self.critic is not None:
            states["critic"] = self.critic._full_states()
        return states

    def _write(self, path: str, states: dict | None, extra: dict | None, merge: bool,
               save_base: bool | None) -> None:
        if states is None:
            named = list(self.named_parameters())
            buffers = [(n, b) for n, b in self.named_buffers()]
        else:  # the gathered weights; the heads and the critic are checked when they are written
            buffer_names = {n for n, _ in self.model.named_buffers()}
            named = [(n, t) for n, t in states["model"].items() if n not in buffer_names]
            buffers = [(n, t) for n, t in states["model"].items() if n in buffer_names]
        bad = first_nonfinite(named)
        what = "parameter"
        if bad is None:  # a buffer may hold -inf on purpose (an attention mask), never NaN
            what = "buffer"
            bad = first_nonfinite([(n, b) for n, b in buffers if b.is_floating_point() and bool(torch.isnan(b).any())])
        if bad is not None:
            raise NonFiniteError(f"refusing to save {path}: {what} '{bad[0]}' is not finite ({bad[1]}); "
                                 "a non-finite update corrupted the weights, so nothing was written")
        os.makedirs(path, exist_ok=True)
        meta: dict = {"scalar_head": self.scalar_head is not None}
        lora = self.adapter_name is not None and not merge
        model_state = None if states is None else states["model"]
        meta.update(save_model(self.model, path, self.adapter_name, merge=merge, save_base=save_base,
                               state_dict=model_state))
        self.tokenizer.save_pretrained(path)
        if self.scalar_head is not None:
            save_head(self.scalar_head, os.path.join(path, HEAD_FILE),
                      state=None if states is None else states["scalar_head"])
        if self.critic is not None:
            self.critic._write(os.path.join(path, CRITIC_DIR), None if states is None else states["critic"],
                               {"role": "critic"}, False, None)
        elif self.critic_adapter is not None and lora:
            save_critic_adapter(self.model, self.critic_adapter, self.critic_head, os.path.join(path, CRITIC_DIR))
        meta["critic"] = "adapter" if self.critic_adapter is not None and lora else self.critic is not None
        meta.update(extra or {})
        write_meta(path, meta)

    # ------------------------------------------------------------------ sharding
    def shard(self, mesh) -> None:
        """Shard every weight over the device mesh `mesh` with FSDP2 (`trainer.strategy: fsdp2`).

        The model and the frozen reference copy are sharded block by block
        (`rlhf_lab.distributed.shard_model`), each head is one unit, and a separate critic is
        sharded the same way. Each block is gathered for its own forward and backward; `generate`
        gathers the whole policy once per call (`gathered`). A LoRA policy is not sharded: its
        frozen base and adapters are toggled in place, which FSDP2's units do not follow.
        """
        if self.adapter_name is not None:
            raise ValueError("a LoRA policy cannot be sharded (trainer.strategy fsdp2); train it with ddp: "
                             "only its adapters are trained, and their gradients are small")
        for model in (self.model, self.reference):
            if model is not None:
                distributed.shard_model(model, mesh)
        for head in (self.scalar_head, self.critic_head):
            if head is not None:
                distributed.shard_model(head, mesh)
        if self.critic is not None:
            self.critic.shard(mesh)

    @property
    def is_sharded(self) -> bool:
        """Whether `shard` has sharded this policy's weights."""
        return bool(distributed.sharded_units(self))

    @contextlib.contextmanager
    def gathered(self):
        """Within the block every weight of a sharded policy is whole on every rank, and its forwards
        communicate nothing (so ranks may run different numbers of them, as generation does).
        Every rank enters it (an all-gather); nested uses gather once. Nothing happens when the
        policy is not sharded."""
        if getattr(self, "_gathered", False) or not self.is_sharded:
            yield self
            return
        self._gathered = True
        try:
            with distributed.gathered(self):
                yield self
        finally:
            self._gathered = False

    def save_adapter(self, path: str) -> None:
        """Write the policy's LoRA adapter alone (a peft folder); `Policy.load_adapter` puts it on a base."""
        if self.adapter_name is None:
            raise ValueError("this Policy has no LoRA adapter to save (construct it with lora=LoraSettings())")
        write_adapter(self.model, self.adapter_name, path)

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

    def train(self, mode: bool = True) -> Policy:
        """Set the training mode of everything but the frozen reference copy, which stays in eval
        mode (its dropout off) whatever the policy's mode: Lightning puts the whole module in
        train mode at every epoch and after each validation."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

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
        return sampling.encode_prompts(self.tokenizer, prompts, self.device)

    def decode_responses(self, rollout_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Decode each row's response tokens, dropping special tokens (EOS, padding)."""
        return sampling.decode_responses(self.tokenizer, rollout_ids, response_mask)

    # ------------------------------------------------------------------ forward passes
    def _forward(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 hidden: bool = False, logits_to_keep: int | None = None, cache=None, use_cache: bool = False):
        """One forward of `model`; with `logits_to_keep` = k, its LM head runs on the last k
        positions only (where the model takes that argument; else all of them, the same values).
        With `cache` (a shared prefix's, `_shared_prefix`), `input_ids` are the columns after the
        prefix and `attention_mask` the whole rows'. `use_cache`: return the model's KV cache."""
        kwargs = {}
        if logits_to_keep is not None and _takes_logits_to_keep(model):
            kwargs["logits_to_keep"] = logits_to_keep
        positions = position_ids_from_mask(attention_mask)
        if cache is not None:
            kwargs[sampling._cache_keyword(model)] = cache
            positions = positions[:, -input_ids.shape[1]:]
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=hidden,
            use_cache=use_cache or cache is not None,
            **kwargs,
        )

    def _shared_prefix(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       cut: int):
        """The KV cache of one forward over the distinct prefixes `input_ids[:, :cut]` (with their
        mask), its rows then repeated so that row i holds row i's prefix; or None where sharing
        does not pay or the model cannot take it.

        The rows of a group-sampled rollout (GRPO's k samples of a prompt) and the two sides of a
        preference pair share their prompt, yet a whole-sequence pass runs the model on every
        copy. Here each distinct prefix runs once and the rest of each row attends to its keys and
        values: the same attention, so the same log-probs (to rounding), and the gradient reaches
        the shared prefix through the repeated cache. The benchmark's GRPO runs 4 prompts of 16
        prefix columns instead of 16. It is used when it saves at least PREFIX_SHARING_MIN_SAVED of
        the positions, on a model that takes and returns a cache (`reorder_cache` repeats its
        rows), unsharded (FSDP runs each module once per step) and not under gradient
        checkpointing (which turns the cache off).
        """
        b, t = input_ids.shape
        if cut < 1 or b < 2 or self.is_sharded or not _takes_cache(model):
            return None
        key = torch.cat([input_ids[:, :cut], attention_mask[:, :cut].to(input_ids.dtype)], dim=1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        distinct = int(inverse.max()) + 1
        if (b - distinct) * cut < PREFIX_SHARING_MIN_SAVED * b * t:
            return None
        rows = torch.arange(b, device=inverse.device)
        first = torch.full((distinct,), b, device=inverse.device).scatter_reduce(0, inverse, rows, "amin")
        out = self._forward(model, input_ids[first, :cut], attention_mask[first, :cut], logits_to_keep=1,
                            use_cache=True)
        cache = sampling._returned_cache(out, model)
        cache.reorder_cache(inverse)
        return cache

    def _states(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                start: int = 1) -> torch.Tensor:
        """`model`'s last hidden states (B, T − start + 1, H) at columns start − 1..T − 1, the
        positions whose outputs are the values of columns start.. (the LM head runs on one
        position; a shared prefix runs once, `_shared_prefix`)."""
        start = _start_column(start, input_ids.shape[1])
        cache = self._shared_prefix(model, input_ids, attention_mask, start - 1) if start > 1 else None
        cut = 0 if cache is None else start - 1
        out = self._forward(model, input_ids[:, cut:], attention_mask, hidden=True, logits_to_keep=1, cache=cache)
        return out.hidden_states[-1][:, start - 1 - cut:]

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                        with_entropy: bool):
        """Log-probs (and entropies) of `logits`, always in fp32 (see `sampling.fp32`), a slice of
        positions at a time (`token_logprobs`)."""
        return token_logprobs(logits, input_ids, temperature, with_entropy)

    def _sliced_head(self, model: PreTrainedModel, input_ids: torch.Tensor) -> nn.Module | None:
        """`model`'s LM head when its log-probs should run slice by slice (`head_logprobs`): the
        logits would exceed one slice (B × T × V > LOGPROB_CHUNK_ELEMENTS), the policy is not
        sharded (a sharded head is whole only inside the model's forward), and the model has not
        been seen to change its head's output. Else None: the full logits, `token_logprobs`."""
        if self.is_sharded or id(model) in self.__dict__.setdefault("_unsliced_heads", set()):
            return None
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):  # a model with no LM head to reach: its full logits
            return None
        weight = getattr(head, "weight", None)
        if not isinstance(head, nn.Module) or not torch.is_tensor(weight) or weight.dim() != 2:
            return None
        return head if input_ids.numel() * max(weight.shape) > LOGPROB_CHUNK_ELEMENTS else None

    def _logprobs_of(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     temperature: float, with_entropy: bool, hidden: bool = False, start: int = 1):
        """`(logprobs, entropy or None, states)` of `model` on the rows; with `hidden`, states are
        the last hidden states at columns start − 1..T − 1 (as `_states` gives them), else None.

        Only columns `start`..T-1 are scored; the ones before are 0. The LM head then runs on the
        T − start + 1 positions that predict them (`logits_to_keep`), not on the prompt: for the
        benchmark's GRPO that is 33 of 49 positions, in the forward, the backward and the
        reference pass. Where rows share the columns before `start` − 1 (a prompt's samples, a
        pair's two sides), those run once per distinct prefix (`_shared_prefix`).

        When `_sliced_head` gives the LM head, the forward hands the head only the last position
        (`_head_inputs`) and the head then runs slice by slice on the states it was given
        (`head_logprobs`): no (B, T, V) tensor at all. The model's returned last-position logits
        must equal the head's own output there; a model that changes them (logit soft-capping or
        scaling) is remembered and, from this call on, scored from its full logits.
        """
        t = input_ids.shape[1]
        start = _start_column(start, t)
        keep = t - start + 1  # the positions whose logits predict columns start..T-1
        cache = self._shared_prefix(model, input_ids, attention_mask, start - 1) if start > 1 else None
        cut = 0 if cache is None else start - 1  # the pass below runs on columns cut..T-1
        ids = input_ids[:, cut:]

        def widen(logp: torch.Tensor | None) -> torch.Tensor | None:
            # (B, keep) scored from column start - 1 → (B, T): columns before start are 0
            return logp if logp is None or start == 1 else nn.functional.pad(logp[:, 1:], (start, 0))

        def last_hidden(out) -> torch.Tensor | None:
            return out.hidden_states[-1][:, start - 1 - cut:] if hidden else None

        head = self._sliced_head(model, input_ids)
        if head is not None:
            with _head_inputs(head) as captured:
                out = self._forward(model, ids, attention_mask, hidden, cache=cache)
            states = captured.get("states")
            if states is not None and states.shape[:2] == ids.shape:
                with torch.no_grad():
                    own = head(states[:, -1:])
                if own.shape == out.logits.shape and torch.allclose(own.float(), out.logits.float(),
                                                                    rtol=1e-5, atol=1e-6):
                    chunk = _slice_positions(input_ids.shape[0], out.logits.shape[-1], None)
                    logp, entropy = head_logprobs(head, states[:, start - 1 - cut:], input_ids[:, start - 1:],
                                                  temperature, with_entropy, chunk)
                    return widen(logp), widen(entropy), last_hidden(out)
            self._unsliced_heads.add(id(model))
            if cache is not None:  # the forward above extended it: start again from the prefix
                cache = self._shared_prefix(model, input_ids, attention_mask, cut)
        out = self._forward(model, ids, attention_mask, hidden, logits_to_keep=keep if start > 1 else None,
                            cache=cache)
        logits = out.logits[:, -keep:] if start > 1 else out.logits
        logp, entropy = self._token_logprobs(logits, input_ids[:, start - 1:], temperature, with_entropy)
        return widen(logp), widen(entropy), last_hidden(out)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 temperature: float = 1.0, return_entropy: bool = False, start: int = 1):
        """Teacher-forced log-prob of each token given the ones before it.

        Shape: input (B, T) → (B, T), column 0 is 0. With `return_entropy` also returns the
        entropy (nats) of the next-token distribution each token was drawn from, (B, T).
        `start`: the first column scored; the columns before it are 0 and the LM head does not run
        on the positions that predict them (pass the first column of a loss mask: the prompt of
        an SFT or RL batch costs no head product, log-softmax or their backward). Memory: no
        (B, T, V) log-softmax or softmax is held (see `_logprobs_of`).
        """
        logp, entropy, _ = self._logprobs_of(self.model, input_ids, attention_mask, temperature, return_entropy,
                                             start=start)
        return (logp, entropy) if return_entropy else logp

    def logprobs_and_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            temperature: float = 1.0, start: int = 1):
        """`(logprobs, entropy, values)`: what a PPO update needs (one pass without a separate
        critic). `start` as in `logprobs` and `values`: the columns before it are 0."""
        if self.has_separate_critic:
            logp, entropy = self.logprobs(input_ids, attention_mask, temperature, return_entropy=True, start=start)
            return logp, entropy, self.values(input_ids, attention_mask, start=start)
        self._require_head("logprobs_and_values")
        logp, entropy, states = self._logprobs_of(self.model, input_ids, attention_mask, temperature, True,
                                                  hidden=True, start=start)
        return logp, entropy, self._values_from_states(states, self.scalar_head, input_ids.shape[1])

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

    def _no_graph(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.is_sharded else torch.inference_mode()

    def ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     temperature: float = 1.0, start: int = 1) -> torch.Tensor:
        """`logprobs` under the frozen reference policy (in eval mode, like a frozen copy), from
        column `start` (see `logprobs`). Shape: (B, T).

        The pass runs under `torch.inference_mode` (no graph, no view or version tracking; a sharded
        policy's, under `no_grad`, as FSDP's gathers must stay ordinary tensors); the result is an
        ordinary tensor, so losses may use it beside tensors that need gradients.
        """
        if not self.has_reference:
            raise ValueError("this Policy has no reference (construct it with reference='copy')")
        if self.reference is not None:
            with self._no_graph():
                logp = self._logprobs_of(self.reference, input_ids, attention_mask, temperature, False, start=start)[0]
            return logp.clone()
        # The shared base, adapter off (or the frozen reference adapter on), for the whole computation.
        was_training = self.model.training
        self.model.eval()
        try:
            with self._adapter(self._reference_adapter), self._no_graph():
                logp = self._logprobs_of(self.model, input_ids, attention_mask, temperature, False, start=start)[0]
        finally:
            self.model.train(was_training)
        return logp.clone()

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
    def _values_from_states(states: torch.Tensor, head: nn.Linear, t: int) -> torch.Tensor:
        """(B, T) values from the last hidden states at columns T − n..T − 1 (n = states' length):
        `values[:, c] = head(hidden[:, c − 1])`, 0 before column T − n + 1."""
        v = head(states[:, :-1]).squeeze(-1)
        return nn.functional.pad(v, (t - v.shape[1], 0))

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 1) -> torch.Tensor:
        """Per-token values `values[:, t] = V(x_<t)`, from the critic or the head. Shape: (B, T).

        `start`: the first column valued; the columns before it are 0 (pass the first column of the
        response mask). Rows sharing the columns before `start` − 1 run them once (`_states`)."""
        if self.critic is not None:
            return self.critic.values(input_ids, attention_mask, start=start)
        t = input_ids.shape[1]
        if self.critic_adapter is not None:
            with self._adapter(self.critic_adapter):
                states = self._states(self.model, input_ids, attention_mask, start)
            return self._values_from_states(states, self.critic_head, t)
        self._require_head("values")
        states = self._states(self.model, input_ids, attention_mask, start)
        return self._values_from_states(states, self.scalar_head, t)

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence: the head read at the last real (non-pad) token. Shape: (B,)."""
        self._require_head("scores")
        # The LM head's logits are not used: it runs on one position only.
        out = self._forward(self.model, input_ids, attention_mask, hidden=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (B, T, H)
        t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * t).argmax(dim=1)  # index of the last 1 in each row
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.scalar_head(picked).squeeze(-1)

    # ------------------------------------------------------------------ generation
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
        decoder: str = "auto",
    ) -> Rollout:
        """Sample responses for a batch of prompts, with a KV cache, stopping at EOS.

        Prompts are left-padded so every row's next token sits in the same column; each step feeds
        one token per row and reuses the cache, so a response of n tokens costs one prompt pass
        and n single-token passes. Each prompt is repeated `samples_per_prompt` times in adjacent
        rows (`group_ids` names the prompt). The recorded `logprobs` are those of the
        temperature-scaled full distribution (before top-p truncation and EOS suppression), so
        they equal `logprobs(..., temperature)` recomputed on the returned sequences.
        `suppress_eos` forbids EOS (fixed-length responses, as in the benchmark). `decoder`:
        "auto" decodes on a preallocated KV cache with plain tensor ops where the architecture has
        such a decoder (`rlhf_lab.decoding`: GPT-2, the Llama family; not under LoRA or autocast)
        and through the model's own forward otherwise; "model" always uses the model's forward;
        "static" requires the fast decoder. The loop itself is `rlhf_lab.sampling.generate`.
        """
        with self.gathered():  # a sharded policy: whole on every rank, so ranks may stop at different lengths
            return sampling.generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, greedy=greedy,
                                     samples_per_prompt=samples_per_prompt, suppress_eos=suppress_eos,
                                     generator=generator, decoder=decoder)
