"""The tutorials' toy language models, registered as Hugging Face causal LMs.

Three small models that show, one idea at a time, how a language model uses its context:

- `ToyBigramForCausalLM` — the classic bigram (n = 2 n-gram) LM (Shannon 1948; Jurafsky &
  Martin, *Speech and Language Processing*, ch. 3): the next token depends only on the current
  one. Stored as an embedding followed by a linear head, i.e. a rank-`hidden_size` factorisation
  of the `vocab × vocab` table of next-token logits.
- `ToyLSTMForCausalLM` — a recurrent LM: embedding → LSTM (Hochreiter & Schmidhuber 1997) →
  linear head. The whole past is squeezed into a fixed-size state.
- `ToyAttentionForCausalLM` — one causal, single-head self-attention block (Vaswani et al.
  2017) with learned position embeddings, an MLP, pre-layernorm and residual connections: every
  token can look back at every earlier token directly.

Each is a `PretrainedConfig` + `PreTrainedModel` + `GenerationMixin` pair registered with
`AutoConfig` and `AutoModelForCausalLM` by `ensure_registered()` (run when this module is
imported), so they plug into `rlhf_lab.policy.Policy`, `save_pretrained` and
`AutoModelForCausalLM.from_pretrained(folder)` exactly like a GPT-2. `import rlhf_lab` does not
import this module (it would pull in torch and transformers); every rlhf_lab path that builds or
loads a model (`build_tiny_model`, `load_backbone`, `Policy.load`) calls `ensure_registered` first.

Conventions shared by the three (what `Policy` relies on):

- `forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
  output_hidden_states, labels)` returns a `CausalLMOutputWithPast`; `hidden_states[-1]` is the
  `(B, T, hidden_size)` state the LM head reads (and a value/reward head may read too). The cache
  goes in as `cache` or `past_key_values` and comes back under the installed transformers' field
  name (`cache` from 5.x, which deprecates `past_key_values`; `past_key_values` before).
- Left padding is neutral: a left-padded row gives the same logits on its real tokens as the
  same row unpadded (the LSTM keeps its state through positions whose mask is 0; attention never
  looks at masked keys and takes positions from `position_ids`).
- Incremental decoding: a `ToyCache` holds each model's decoding state (nothing for the bigram,
  the LSTM's `(h, c)`, the attention block's keys, values and key mask). Feeding a prompt and then
  one token at a time with the returned cache gives the logits of one full forward pass.
  `ToyCache` is not a `transformers.Cache`; the models tell `generate` not to build a
  `DynamicCache` for them, so HF `generate` (greedy, sampling, beam search) runs with
  `use_cache=True` on this cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output field (and generate's keyword) of a KV cache: transformers 5.x renamed
# `past_key_values` to `cache`, and the old name warns on every use until it goes in 5.40.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = [
    "TOY_CONFIGS",
    "ToyAttentionConfig",
    "ToyAttentionForCausalLM",
    "ToyBigramConfig",
    "ToyBigramForCausalLM",
    "ToyCache",
    "ToyLSTMConfig",
    "ToyLSTMForCausalLM",
    "build_toy_model",
    "ensure_registered",
]


# ---------------------------------------------------------------------------------- configs
class _ToyConfig(PretrainedConfig):
    """Fields every toy config shares: vocabulary, width, special-token ids, init scale.

    `hidden_size` is the width of the state the LM head reads (`hidden_states[-1]`), so
    `config.get_text_config().hidden_size` sizes a scalar head as for any HF model.
    """

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 64,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class ToyBigramConfig(_ToyConfig):
    """Config of the bigram LM: `vocab_size` tokens, each embedded in `hidden_size` dimensions.

    With `hidden_size >= vocab_size` the model can represent any bigram table; smaller sizes
    give a low-rank bigram model.
    """

    model_type = "rlhf_lab_bigram"

    def __init__(self, **kwargs):
        # Every concrete config defines __init__: transformers 5 replaces a missing one with a
        # dataclass init that would skip `_ToyConfig.__init__`.
        super().__init__(**kwargs)


class ToyLSTMConfig(_ToyConfig):
    """Config of the LSTM LM: `n_layer` stacked LSTM layers of width `hidden_size`.

    `dropout` is applied to the embeddings, between LSTM layers and before the head (0 keeps
    sampling and re-scoring identical, as RL needs).
    """

    model_type = "rlhf_lab_lstm"

    def __init__(self, n_layer: int = 1, dropout: float = 0.0, **kwargs):
        self.n_layer = n_layer
        self.dropout = dropout
        super().__init__(**kwargs)


class ToyAttentionConfig(_ToyConfig):
    """Config of the one-head self-attention LM.

    Args (beyond the shared ones):
        max_position_embeddings: number of learned positions; `position_ids` must stay below it.
        n_inner: MLP width (default `4 * hidden_size`, as in Vaswani et al. 2017).
        dropout: on embeddings, attention weights and both residual branches.
        layer_norm_epsilon: epsilon of the three layernorms.
    """

    model_type = "rlhf_lab_attention"

    def __init__(
        self,
        max_position_embeddings: int = 512,
        n_inner: int | None = None,
        dropout: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        **kwargs,
    ):
        self.max_position_embeddings = max_position_embeddings
        self.n_inner = n_inner
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        super().__init__(**kwargs)


# ---------------------------------------------------------------------------------- cache
class ToyCache:
    """Decoding state of a toy model between incremental forward calls.

    `state` maps names to batch-first tensors (dim 0 is the batch): nothing for the bigram,
    `h`/`c` of shape `(B, n_layer, H)` for the LSTM, `key`/`value` `(B, S, H)` and `key_mask`
    `(B, S)` for the attention model. `seen` counts the sequence columns consumed so far
    (padding included), so `get_seq_length()` tells `generate` where the new tokens start.
    It is a plain object, not a `transformers.Cache`: callers only pass it back to the model.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: dict[str, torch.Tensor] | None = None, seen: int = 0):
        self.state = dict(state or {})
        self.seen = int(seen)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of sequence columns the model has consumed (for HF `generate`)."""
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select rows in place (HF beam search calls this with the surviving beams)."""
        self.state = {
            k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.state.items()
        }

    def __len__(self) -> int:
        """Same as `get_seq_length()`."""
        return self.seen

    def __repr__(self) -> str:
        """The column count and the shape of every state tensor."""
        shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        return f"ToyCache(seen={self.seen}, state={shapes})"


def _one_cache(cache: ToyCache | None, past_key_values: ToyCache | None) -> ToyCache | None:
    """The cache given under either name (`cache` in transformers 5.x, `past_key_values` before)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache once: as cache or as past_key_values, not both")
    return cache if cache is not None else past_key_values


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: `cumsum(mask) - 1`, clipped at 0 (as `Policy` uses)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------- base model
class _ToyPreTrainedModel(PreTrainedModel):
    """What the three toy LMs share: the HF plumbing around a model-specific `_body`.

    A subclass builds `embed_tokens` and `lm_head` and implements
    `_body(embeds, attention_mask, position_ids, cache) -> (hidden_states, new_state)`, where
    `hidden_states` is a tuple whose last element `(B, T, H)` feeds `lm_head`. This class turns
    that into logits, a shifted cross-entropy loss, a `ToyCache` and a `CausalLMOutputWithPast`.
    """

    base_model_prefix = ""
    supports_gradient_checkpointing = False
    _no_split_modules: list[str] = []
    _skip_keys_device_placement = ["past_key_values", "cache"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """The toy models keep their own `ToyCache`; `generate` must not hand them a DynamicCache."""
        return False

    # --------------------------------------------------------------- embeddings (HF API)
    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (`vocab × hidden_size`); `resize_token_embeddings` grows it."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (`hidden_size → vocab`, untied from the input embedding)."""
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the LM head."""
        self.lm_head = new_embeddings

    # --------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: ToyCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: ToyCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits for every position, optionally continuing from `past_key_values`.

        Args:
            input_ids: `(B, T)` token ids (or `inputs_embeds` `(B, T, H)` instead).
            attention_mask: `(B, past + T)` or `(B, T)`; 0 marks padding. None means all ones.
            position_ids: `(B, T)`; by default `cumsum(mask) - 1` clipped at 0 (only the
                attention model uses positions).
            past_key_values: a `ToyCache` returned by the previous call, or None.
            cache: the same under its transformers 5.x name (pass one of the two).
            labels: `(B, T)` targets; the loss is the mean cross-entropy of predicting
                `labels[:, t + 1]` from position t, skipping -100.
            use_cache: return the updated `ToyCache` (default `config.use_cache`).
            output_hidden_states: return the model's hidden states (last one: `(B, T, H)`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        past_key_values = _one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if past_key_values is not None and not isinstance(past_key_values, ToyCache):
            raise TypeError(
                f"{type(self).__name__} takes a ToyCache as past_key_values (the one its previous "
                f"call returned), got {type(past_key_values).__name__}"
            )

        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = embeds.shape[:2]
        past = past_key_values.seen if past_key_values is not None else 0
        mask = self._full_mask(attention_mask, past_key_values, b, t, embeds.device)
        if position_ids is None:
            position_ids = _positions_from_mask(mask)[:, -t:]
        hidden_states, state = self._body(embeds, mask, position_ids, past_key_values)
        logits = self.lm_head(hidden_states[-1])

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].to(logits.device).reshape(-1),
                ignore_index=-100,
            )
        new_cache = ToyCache(state, seen=past + t) if use_cache else None
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=hidden_states if output_hidden_states else None,
            **{_CACHE_FIELD: new_cache},
        )
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _full_mask(attention_mask, cache, b, t, device) -> torch.Tensor:
        """The `(B, past + T)` mask of every column seen so far (ones where none was given).

        A mask of only the new `T` columns is accepted too; the earlier columns then come from
        the cache (the attention model keeps them) or count as real tokens.
        """
        past = cache.seen if cache is not None else 0
        if attention_mask is None:
            new = torch.ones(b, t, dtype=torch.long, device=device)
        elif attention_mask.shape[1] == past + t:
            return attention_mask.long()
        elif attention_mask.shape[1] == t:
            new = attention_mask.long()
        else:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; expected {past + t} "
                f"(past {past} + new {t}) or {t}"
            )
        if past == 0:
            return new
        old = cache.state.get("key_mask")
        if old is None:
            old = torch.ones(b, past, dtype=torch.long, device=device)
        return torch.cat([old.to(device), new], dim=1)

    # --------------------------------------------------------------- generation
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: ToyCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: ToyCache | None = None,
        **kwargs,
    ) -> dict:
        """Feed HF `generate` only the tokens the cache has not seen yet.

        The first call (no cache) takes the whole left-padded prompt; later calls take the new
        token(s), the full attention mask and the matching slice of `position_ids`.
        """
        past_key_values = _one_cache(cache, past_key_values)
        if past_key_values is not None:
            n_new = max(input_ids.shape[1] - past_key_values.get_seq_length(), 1)
            input_ids = input_ids[:, -n_new:]
        inputs = {"input_ids": input_ids}
        if inputs_embeds is not None and past_key_values is None:
            inputs = {"inputs_embeds": inputs_embeds}
        n = input_ids.shape[1] if "input_ids" in inputs else inputs_embeds.shape[1]
        if position_ids is None and attention_mask is not None:
            position_ids = _positions_from_mask(attention_mask)
        if position_ids is not None:
            position_ids = position_ids[:, -n:]
        inputs.update(
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{_CACHE_FIELD: past_key_values},
        )
        skip = {"next_sequence_length", "is_first_iteration", "cache_position", "labels"}
        for key, value in kwargs.items():
            if key not in skip and key not in inputs:
                inputs[key] = value
        return inputs


# ---------------------------------------------------------------------------------- bigram
class ToyBigramForCausalLM(_ToyPreTrainedModel, GenerationMixin):
    """Bigram LM: `p(x_{t+1} | x_≤t) = softmax(W · E[x_t] + b)`.

    The classic n-gram language model with n = 2 (Shannon 1948; Jurafsky & Martin, ch. 3),
    trained by gradient descent instead of counting: the context is the current token alone.
    `E` (`embed_tokens`, `vocab × hidden_size`) and `W` (`lm_head`) factorise the bigram logit
    table. The hidden state is `E[x_t]`, so padding and positions never matter, and the cache
    only counts tokens.
    """

    config_class = ToyBigramConfig

    def __init__(self, config: ToyBigramConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _body(self, embeds, attention_mask, position_ids, cache):
        """The hidden state is the current token's embedding; there is no state to carry."""
        return (embeds,), {}


# ---------------------------------------------------------------------------------- LSTM
class ToyLSTMForCausalLM(_ToyPreTrainedModel, GenerationMixin):
    """LSTM LM: embedding → `n_layer` LSTM layers (Hochreiter & Schmidhuber 1997) → linear head.

    The state `(h, c)` summarises the whole prefix; `hidden_states[-1]` is the top layer's `h`
    at each position. Columns whose attention mask is 0 (left padding, or anything masked after
    EOS) leave the state unchanged, so a left-padded row reads exactly like the unpadded one.
    Columns where every row is real run as one fused `nn.LSTM` call; the others step one column
    at a time and keep masked rows' previous state.
    """

    config_class = ToyLSTMConfig
    _is_stateful = True

    def __init__(self, config: ToyLSTMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.hidden_size,
            config.hidden_size,
            num_layers=config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _lstm(self, x, h, c):
        """`self.lstm(x, (h, c))` in the LSTM's own dtype, with autocast off.

        CPU autocast lowers `lstm` to bf16 but leaves an fp32 state as it is, and oneDNN then
        fails ("could not create a primitive descriptor for the LSTM forward propagation
        primitive"); a recurrent state also drifts when every step rounds it to bf16. So the
        recurrence runs in the weights' dtype (fp32 for a model trained under `bf16-mixed`),
        which leaves an fp32 run unchanged bit for bit.
        """
        dtype = self.lstm.weight_ih_l0.dtype
        device_type = x.device.type
        available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
        if not available(device_type) or not torch.is_autocast_enabled(device_type):
            return self.lstm(x.to(dtype), (h.to(dtype), c.to(dtype)))
        with torch.autocast(device_type=device_type, enabled=False):
            return self.lstm(x.to(dtype), (h.to(dtype), c.to(dtype)))

    def _body(self, embeds, attention_mask, position_ids, cache):
        """Run the LSTM over the new columns from the cached `(h, c)` (zeros at the start)."""
        b, t, _ = embeds.shape
        if cache is not None and "h" in cache.state:
            h = cache.state["h"].transpose(0, 1).contiguous()  # (L, B, H)
            c = cache.state["c"].transpose(0, 1).contiguous()
        else:
            shape = (self.config.n_layer, b, self.config.hidden_size)
            h = embeds.new_zeros(shape)
            c = embeds.new_zeros(shape)
        x = self.drop(embeds)
        real = attention_mask[:, -t:].bool()  # (B, T)
        full_cols = real.all(dim=0).tolist()
        outs, i = [], 0
        while i < t:
            if full_cols[i]:  # a run of columns with no padding: one fused call
                j = i
                while j < t and full_cols[j]:
                    j += 1
                out, (h, c) = self._lstm(x[:, i:j], h, c)
                outs.append(out)
                i = j
                continue
            out, (h_new, c_new) = self._lstm(x[:, i : i + 1], h, c)
            keep = real[:, i]
            h = torch.where(keep[None, :, None], h_new, h)
            c = torch.where(keep[None, :, None], c_new, c)
            outs.append(h[-1][:, None, :])  # masked rows repeat their previous output
            i += 1
        top = self.drop(torch.cat(outs, dim=1))
        state = {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}
        return (embeds, top), state


# ---------------------------------------------------------------------------------- attention
class _ToySelfAttention(nn.Module):
    """One causal single-head scaled dot-product self-attention (Vaswani et al. 2017).

    `softmax(q kᵀ / √d) v` over the keys at or before each query, skipping keys whose mask is 0
    (a query always sees its own key, so a padding query never has an empty softmax). Plain
    matmuls, so it has a double backward on every device.
    """

    def __init__(self, config: ToyAttentionConfig):
        super().__init__()
        h = config.hidden_size
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.attn_drop = nn.Dropout(config.dropout)
        self.scale = 1.0 / math.sqrt(h)

    def forward(self, x, key_mask, past_key=None, past_value=None):
        """`x` `(B, T, H)`, `key_mask` `(B, past + T)` → output `(B, T, H)`, keys, values."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if past_key is not None:
            k = torch.cat([past_key, k], dim=1)
            v = torch.cat([past_value, v], dim=1)
        t, s = q.shape[1], k.shape[1]
        query_col = torch.arange(s - t, s, device=x.device)[:, None]  # (T, 1)
        key_col = torch.arange(s, device=x.device)[None, :]  # (1, S)
        allowed = (key_col <= query_col)[None] & (
            key_mask.bool()[:, None, :] | (key_col == query_col)[None]
        )  # (B, T, S)
        scores = torch.matmul(q, k.transpose(1, 2)) * self.scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = self.attn_drop(scores.softmax(dim=-1))
        return self.proj(torch.matmul(weights, v)), k, v


class _ToyAttentionBlock(nn.Module):
    """Pre-layernorm transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))` (GELU MLP)."""

    def __init__(self, config: ToyAttentionConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        inner = config.n_inner or 4 * h
        self.ln_1 = nn.LayerNorm(h, eps=eps)
        self.attn = _ToySelfAttention(config)
        self.ln_2 = nn.LayerNorm(h, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(h, inner), nn.GELU(), nn.Linear(inner, h))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, key_mask, past_key=None, past_value=None):
        """`x` `(B, T, H)` → the block's output `(B, T, H)`, and all keys and values so far."""
        a, k, v = self.attn(self.ln_1(x), key_mask, past_key, past_value)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x, k, v


class ToyAttentionForCausalLM(_ToyPreTrainedModel, GenerationMixin):
    """One-head self-attention LM (Vaswani et al. 2017, reduced to a single block and head).

    Token + learned position embeddings → one causal single-head attention block with an MLP,
    pre-layernorm and residuals → final layernorm → linear head. Positions come from
    `position_ids` (by default `cumsum(mask) - 1`), so left padding shifts nothing; padded keys
    are masked out. The cache keeps keys, values and the key mask of every column seen.
    `hidden_states` is `(embeddings, final-layernorm output)`, as GPT-2 reports its last state.
    """

    config_class = ToyAttentionConfig
    _no_split_modules = ["_ToyAttentionBlock"]

    def __init__(self, config: ToyAttentionConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.block = _ToyAttentionBlock(config)
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _body(self, embeds, attention_mask, position_ids, cache):
        """Embed with positions, attend over cached + new keys, return the block's output."""
        n_pos = self.config.max_position_embeddings
        if position_ids.numel() and int(position_ids.max()) >= n_pos:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond max_position_embeddings={n_pos}"
            )
        x = self.drop(embeds + self.embed_positions(position_ids.to(embeds.device)))
        past_key = past_value = None
        if cache is not None and "key" in cache.state:
            past_key, past_value = cache.state["key"], cache.state["value"]
        y, k, v = self.block(x, attention_mask, past_key, past_value)
        state = {"key": k, "value": v, "key_mask": attention_mask}
        return (x, self.ln_f(y)), state


# ---------------------------------------------------------------------------------- registry
_TOY_MODELS: dict[str, tuple[type[_ToyConfig], type[_ToyPreTrainedModel]]] = {
    "bigram": (ToyBigramConfig, ToyBigramForCausalLM),
    "lstm": (ToyLSTMConfig, ToyLSTMForCausalLM),
    "attention": (ToyAttentionConfig, ToyAttentionForCausalLM),
}

# Tiny defaults that train in seconds on a CPU. Dropout is off: RL needs the log-probs recorded
# at sampling to equal the ones recomputed for the update.
TOY_CONFIGS: dict[str, dict] = {
    "bigram": dict(hidden_size=64),
    "lstm": dict(hidden_size=64, n_layer=1, dropout=0.0),
    "attention": dict(hidden_size=64, max_position_embeddings=512, dropout=0.0),
}


def build_toy_model(
    name: str, tokenizer: PreTrainedTokenizerBase, **overrides
) -> PreTrainedModel:
    """A randomly initialised toy LM ("bigram", "lstm" or "attention") sized to `tokenizer`.

    The vocabulary is `len(tokenizer)` and bos/eos/pad ids are the tokenizer's; `overrides`
    replace entries of `TOY_CONFIGS[name]` (e.g. `hidden_size=32`, `n_layer=2`).
    """
    if name not in TOY_CONFIGS:
        raise ValueError(f"unknown toy model '{name}'; choose from: {', '.join(TOY_CONFIGS)}")
    config_cls, model_cls = _TOY_MODELS[name]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        **{**TOY_CONFIGS[name], **overrides},
    )
    return model_cls(config)


def _register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the toy model types (idempotent)."""
    for config_cls, model_cls in _TOY_MODELS.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


_registered = False


def ensure_registered() -> None:
    """Register the toy model types with the Auto classes once; later calls return at once.

    Call it before `AutoModelForCausalLM.from_pretrained` on a folder that may hold a toy model
    (a fresh process knows the toy types only after this).
    """
    global _registered
    if not _registered:
        _register()
        _registered = True


ensure_registered()
