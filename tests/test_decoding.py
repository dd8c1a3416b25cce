"""The static-cache decoders (`rlhf_lab.decoding`) and the sampling loop around them.

Each decoder must give the Hugging Face forward's logits (1e-5) at every step, with left padding
and a finished row's masked token; sampling through it must record log-probs equal to the
teacher-forced ones (1e-5) and draw the same tokens for a seed as the model's own forward.
Nothing here asserts a time: the speed is `rlhf-lab bench`'s (docs/performance.md).
"""

from __future__ import annotations

import pytest
import torch

from rlhf_lab import decoding, sampling
from rlhf_lab.policy import Policy

PROMPTS = ["Q: 3+4=\nA:", "Q: 12-5=\nA:", "Q: 7=\nA:"]


def _tiny(family: str, vocab: int):
    """A random tiny model of `family` (2 layers, grouped-query attention where the family has it),
    large weights so the logits are far from uniform."""
    import transformers

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    configs = {
        "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "llama": transformers.LlamaConfig(**llama_like),
        "qwen2": transformers.Qwen2Config(**llama_like),
        "qwen3": transformers.Qwen3Config(head_dim=16, **llama_like),
        "mistral": transformers.MistralConfig(sliding_window=None, **llama_like),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[family])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=g)
    return model.eval()


FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_logits_equal_the_model_forward_at_every_step(family, device, tokenizer):
    """Prefill two left-padded prompts (one row repeated), then feed 6 tokens; row 1's 4th token is
    a finished row's padding (not attended). Each step's logits equal the full forward's on the
    whole sequence with that attention mask (positions go on by one per token, as the loop feeds them)."""
    model = _tiny(family, len(tokenizer)).to(device)
    ids, mask = sampling.encode_prompts(tokenizer, PROMPTS[:2], torch.device(device))
    decoder = decoding.static_decoder(model, batch=4, capacity=ids.shape[1] + 6)
    assert decoder is not None
    logits = decoder.prefill(ids, mask, sampling.position_ids_from_mask(mask), repeats=2)
    ids, mask = ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
    positions = sampling.position_ids_from_mask(mask)
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=1e-5, msg=f"step {step}")
        token = torch.randint(len(tokenizer), (4,), generator=g).to(device)
        attend = torch.tensor([True, step != 3, True, True], device=device)
        logits = decoder.step(token, attend)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, attend.long()[:, None]], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_and_model_decoders_draw_the_same_tokens(family, tokenizer):
    model = _tiny(family, len(tokenizer))
    policy = Policy(model, tokenizer)

    def sample(decoder):
        return policy.generate(PROMPTS, max_new_tokens=12, temperature=0.8, top_p=0.95, samples_per_prompt=3,
                               generator=torch.Generator().manual_seed(3), decoder=decoder)

    fast, slow = sample("static"), sample("model")
    assert torch.equal(fast.input_ids, slow.input_ids) and torch.equal(fast.attention_mask, slow.attention_mask)
    assert fast.completions == slow.completions
    mask = fast.response_mask.bool()
    torch.testing.assert_close(fast.logprobs[mask], slow.logprobs[mask], atol=1e-5, rtol=0)
    recomputed = policy.logprobs(fast.input_ids, fast.attention_mask, temperature=0.8)
    torch.testing.assert_close(fast.logprobs[mask], recomputed[mask], atol=1e-5, rtol=0)


def _eos_policy(tokenizer, boost: float = 3.0):
    """A GPT-2 whose EOS logit is raised (its output row scaled by `boost`), so rows finish at
    different steps."""
    model = _tiny("gpt2", len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= boost
    return Policy(model, tokenizer)


def test_dropping_finished_rows_keeps_every_row_result(tokenizer, monkeypatch):
    policy = _eos_policy(tokenizer)

    def sample(check_every, drop_below):
        monkeypatch.setattr(sampling, "STOP_CHECK_EVERY", check_every)
        monkeypatch.setattr(sampling, "DROP_FINISHED_BELOW", drop_below)
        dropped = []
        keep = decoding.StaticDecoder.keep
        monkeypatch.setattr(decoding.StaticDecoder, "keep",
                            lambda self, rows: (dropped.append(len(self.mask) - len(rows)), keep(self, rows))[1])
        rollout = policy.generate(PROMPTS, max_new_tokens=24, samples_per_prompt=4,
                                  generator=torch.Generator().manual_seed(4), decoder="static")
        return rollout, dropped

    every_token, dropped = sample(1, 1.0)  # a check after each token; finished rows leave at once
    assert sum(dropped) > 0  # rows did leave the batch
    kept, none_dropped = sample(1, 0.0)
    assert none_dropped == []
    assert torch.equal(every_token.input_ids, kept.input_ids)
    assert torch.equal(every_token.ended_with_eos, kept.ended_with_eos)
    mask = kept.response_mask.bool()
    torch.testing.assert_close(every_token.logprobs[mask], kept.logprobs[mask], atol=1e-5, rtol=0)
    assert 0 < int(kept.ended_with_eos.sum()) < len(kept.ended_with_eos)  # some rows ended, not all


def test_stop_checks_every_k_tokens_give_the_every_token_result(tokenizer, monkeypatch):
    """Steps run past the last EOS between two checks are cut: the rollout has the same columns."""
    policy = _eos_policy(tokenizer, boost=6.0)
    results = []
    for every in (1, 5, 64):
        monkeypatch.setattr(sampling, "STOP_CHECK_EVERY", every)
        results.append(policy.generate(PROMPTS[:1], max_new_tokens=40, samples_per_prompt=2,
                                       generator=torch.Generator().manual_seed(5), decoder="model"))
    first = results[0]
    assert bool(first.ended_with_eos.all()) and first.input_ids.shape[1] < first.prompt_length + 40
    for other in results[1:]:
        assert torch.equal(other.input_ids, first.input_ids)
        assert torch.equal(other.logprobs, first.logprobs)
        assert torch.equal(other.response_mask, first.response_mask)


def test_mkldnn_packed_products_equal_linear_in_any_batch():
    torch.manual_seed(6)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    linear = decoding._Linear(weight, bias, decoding._pack(weight, batch=8))
    for rows in (8, 3, 1):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    if decoding._mkldnn_ok(weight):
        assert linear.packed is not None


@pytest.mark.skipif(not decoding._mkldnn_ok(torch.zeros(2, 2)), reason="oneDNN prepacking is off in this build")
def test_packed_weights_are_kept_between_calls_until_the_weight_changes(tokenizer):
    """A packed weight is reused by the next call while its weight is unchanged, and packed afresh
    after each kind of update: an optimiser-style in-place write, `load_state_dict`, and a write
    through `.data` (which torch's version counter does not see). After every update the decoder's
    logits still equal the model's forward."""
    model = _tiny("gpt2", len(tokenizer))
    ids, mask = sampling.encode_prompts(tokenizer, PROMPTS[:1], torch.device("cpu"))
    positions = sampling.position_ids_from_mask(mask)
    attn = model.transformer.h[0].attn

    def packed_qkv_and_logits():
        decoder = decoding.static_decoder(model, batch=1, capacity=ids.shape[1] + 1)
        decoder.prefill(ids, mask, positions)
        step = decoder.step(torch.tensor([5]), torch.tensor([True]))
        whole = model(input_ids=torch.cat([ids, torch.tensor([[5]])], dim=1)).logits[:, -1]
        torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)
        return decoder.blocks[0][1].packed

    first = packed_qkv_and_logits()
    assert packed_qkv_and_logits() is first  # unchanged weight: the same packed tensor
    with torch.no_grad():
        attn.c_attn.weight.mul_(0.5)  # as an optimiser step writes
    second = packed_qkv_and_logits()
    assert second is not first
    model.load_state_dict({k: v.clone() * 1.1 for k, v in model.state_dict().items()})
    third = packed_qkv_and_logits()
    assert third is not second
    attn.c_attn.weight.data.add_(0.25)  # torch does not count this one
    assert packed_qkv_and_logits() is not third
    decoding.clear_packed_weights()
    assert decoding._PACKED.get(attn.c_attn) is None


def test_unsupported_models_fall_back_to_their_own_forward(make_policy, tokenizer):
    from rlhf_lab.models.backbones import build_tiny_model
    from rlhf_lab.models.lora import LoraSettings

    lora = make_policy(lora=LoraSettings(r=2, alpha=4.0))
    opt = Policy(build_tiny_model("opt-tiny", tokenizer), tokenizer)
    for policy, reason in ((lora, "peft-wrapped"), (opt, "model_type 'opt'")):
        assert reason in decoding.unsupported_reason(policy.model)
        rollout = policy.generate(PROMPTS[:1], max_new_tokens=3, greedy=True)  # "auto": the model's forward
        assert rollout.input_ids.shape[1] == rollout.prompt_length + 3 or bool(rollout.ended_with_eos.any())
        with pytest.raises(ValueError, match=f"decoder='static': no static decoder for .*{reason}"):
            policy.generate(PROMPTS[:1], max_new_tokens=3, decoder="static")
    plain = make_policy()
    assert decoding.unsupported_reason(plain.model) is None
    handle = plain.model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    assert "forward hooks" in decoding.unsupported_reason(plain.model)
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in decoding.unsupported_reason(plain.model)
    with pytest.raises(ValueError, match="decoder must be one of auto, static, model"):
        plain.generate(PROMPTS[:1], max_new_tokens=2, decoder="fast")


def test_the_frozen_reference_stays_in_eval_mode_and_its_pass_keeps_no_graph(tokenizer):
    """Lightning calls `.train()` on the whole module; the reference copy (dropout 0.5 here) must
    not follow, so its log-probs are the same on every call. The reference pass is a plain tensor
    usable in a loss with gradients."""
    from rlhf_lab.models.backbones import build_tiny_model

    torch.manual_seed(8)
    model = build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2, resid_pdrop=0.5)
    policy = Policy(model, tokenizer, reference="copy").train()
    assert policy.model.training and not policy.reference.training
    ids, mask = sampling.encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    first, second = policy.ref_logprobs(ids, mask), policy.ref_logprobs(ids, mask)
    assert torch.equal(first, second) and not first.is_inference() and not first.requires_grad
    logp = policy.logprobs(ids, mask)
    assert not torch.equal(policy.logprobs(ids, mask), logp)  # the policy itself does drop out
    # The reference in a loss beside a graph: an inference-mode tensor saved for backward would
    # raise here. The policy's gradient is finite and not all zero.
    ((logp - first) ** 2 * mask).sum().backward()
    grad = policy.model.transformer.wte.weight.grad
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 1e-6


def test_inverse_cdf_sampling_draws_each_token_with_its_probability():
    # probs (0.1, 0, 0.6, 0.3, 0): cumulative 0.1, 0.1, 0.7, 1.0, 1.0. u = 0.05 → 0 (0.1 > 0.05);
    # u = 0.1 → 2 (the first value > 0.1 is 0.7: token 1 has probability 0 and is skipped);
    # u = 0.69 → 2; u = 0.7 → 3; u just under 1 → 3, never token 4 (probability 0).
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).expand(5, 5)
    u = torch.tensor([0.05, 0.1, 0.69, 0.7, 1 - 1e-16], dtype=torch.float64)
    assert sampling.inverse_cdf_sample(probs, u).tolist() == [0, 2, 2, 3, 3]
    # Unnormalised rows are scaled by their total: (2, 6) is (0.25, 0.75).
    assert sampling.inverse_cdf_sample(torch.tensor([[2.0, 6.0]] * 2), torch.tensor([0.2, 0.3], dtype=torch.float64)
                                       ).tolist() == [0, 1]
    # 40,000 draws from (0.2, 0.5, 0.3) land within 1% of each probability.
    g = torch.Generator().manual_seed(9)
    draws = sampling.inverse_cdf_sample(torch.tensor([[0.2, 0.5, 0.3]]).expand(40_000, 3),
                                        torch.rand(40_000, generator=g, dtype=torch.float64))
    torch.testing.assert_close(torch.bincount(draws, minlength=3) / 40_000, torch.tensor([0.2, 0.5, 0.3]),
                               atol=0.01, rtol=0)


def test_non_finite_logits_stop_generation_with_a_clear_error(make_policy):
    from rlhf_lab.errors import NonFiniteError

    policy = make_policy()
    with torch.no_grad():
        policy.model.lm_head.weight[3, 0] = float("nan")
    for decoder in ("static", "model"):
        with pytest.raises(NonFiniteError, match="next-token logits were NaN or infinite by new token"):
            policy.generate(PROMPTS, max_new_tokens=3, decoder=decoder)
