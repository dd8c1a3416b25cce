"""The decode step of known architectures on a preallocated KV cache: the fast path of sampling.

`rlhf_lab.sampling` feeds one token per row per step. Through a Hugging Face forward each such
step pays for far more than its arithmetic: the attention mask is rebuilt, the growing KV cache is
copied by `torch.cat` in every layer, and a few hundred module calls, wrappers and output objects
go by, for a 16-row matrix product per weight. On the benchmark's GPT-2 (CPU) that overhead and
the cache copies are most of a step. A `StaticDecoder` does the same arithmetic as plain tensor
operations on the model's own weights:

- the KV cache is allocated once per `generate` call, (B, heads, prompt + max_new_tokens, head
  dim) per layer; a step writes one column and attends over the filled columns (a view, no copy);
- the attention mask is one preallocated (B, capacity) row per sequence, and is passed to
  attention only once a filled column is masked (a padded prompt): the sampling loop feeds a
  finished row's padding unmasked, since it reaches only that row's own discarded steps;
- on CPU in fp32 the weights are prepacked for oneDNN's matrix product
  (`torch.ops.mkldnn._linear_pointwise`), about twice as fast as `addmm` on 16 rows here, and the
  packed copies are kept between calls while their weights are unchanged (`_PACKED`); elsewhere
  `F.linear`;
- the prompt pass (`prefill`) is the model's own forward, once per distinct prompt: the
  `samples_per_prompt` copies of a prompt share its KV cache, repeated after the pass;
- `keep(rows)` drops finished rows from the cache, so the rest decode in a smaller batch.

The values are the model's up to floating-point rounding (a test holds every supported family's
logits to the Hugging Face forward's within 1e-5 over a whole decode), not bit for bit: the
matrix products run in another kernel and order. Log-probs recorded while sampling are therefore
checked against the teacher-forced ones to 1e-5 (`tests/test_decoding.py`).

Supported: GPT-2 (`gpt2`) and the Llama family (`llama`, `qwen2`, `qwen3`, `mistral`) as plain
`PreTrainedModel`s with every layer full attention, weights in fp32/bf16/fp16, autocast off.
`static_decoder` returns None for anything else (a peft-wrapped LoRA model, a sharded or
`torch.compile`d one, one with forward hooks, sliding-window attention, another architecture, a
forward under autocast),
and sampling then runs the model's own forward with its `DynamicCache`: the same results,
slower.
"""

from __future__ import annotations

import abc
import math
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FAMILIES", "StaticDecoder", "clear_packed_weights", "static_decoder", "unsupported_reason"]

# model_type -> the decoder class (defined below)
FAMILIES: dict[str, type] = {}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` has no static decoder (a short phrase), or None when it has one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        return "a peft-wrapped model (its adapters live in the modules)"
    if hasattr(model, "_orig_mod"):
        return "a torch.compile'd model"
    if model_type not in FAMILIES:
        return f"model_type {model_type!r} (static decoders: {', '.join(sorted(FAMILIES))})"
    if any(_is_dtensor(p) for p in model.parameters()):
        return "sharded parameters"
    if _hooked(model):
        return "forward hooks on the model (the decoder never calls its modules' forward)"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "layers other than full attention"
    if getattr(config, "use_sliding_window", False) or (model_type == "mistral" and config.sliding_window):
        return "sliding-window attention"
    device = next(model.parameters()).device
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    if available(device.type) and torch.is_autocast_enabled(device.type):
        return "autocast is on (the model's forward applies its precision policy)"
    return FAMILIES[model_type].unsupported(model)


def _hooked(model: nn.Module) -> bool:
    """Whether a forward hook or pre-hook is on `model` or a module in it, or set globally, other
    than the output-capturing hooks transformers installs itself (they record hidden states only
    when a forward asks for them, which a decode step never does)."""
    from torch.nn.modules import module as module_globals

    def foreign(hooks) -> bool:
        return any(not getattr(h, "__module__", "").startswith("transformers.utils.output_capturing")
                   for h in hooks.values())

    if foreign(getattr(module_globals, "_global_forward_hooks", {})) or foreign(
            getattr(module_globals, "_global_forward_pre_hooks", {})):
        return True
    return any(foreign(m._forward_hooks) or foreign(m._forward_pre_hooks) for m in model.modules())


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"


def static_decoder(model: nn.Module, batch: int, capacity: int) -> StaticDecoder | None:
    """A `StaticDecoder` for `batch` rows of up to `capacity` positions, or None (see the module)."""
    if unsupported_reason(model) is not None:
        return None
    return FAMILIES[model.config.model_type](model, batch, capacity)


# --------------------------------------------------------------------------- matrix products


def _mkldnn_ok(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class _Linear:
    """y = x Wᵀ + b for a weight in (out, in) layout, prepacked for oneDNN on CPU fp32."""

    __slots__ = ("bias", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None):
        self.weight, self.bias, self.packed = weight.detach(), None if bias is None else bias.detach(), packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor, batch: int) -> torch.Tensor | None:
    """`weight` (one `_mkldnn_ok` accepts) reordered for oneDNN's product on `batch` rows, or None
    where this build cannot pack it."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, batch)
    except RuntimeError:  # a build whose oneDNN cannot pack this shape
        return None


# Each module's packed weight, kept between `generate` calls: packing the benchmark's 17 weights
# took about 20 ms, 8% of a sampling call. The entry is reused only while the weight is the same
# tensor, unchanged: the same storage, the same autograd version (bumped by every in-place update
# of the parameter: an optimiser step, `load_state_dict`, TRPO's `copy_` under no_grad), and the
# same 64 sampled entries, which catch a write through `.data`, the one in-place update torch does
# not count. Weak keys: a deleted model takes its entries with it.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBES = 64


def _fingerprint(weight: torch.Tensor, batch: int, transposed: bool) -> tuple:
    flat = weight.detach().reshape(-1)  # a module's own weight: contiguous, so a view
    probe = flat[:: max(1, flat.numel() // _PROBES)][:_PROBES].clone()
    return weight.data_ptr(), weight._version, tuple(weight.shape), batch, transposed, probe


def _same(key: tuple, other: tuple) -> bool:
    return key[:-1] == other[:-1] and torch.equal(key[-1], other[-1])


def clear_packed_weights() -> None:
    """Forget every packed weight kept between calls (they are checked before each use anyway)."""
    _PACKED.clear()


def _linear(module: nn.Module, batch: int, transposed: bool = False) -> _Linear:
    """A `_Linear` of `module` (nn.Linear, or GPT-2's Conv1D whose weight is (in, out): `transposed`;
    oneDNN packs the transposed view directly, F.linear takes it as it is), its packed weight
    reused from an earlier call while the weight is unchanged (see `_PACKED`)."""
    weight = (module.weight.t() if transposed else module.weight).detach()
    bias = getattr(module, "bias", None)
    if not _mkldnn_ok(weight):
        return _Linear(weight, bias, None)
    key = _fingerprint(module.weight, batch, transposed)
    kept = _PACKED.get(module)
    if kept is None or not _same(kept[0], key):
        kept = (key, _pack(weight, batch))
        if kept[1] is not None:
            _PACKED[module] = kept
    return _Linear(weight, bias, kept[1])


# --------------------------------------------------------------------------- the decoder


class StaticDecoder(abc.ABC):
    """One `generate` call's decode state: the KV cache, the mask, each row's next position.

    `prefill` runs the prompts; then each `step(tokens, attend)` feeds one token per row and
    returns the next-token logits (B, V). Shapes: the cache (layers) × (B, kv heads, capacity,
    head dim); `mask` (B, capacity) is True where a row attends, `bias` the same as 0 / −inf.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int, kv_heads: int, head_dim: int, layers: int):
        weight = model.get_output_embeddings().weight
        self.model, self.capacity, self.length = model, capacity, 0
        self.dtype, self.device = weight.dtype, weight.device
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.mask = torch.zeros((batch, capacity), dtype=torch.bool, device=self.device)
        # The mask as the additive bias attention takes (0 or −inf): a boolean mask would be
        # converted to one on every call.
        self.bias = torch.full((batch, capacity), float("-inf"), dtype=self.dtype, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        # Whether any filled column is masked (known on the host): while none is, attention runs
        # without a mask, which saved about 7% of a sampling call on the benchmark.
        self.masked = False

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """A family's own reason to refuse a model (a config option it does not implement)."""
        return None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                repeats: int = 1, **forward_kwargs) -> torch.Tensor:
        """Run the (left-padded) prompts through the model's own forward (with `forward_kwargs`,
        e.g. `logits_to_keep=1`) and keep their KV cache; each prompt row becomes `repeats`
        adjacent rows. Returns the last position's logits (B, V)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **forward_kwargs)
        n = input_ids.shape[1]
        for i, (k, v) in enumerate(_layers_of(_returned_cache(out))):
            self.keys[i][:, :, :n] = k.repeat_interleave(repeats, dim=0) if repeats > 1 else k
            self.values[i][:, :, :n] = v.repeat_interleave(repeats, dim=0) if repeats > 1 else v
        mask = attention_mask.bool()
        self.mask[:, :n] = mask.repeat_interleave(repeats, dim=0) if repeats > 1 else mask
        self.bias[:, :n].masked_fill_(self.mask[:, :n], 0.0)
        self.masked = not bool(mask.all())  # left padding
        last = position_ids[:, -1]
        self.positions = (last.repeat_interleave(repeats) if repeats > 1 else last).clone()
        self.length = n
        logits = out.logits[:, -1]
        return logits.repeat_interleave(repeats, dim=0) if repeats > 1 else logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `tokens` (B,) at each row's next position; `attend` (B,) says whether later steps
        see it (False for a finished row's padding; None: every row's is seen). Returns the
        logits (B, V)."""
        if self.length >= self.capacity:
            raise RuntimeError(f"StaticDecoder: all {self.capacity} positions are used")
        t = self.length
        self.mask[:, t] = True if attend is None else attend
        self.bias[:, t] = 0.0
        if attend is not None:
            self.bias[:, t].masked_fill_(~attend, float("-inf"))
            self.masked = True
        self.positions += 1
        logits = self._forward(tokens, self.positions, t)
        self.length = t + 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.mask = self.mask.index_select(0, rows)
        self.bias = self.bias.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int, scale: float):
        """Write this step's key and value (B, kv heads, D) at column t of layer i's cache and attend
        from q (B, heads, D) over columns 0..t. Grouped-query heads attend as a group's queries to
        their shared key head (no repeated keys). Returns (B, heads × D)."""
        keys, values = self.keys[i], self.values[i]
        keys[:, :, t] = k
        values[:, :, t] = v
        b, heads, d = q.shape
        groups = heads // keys.shape[1]
        q = q.view(b, keys.shape[1], groups, d)  # the group's heads are its query rows
        bias = self.bias[:, None, None, :t + 1] if self.masked else None
        out = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1], attn_mask=bias, scale=scale)
        return out.reshape(b, heads * d)

    @abc.abstractmethod
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        """The family's decode step: logits (B, V) of `tokens` (B,) at `positions` (B,), cache column t."""


class GPT2Decoder(StaticDecoder):
    """GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, fused QKV (Conv1D)."""

    def __init__(self, model: nn.Module, batch: int, capacity: int):
        c = model.config
        super().__init__(model, batch, capacity, c.n_head, c.n_embd // c.n_head, c.n_layer)
        body = model.transformer
        self.wte, self.wpe, self.ln_f = body.wte.weight, body.wpe.weight, body.ln_f
        self.eps, self.heads = c.layer_norm_epsilon, c.n_head
        self.blocks = [(b.ln_1, _linear(b.attn.c_attn, batch, True), _linear(b.attn.c_proj, batch, True),
                        b.ln_2, _linear(b.mlp.c_fc, batch, True), _activation(c.activation_function, b.mlp.act),
                        _linear(b.mlp.c_proj, batch, True), _gpt2_scale(b.attn)) for b in body.h]
        self.head = _linear(model.lm_head, batch)

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        if model.config.add_cross_attention:
            return "GPT-2 with cross-attention"
        if model.config._attn_implementation == "eager" and model.config.reorder_and_upcast_attn:
            return "GPT-2's reorder_and_upcast_attn"
        return None

    def _forward(self, tokens, positions, t):
        x = self.wte[tokens] + self.wpe[positions]  # (B, E)
        b, e = x.shape
        d = e // self.heads
        for i, (ln_1, qkv, proj, ln_2, fc, act, out, scale) in enumerate(self.blocks):
            h = F.layer_norm(x, (e,), ln_1.weight, ln_1.bias, ln_1.eps)
            q, k, v = qkv(h).view(b, 3, self.heads, d).unbind(1)
            x = x + proj(self._attend(i, q, k, v, t, scale))
            h = F.layer_norm(x, (e,), ln_2.weight, ln_2.bias, ln_2.eps)
            x = x + out(act(fc(h)))
        return self.head(F.layer_norm(x, (e,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps))


def _activation(name: str, module: nn.Module):
    """GPT-2's activation: its tanh-approximate GELU as torch's one fused op (the module's formula
    in six ops agrees to 1e-7), any other as the model's own module."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    return module


def _gpt2_scale(attn: nn.Module) -> float:
    """GPT-2's attention scale: 1/√d (if scale_attn_weights), / (layer + 1) (if by inverse layer)."""
    scale = getattr(attn, "scaling", None)
    if scale is not None:
        return float(scale)
    scale = 1.0 / math.sqrt(attn.head_dim) if attn.scale_attn_weights else 1.0
    return scale / float(attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scale


class LlamaDecoder(StaticDecoder):
    """The Llama family: rotary positions, RMSNorm, grouped-query attention, gated MLP. Qwen2
    (biased QKV) and Mistral are the same step; Qwen3 adds an RMSNorm of each query and key head."""

    def __init__(self, model: nn.Module, batch: int, capacity: int):
        c, body = model.config, model.model
        attn = body.layers[0].self_attn
        super().__init__(model, batch, capacity, c.num_key_value_heads, attn.head_dim, c.num_hidden_layers)
        self.embed, self.norm, self.rotary = body.embed_tokens.weight, body.norm, body.rotary_emb
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, attn.head_dim
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.blocks = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            self.blocks.append((layer.input_layernorm, _linear(a.q_proj, batch), _linear(a.k_proj, batch),
                                _linear(a.v_proj, batch), getattr(a, "q_norm", None), getattr(a, "k_norm", None),
                                _linear(a.o_proj, batch), float(a.scaling), layer.post_attention_layernorm,
                                _linear(m.gate_proj, batch), _linear(m.up_proj, batch), m.act_fn,
                                _linear(m.down_proj, batch)))
        self.head = _linear(model.lm_head, batch)

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        if getattr(model.config, "pretraining_tp", 1) > 1:
            return "Llama's pretraining_tp > 1"
        return None

    def _forward(self, tokens, positions, t):
        x = self.embed[tokens]  # (B, E)
        b = x.shape[0]
        cos, sin = self.rotary(x[:, None], positions[:, None])  # (B, 1, D)
        for i, (norm_1, wq, wk, wv, q_norm, k_norm, wo, scale, norm_2, gate, up, act, down) in enumerate(self.blocks):
            h = norm_1(x)
            q = wq(h).view(b, 1, self.heads, self.head_dim)
            k = wk(h).view(b, 1, self.kv_heads, self.head_dim)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, heads, 1, D)
            v = wv(h).view(b, self.kv_heads, self.head_dim)
            x = x + wo(self._attend(i, q[:, :, 0], k[:, :, 0], v, t, scale))
            h = norm_2(x)
            x = x + down(act(gate(h)) * up(h))
        return self.head(self.norm(x))


FAMILIES.update(gpt2=GPT2Decoder, llama=LlamaDecoder, qwen2=LlamaDecoder, qwen3=LlamaDecoder, mistral=LlamaDecoder)


# --------------------------------------------------------------------------- the model's own cache


def _returned_cache(output):
    fields = getattr(type(output), "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values


def _layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), (B, kv heads, T, D), of a Hugging Face cache of any version."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]  # the legacy tuple of (keys, values) pairs
