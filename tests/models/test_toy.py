"""The toy LMs (bigram, LSTM, one-head attention) behave like any HF causal LM under Policy."""

import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_lab.models.toy import (
    TOY_CONFIGS,
    ToyAttentionConfig,
    ToyCache,
    ToyLSTMConfig,
    ToyLSTMForCausalLM,
    _register,
    build_toy_model,
    ensure_registered,
)
from rlhf_lab.policy import Policy, position_ids_from_mask

NAMES = ["bigram", "lstm", "attention"]
# Three lengths in one batch, so two rows are left-padded by different amounts.
TEXTS = ["Q: 1+1=\nA: 2", "Q: 3+4=\nA: 7\nQ: 9-5=\nA: 4", "Q: 2+2=\nA: 4\nQ: 6+1"]
PROMPTS = ["Q: 1+1=\nA:", "Q: 3+4=\nA: 7\nQ: 9-5=\nA:", "Q: 8-3=\nA:"]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread beats two on shared cores (no spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name, tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    # Two LSTM layers, so the state kept through padding is a stack, not a single layer.
    if name == "lstm":
        overrides.setdefault("n_layer", 2)
    return build_toy_model(name, tokenizer, **overrides).eval()


def left_padded(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_full_forward(name, tokenizer):
    model = make(name, tokenizer)
    ids, mask = left_padded(tokenizer)
    assert len(set(mask.sum(1).tolist())) == 3, "rows should carry different left padding"
    # Row 0 "finishes" after the third decoded column: later columns are masked, as Policy does.
    mask = mask.clone()
    n_prompt = ids.shape[1] - 6
    mask[0, n_prompt + 3:] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     use_cache=False).logits
        # Policy's loop: the whole left-padded prompt first, then one column per call.
        pos = position_ids_from_mask(mask[:, :n_prompt])
        out = model(input_ids=ids[:, :n_prompt], attention_mask=mask[:, :n_prompt],
                    position_ids=pos, past_key_values=None, use_cache=True)
        steps = [out.logits]
        for t in range(n_prompt, ids.shape[1]):
            assert isinstance(out.past_key_values, ToyCache)
            assert out.past_key_values.get_seq_length() == t
            pos = pos[:, -1:] + 1
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos,
                        past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_row_equals_unpadded_row(name, tokenizer):
    model = make(name, tokenizer)
    ids, mask = left_padded(tokenizer)
    alone = tokenizer([TEXTS[0]], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    assert n < ids.shape[1]
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask,
                       position_ids=position_ids_from_mask(mask)).logits[0, -n:]
        # Defaults (no position_ids given) derive the positions from the mask the same way.
        default = model(input_ids=ids, attention_mask=mask).logits[0, -n:]
        single = model(**alone).logits[0]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(default, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_hidden_states_and_loss_follow_the_hf_contract(name, tokenizer):
    model = make(name, tokenizer)
    ids, mask = left_padded(tokenizer)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    hidden = model.config.get_text_config().hidden_size
    assert out.logits.shape == (*ids.shape, len(tokenizer))
    assert isinstance(out.hidden_states, tuple) and out.hidden_states[-1].shape == (*ids.shape, hidden)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, len(tokenizer)),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert model(input_ids=ids, attention_mask=mask, use_cache=False).past_key_values is None
    legacy = model(input_ids=ids, attention_mask=mask, return_dict=False)
    torch.testing.assert_close(legacy[0], out.logits)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_through_auto_classes(name, tokenizer, tmp_path):
    model = make(name, tokenizer)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == f"rlhf_lab_{name}"
    assert config.pad_token_id == tokenizer.pad_token_id and config.vocab_size == len(tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids, mask = left_padded(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_policy_generate_records_the_recomputed_logprobs(name, tokenizer):
    policy = Policy(make(name, tokenizer), tokenizer)
    for temperature in (1.0, 0.7):
        rollout = policy.generate(PROMPTS, max_new_tokens=4, temperature=temperature,
                                  generator=torch.Generator().manual_seed(0))
        assert (rollout.attention_mask[:, 0] == 0).any(), "the batch should contain left padding"
        assert rollout.response_mask.sum() > 0
        recomputed = policy.logprobs(rollout.input_ids, rollout.attention_mask,
                                     temperature=temperature)
        mask = rollout.response_mask.bool()
        torch.testing.assert_close(recomputed[mask], rollout.logprobs[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_hf_generate_greedy_matches_policy_greedy(name, tokenizer):
    model = make(name, tokenizer)
    policy = Policy(model, tokenizer)
    rollout = policy.generate(PROMPTS, max_new_tokens=4, greedy=True)
    ids, mask = policy.encode_prompts(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False,
              pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    n = ids.shape[1]
    new = cached[:, n:]
    response = rollout.input_ids[:, n:]
    live = rollout.response_mask[:, n:].bool()
    assert torch.equal(new[:, : response.shape[1]][live], response[live])


@pytest.mark.parametrize("name", NAMES)
def test_scalar_head_scores_ignore_the_padding_side(name, tokenizer):
    policy = Policy(make(name, tokenizer), tokenizer, scalar_head=True)
    ids, mask = left_padded(tokenizer)
    right = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        scores = policy.scores(ids, mask)
        scores_right = policy.scores(right["input_ids"], right["attention_mask"])
        values = policy.values(ids, mask)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, scores_right, atol=1e-5, rtol=0)
    assert values.shape == ids.shape and (values[:, 0] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_a_few_adamw_steps_lower_the_lm_loss(name, tokenizer):
    model = make(name, tokenizer).train()
    ids, mask = left_padded(tokenizer)
    labels = ids.masked_fill(mask == 0, -100)
    # The bigram's logits are a product of two small matrices, so it wants a larger step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2 if name == "bigram" else 1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # A random init starts near ln(vocab) ≈ 5.8 nats; memorising one batch halves it quickly.
    assert losses[-1] < 0.6 * losses[0], losses


def test_build_toy_model_uses_the_tokenizer_and_overrides(tokenizer):
    assert set(TOY_CONFIGS) == set(NAMES)
    model = build_toy_model("lstm", tokenizer, hidden_size=16, n_layer=3)
    assert isinstance(model, ToyLSTMForCausalLM)
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.n_layer) == (len(tokenizer), 16, 3)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.bos_token_id == tokenizer.bos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    with pytest.raises(ValueError, match="unknown toy model"):
        build_toy_model("trigram", tokenizer)


def test_registration_is_idempotent_and_model_types_are_distinct():
    _register()  # a second registration must not raise
    types = {AutoConfig.for_model(f"rlhf_lab_{n}").model_type for n in NAMES}
    assert len(types) == 3
    model = AutoModelForCausalLM.from_config(ToyLSTMConfig(vocab_size=11, hidden_size=8))
    assert isinstance(model, ToyLSTMForCausalLM)


def test_attention_rejects_positions_beyond_its_table(tokenizer):
    model = make("attention", tokenizer, max_position_embeddings=4)
    assert isinstance(model.config, ToyAttentionConfig)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.zeros(1, 6, dtype=torch.long))


def test_resize_token_embeddings_grows_both_ends(tokenizer):
    model = make("attention", tokenizer)
    model.resize_token_embeddings(len(tokenizer) + 5, mean_resizing=False)
    assert model.config.vocab_size == len(tokenizer) + 5
    out = model(input_ids=torch.tensor([[len(tokenizer) + 4, 1]]))
    assert out.logits.shape == (1, 2, len(tokenizer) + 5)


def test_ensure_registered_is_idempotent():
    ensure_registered()
    ensure_registered()
    assert AutoConfig.for_model("rlhf_lab_attention").model_type == "rlhf_lab_attention"


# Run in a fresh interpreter, where nothing has imported rlhf_lab.models.toy: each load must
# register the toy types itself. A plain (non-LoRA) load must not import peft either.
FRESH_LOAD = """
import sys
import torch
from rlhf_lab.models.backbones import load_backbone
from rlhf_lab.policy import Policy

folder, lora_folder, expected = sys.argv[1:]
ids, mask, want, want_lora = torch.load(expected)
policy = Policy.load(folder)
assert type(policy.model).__name__ == "ToyLSTMForCausalLM", type(policy.model)
assert "peft" not in sys.modules, "a plain folder must load without peft"
assert torch.equal(policy.logprobs(ids, mask), want)
assert type(load_backbone(folder)).__name__ == "ToyLSTMForCausalLM"
assert torch.equal(Policy.load(lora_folder).logprobs(ids, mask), want_lora)
"""


def test_a_fresh_process_loads_saved_toy_folders(tokenizer, tmp_path):
    from rlhf_lab.models.lora import LoraSettings

    policy = Policy(make("lstm", tokenizer), tokenizer)
    lora = Policy(make("attention", tokenizer), tokenizer, lora=LoraSettings(r=2))
    with torch.no_grad():  # a non-zero adapter, so the loaded LoRA policy is not just its base
        for p in lora.trainable_parameters():
            p.add_(0.05)
    policy.save(str(tmp_path / "lstm"))
    lora.save(str(tmp_path / "lora"))
    ids, mask = left_padded(tokenizer)
    with torch.no_grad():
        torch.save((ids, mask, policy.logprobs(ids, mask), lora.logprobs(ids, mask)), tmp_path / "expected.pt")
    out = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path / "lstm"), str(tmp_path / "lora"),
                          str(tmp_path / "expected.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("name", ["lstm", "attention"])
def test_hf_generate_feeds_the_toy_cache_back(name, tokenizer, monkeypatch):
    """After the prompt, every `generate` step passes the ToyCache back and feeds one new token.

    transformers 5.x hands the cache around as `cache=`; a model that only read `past_key_values`
    would get None and recompute the whole sequence each step (same tokens, quadratic cost).
    """
    model = make(name, tokenizer)
    calls = []
    forward = type(model).forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((kwargs["input_ids"].shape[1], given is not None))
        return out

    monkeypatch.setattr(type(model), "forward", recording)
    ids, mask = Policy(model, tokenizer).encode_prompts(PROMPTS)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True,
                   pad_token_id=tokenizer.pad_token_id)
    assert calls == [(ids.shape[1], False), (1, True), (1, True)]


def test_the_cache_goes_in_under_either_name_but_not_both(tokenizer):
    model = make("attention", tokenizer)
    ids, mask = left_padded(tokenizer)
    first = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    cache = first["cache"] if "cache" in type(first).__dataclass_fields__ else first["past_key_values"]
    assert isinstance(cache, ToyCache)
    new = model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache, use_cache=False).logits
    old = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=False).logits
    assert torch.equal(new, old)
    torch.testing.assert_close(new[:, -1], model(input_ids=ids, attention_mask=mask).logits[:, -1])
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache, past_key_values=cache)
