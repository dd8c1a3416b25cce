"""Sampling responses from a causal LM: the loop behind `Policy.generate`.

Prompts are left-padded so every row's next token sits in the same column; each step feeds one
token per row and reuses the KV cache, so a response of n tokens costs one prompt pass and n
single-token passes. A row stops at its first EOS; later columns are padding and masked out.
The result is a `Rollout` with the sampled tokens' log-probs under the temperature-scaled full
distribution, so they equal the Policy's teacher-forced `logprobs` on the returned sequences.

Stages call `Policy.generate`, never these functions directly: the Policy stays the one door to
a model.

Precision: under mixed precision (`torch.autocast`, which Lightning's `bf16-mixed` and `16-mixed`
put around a training step, generation included) the model's logits come out in bf16/fp16. Every
log-prob, entropy and sampling distribution is computed from them upcast to fp32, with autocast
off (`fp32`): the logits matmul may run in low precision, the softmax and everything after it
never do. In an fp32 run this changes nothing, bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_lab import decoding
from rlhf_lab.rollout import Rollout

__all__ = ["check_sampling", "decode_responses", "encode_prompts", "fp32", "generate", "inverse_cdf_sample",
           "position_ids_from_mask", "top_p_filter"]

log = logging.getLogger(__name__)


def fp32(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A block where autocast is off on `tensor`'s device, so ops on fp32 inputs stay fp32.

    Used around every log-softmax, entropy and head computation: whichever ops an autocast
    policy lowers (on CPU or CUDA, in bf16 or fp16), nothing in the block does. Outside autocast
    it does nothing.
    """
    device_type = tensor.device.type
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    if not available(device_type) or not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens with mass ≥ top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the top token always stays.
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask on `device`, so every prompt ends at the same column."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> list[str]:
    """Decode each row's response tokens, dropping special tokens (EOS, padding)."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(rollout_ids, response_mask, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, greedy: bool,
                   samples_per_prompt: int) -> None:
    """Raise ValueError, naming the argument, for sampling settings that cannot work."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")


def _cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which `model.forward` takes its KV cache.

    transformers 5.x renamed a model's `past_key_values` argument (and output field) to `cache`;
    the old name still works but warns on every call and goes in 5.40. Earlier versions, and
    models that only know the old name, take `past_key_values`. A peft wrapper passes keywords
    on to its base model, so the base's signature decides.
    """
    return "cache" if "cache" in inspect.signature(_unwrapped(model).forward).parameters else "past_key_values"


def _last_logits_only(model: torch.nn.Module) -> dict:
    """`{"logits_to_keep": 1}` when `model.forward` takes it (Hugging Face causal LMs since
    transformers 4.45; a peft wrapper passes it on), else {}.

    The prompt pass then computes the logits of its last position only instead of a (B, P, V)
    tensor of which the loop reads one column: at V = 150k, 64 prompts of 512 tokens that tensor
    alone is 20 GB. The decode steps feed one token, so for them it changes nothing.
    """
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(_unwrapped(model).forward).parameters else {}


def _returned_cache(output, model: torch.nn.Module):
    """The KV cache a forward pass of `model` returned, to pass back on the next step.

    It is the output's `cache` field (transformers 5.x) or `past_key_values` (before). A 4.x model
    that takes `Cache` objects still answers a first call without a cache with the legacy tuple
    format, and warns when that tuple comes back; such a tuple becomes a `DynamicCache` (the same
    tensors). Models that only know tuples (GPT-2 in early 4.x) get their tuple back.
    """
    fields = getattr(type(output), "__dataclass_fields__", {})
    cache = output.cache if "cache" in fields else output.past_key_values
    if isinstance(cache, tuple) and getattr(_unwrapped(model), "_supports_cache_class", False):
        from transformers import DynamicCache

        cache = DynamicCache.from_legacy_cache(cache)
    return cache


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, or a peft wrapper's base model (which passes keywords on to it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fit_positions(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                   limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the start of prompts so prompt + response fits the model's `limit` positions."""
    if not limit or prompt_ids.shape[1] + max_new_tokens <= limit:
        return prompt_ids, prompt_mask
    # Keep the end of each prompt (next to the answer).
    keep = limit - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens} leaves no room for a prompt in the "
                         f"model's {limit} positions")
    n_cut = int((prompt_mask.sum(dim=1) > keep).sum())
    if n_cut:
        log.warning("generate: cut the start of %d of %d prompts to %d tokens (the model has %d "
                    "positions, %d go to the response)", n_cut, prompt_ids.shape[0], keep, limit, max_new_tokens)
    return prompt_ids[:, -keep:], prompt_mask[:, -keep:]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
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
    """Sample up to `max_new_tokens` per row (see `Policy.generate` for the arguments).

    Runs `model` in eval mode and puts its previous mode back. Prompts longer than the model's
    `max_position_embeddings` leave room for the response lose their start (with a warning).
    Each prompt fills `samples_per_prompt` adjacent rows: `group_ids[i] = i // samples_per_prompt`.
    """
    check_sampling(max_new_tokens, temperature, top_p, greedy, samples_per_prompt)
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    was_training = model.training
    model.eval()
    try:
        return _sample(model, tokenizer, prompts, max_new_tokens, temperature if not greedy else 1.0,
                       top_p, greedy, samples_per_prompt, suppress_eos, generator, decoder)
    finally:
        model.train(was_training)


# "auto": the static-cache decoder where the model has one (`rlhf_lab.decoding`), else the model's
# own forward; "static": that decoder or a ValueError; "model": always the model's own forward.
DECODERS = ("auto", "static", "model")
# A host sync (`finished.all()`, the live-row count) once every this many tokens, not every token:
# on an accelerator each one stalls the queue. Steps run past the last EOS are cut off the result.
STOP_CHECK_EVERY = 8
# At a check, finished rows leave the batch when at most this fraction of the rows still decodes.
DROP_FINISHED_BELOW = 0.5


class _ModelSteps:
    """The model's own forward and `DynamicCache`: the decode steps of any causal LM."""

    def __init__(self, model):
        self.model, self.cache_kw, self.last_only = model, _cache_keyword(model), _last_logits_only(model)
        self.cache = self.mask = self.positions = None

    def prefill(self, prompt_ids, prompt_mask, positions, repeats):
        if repeats > 1:
            prompt_ids, prompt_mask, positions = (x.repeat_interleave(repeats, dim=0)
                                                  for x in (prompt_ids, prompt_mask, positions))
        return self._forward(prompt_ids, prompt_mask, positions)

    def step(self, tokens, attend=None):
        # Later steps attend to this token unless `attend` says otherwise for its row.
        column = torch.ones_like(tokens) if attend is None else attend.long()
        return self._forward(tokens[:, None], torch.cat([self.mask, column[:, None]], dim=1),
                             self.positions[:, -1:] + 1)

    def _forward(self, ids, mask, positions):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kw: self.cache}, **self.last_only)
        self.cache, self.mask, self.positions = _returned_cache(out, self.model), mask, positions
        return out.logits[:, -1]


def _sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p, greedy, samples_per_prompt,
            suppress_eos, generator, decoder) -> Rollout:
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    limit = getattr(model.config, "max_position_embeddings", None)
    prompt_ids, prompt_mask = _fit_positions(prompt_ids, prompt_mask, max_new_tokens, limit)
    b, n_prompt = len(prompts) * samples_per_prompt, prompt_ids.shape[1]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    steps = None
    if decoder in ("auto", "static"):
        steps = decoding.static_decoder(model, b, n_prompt + max_new_tokens)
        if steps is None and decoder == "static":
            raise ValueError(f"decoder='static': no static decoder for {decoding.unsupported_reason(model)}")
    if steps is None:
        steps = _ModelSteps(model)
    # The prompt pass runs each prompt once; its samples_per_prompt rows share the result.
    if isinstance(steps, _ModelSteps):
        logits = steps.prefill(prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask), samples_per_prompt)
    else:
        logits = steps.prefill(prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask), samples_per_prompt,
                               **{_cache_keyword(model): None}, **_last_logits_only(model))
    tokens = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)
    logps = torch.zeros((b, max_new_tokens), device=device)
    alive = torch.zeros((b, max_new_tokens), dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)  # the batch's rows still decoding (all of them until a drop)
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # of `rows`
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # read at the stop checks only
    for step in range(max_new_tokens):
        token, logp = _next_tokens(logits, rows, b, temperature, top_p, greedy, suppress_eos, eos, generator)
        # NaN or +inf logits make the whole row's log-softmax, so the drawn token's log-prob,
        # non-finite: checking the R drawn log-probs costs far less than the R × V logits.
        nonfinite |= ~torch.isfinite(logp).all()
        live = ~finished
        token = torch.where(live, token, torch.full_like(token, pad))
        at = slice(None) if len(rows) == b else rows  # a plain column write until rows leave
        tokens[at, step], logps[at, step], alive[at, step] = token, logp * live, live
        finished = finished | (live & (token == eos))
        if step + 1 == max_new_tokens:
            break
        if (step + 1) % STOP_CHECK_EVERY == 0:
            _check_finite(nonfinite, step)
            decoding_rows = int((~finished).sum())
            if decoding_rows == 0:
                break
            if hasattr(steps, "keep") and decoding_rows <= DROP_FINISHED_BELOW * len(rows):
                keep = (~finished).nonzero().squeeze(1)
                steps.keep(keep)
                rows, finished, token, live = rows[keep], finished[keep], token[keep], live[keep]
        # Every fed token is attended, also a finished row's padding: it only reaches that row's
        # own later steps, whose draws are discarded. So the static decoder attends without a
        # mask unless a prompt is padded.
        logits = steps.step(token)
    _check_finite(nonfinite, step)
    # Columns after the last live token (run between two stop checks) are cut: the result is the
    # one a loop checking after every token gives.
    used = int(alive.any(dim=0).nonzero().max()) + 1 if bool(alive.any()) else 1
    response_ids, response_mask, logps = tokens[:, :used], alive[:, :used].long(), logps[:, :used]
    ended = (response_ids == eos).logical_and(response_mask.bool()).any(dim=1)
    prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    full_response_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
    logprobs = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.float), logps], dim=1)
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=full_response_mask,
        logprobs=logprobs,
        prompt_length=n_prompt,
        group_ids=torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt),
        ended_with_eos=ended,
        prompts=repeated,
        completions=decode_responses(tokenizer, response_ids, response_mask),
    )


def _check_finite(nonfinite: torch.Tensor, step: int) -> None:
    if bool(nonfinite):
        from rlhf_lab.errors import NonFiniteError

        raise NonFiniteError(f"generate: the model's next-token logits were NaN or infinite by new token "
                             f"{step + 1} (non-finite weights or activations)")


def _next_tokens(logits, rows, batch, temperature, top_p, greedy, suppress_eos, eos, generator):
    """The next token of each decoding row and its log-prob under the temperature-scaled full
    distribution (before top-p and EOS suppression), both (len(rows),).

    A token is drawn by inverting its row's cumulative distribution at a uniform u ∈ [0, 1):
    the first token whose cumulative probability (float64) exceeds u · total. One uniform per row
    per step, where `torch.multinomial` draws one exponential per vocabulary entry (at a 150k
    vocabulary that is most of a decode step), and the draws do not depend on torch's multinomial
    kernel, which changed between versions. Uniforms are drawn for all `batch` rows every step,
    also for rows that left the batch, so dropping finished rows does not change the other rows'
    draws.
    """
    with fp32(logits):  # the distribution and the recorded log-probs are fp32 (see above)
        logits = logits.float()  # (R, V)
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = logits.log_softmax(dim=-1)
        sample_logits = logits
        if suppress_eos:
            sample_logits = sample_logits.clone()
            sample_logits[:, eos] = float("-inf")
        if greedy:
            token = sample_logits.argmax(dim=-1)
        else:
            if top_p < 1.0:
                sample_logits = top_p_filter(sample_logits, top_p)
            u = torch.rand(batch, generator=generator, device=logits.device, dtype=torch.float64)
            token = inverse_cdf_sample(sample_logits.softmax(dim=-1), u if len(rows) == batch else u[rows])
        return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i's token: the first index whose cumulative probability (float64) exceeds u_i · total_i.

    A token of probability 0 is never drawn (its cumulative value equals the one before it), nor
    an index past the last token of positive probability. Shapes: probs (R, V), u (R,) in [0, 1)
    → (R,) long.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    # u · total rounds up to total itself for u within 2⁻⁵³ of 1; the largest double below the
    # total still lands on a token of positive probability, never past the last one.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # The clamp keeps a row of NaN probabilities (non-finite logits, reported at the next stop
    # check) in range.
    return torch.searchsorted(cdf, x[:, None], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
