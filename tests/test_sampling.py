"""The sampling loop (`rlhf_lab.sampling`), behind `Policy.generate`."""

import logging
import math
import warnings

import pytest
import torch

from rlhf_lab.sampling import check_sampling, generate, top_p_filter


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # Probabilities 0.5, 0.3, 0.15, 0.05, given out of order. A token is dropped when the mass of
    # the tokens ranked above it already reaches top_p: above 0.3 lies 0.5, above 0.15 lies 0.8,
    # above 0.05 lies 0.95.
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()

    def kept(top_p):
        return torch.isfinite(top_p_filter(logits, top_p))[0].tolist()

    assert kept(0.7) == [False, True, False, True]  # 0.5 < 0.7 keeps the 0.3; 0.8 ≥ 0.7 drops 0.15
    assert kept(0.45) == [False, True, False, False]  # 0.5 ≥ 0.45 already: the top token alone
    assert kept(1e-6) == [False, True, False, False]  # the top token always stays
    assert kept(0.96) == [True, True, True, True]  # 0.95 < 0.96 keeps even the 0.05
    # Kept logits are unchanged, so the renormalised distribution is p / (0.5 + 0.3).
    renormalised = top_p_filter(logits, 0.7).softmax(dim=-1)[0]
    assert math.isclose(renormalised[1].item(), 0.5 / 0.8, rel_tol=1e-6)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(samples_per_prompt=0), "samples_per_prompt"),
])
def test_bad_settings_fail_naming_the_argument(kwargs, name):
    settings = dict(max_new_tokens=4, temperature=1.0, top_p=1.0, greedy=False, samples_per_prompt=1)
    with pytest.raises(ValueError, match=f"^{name} must"):
        check_sampling(**{**settings, **kwargs})


def test_greedy_ignores_the_temperature():
    check_sampling(4, temperature=0.0, top_p=1.0, greedy=True, samples_per_prompt=1)


def test_group_ids_name_each_rows_prompt_and_training_mode_comes_back(make_policy, task):
    policy = make_policy()
    policy.model.train()
    prompts = task.eval_prompts()[:3]
    rollout = generate(policy.model, policy.tokenizer, prompts, max_new_tokens=2, samples_per_prompt=3,
                       generator=torch.Generator().manual_seed(0))
    rows = torch.arange(len(rollout))
    assert torch.equal(rollout.group_ids, rows // 3)  # row i belongs to prompt i // samples_per_prompt
    assert rollout.prompts == [prompts[i // 3] for i in range(9)]
    assert policy.model.training


def test_policy_generate_is_the_sampling_loop(make_policy, task):
    policy = make_policy()
    prompts = task.eval_prompts()[:4]
    kwargs = dict(max_new_tokens=5, temperature=0.8, top_p=0.9, samples_per_prompt=2)
    a = policy.generate(prompts, generator=torch.Generator().manual_seed(3), **kwargs)
    b = generate(policy.model, policy.tokenizer, prompts, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.completions == b.completions


# Tokens sampled by the inverse-CDF draw (one torch.rand uniform per row and step; torch 2.13.0,
# transformers 5.24.0), gpt2-tiny and llama-tiny through the static-cache decoder, the others
# through their own forward. Neither torch.multinomial (whose draws changed in torch 2.7) nor the
# cache keyword is involved, so a change here is a change of the sampler. 3 prompts x 2 samples.
PINNED_TOKENS = {
    "gpt2-tiny": [[173, 173, 173, 173, 173, 173], [173, 173, 157, 173, 173, 173],
                  [173, 173, 173, 173, 173, 173], [173, 173, 173, 173, 173, 173],
                  [173, 173, 27, 173, 173, 173], [173, 173, 173, 173, 173, 173]],
    "llama-tiny": [[184, 64, 180, 67, 198, 224], [181, 253, 34, 329, 198, 51],
                   [215, 261, 64, 292, 307, 65], [132, 269, 253, 194, 255, 221],
                   [221, 57, 3, 170, 64, 108], [201, 4, 300, 111, 290, 94]],
    "opt-tiny": [[123, 265, 216, 123, 270, 265], [123, 270, 68, 307, 270, 123],
                 [270, 270, 265, 270, 270, 265], [265, 265, 270, 270, 270, 270],
                 [270, 154, 31, 270, 154, 123], [270, 154, 270, 265, 270, 123]],
    "lstm": [[107, 100, 38, 1, 283, 172], [103, 182, 19, 327, 245, 18],
             [283, 271, 36, 306, 311, 207], [249, 260, 279, 280, 279, 257],
             [302, 23, 3, 234, 27, 134], [283, 23, 319, 118, 321, 24]],
    "attention": [[7, 145, 39, 39, 245, 201], [7, 201, 33, 320, 280, 7],
                  [280, 240, 31, 287, 301, 280], [248, 244, 280, 280, 280, 244],
                  [280, 33, 7, 280, 136, 99], [280, 12, 280, 147, 280, 7]],
}
PINNED_PROMPTS = ["Q: 2+3=\nA:", "Q: 7-5=\nA:", "Q: 1+1=\nA:"]


def _seeded_policy(name, tokenizer, lora=None):
    """A tiny backbone whose weights come from one seeded generator (not the library's init)."""
    from rlhf_lab.models.backbones import build_tiny_model
    from rlhf_lab.policy import Policy

    torch.manual_seed(0)
    model = build_tiny_model(name, tokenizer, **({"n_layer": 2} if name == "gpt2-tiny" else {}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return Policy(model, tokenizer, lora=lora)


def _sample_pinned(policy):
    return policy.generate(PINNED_PROMPTS, max_new_tokens=6, temperature=0.9, samples_per_prompt=2,
                           generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", sorted(PINNED_TOKENS))
def test_sampled_tokens_for_a_fixed_seed_are_pinned(name, tokenizer):
    rollout = _sample_pinned(_seeded_policy(name, tokenizer))
    assert rollout.input_ids[:, rollout.prompt_length:].tolist() == PINNED_TOKENS[name]


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "opt-tiny", "attention", "gpt2-tiny+lora"])
def test_generation_raises_no_deprecation_of_the_cache_argument(name, tokenizer, monkeypatch):
    """transformers 5.x warns (FutureWarning, and a once-only log line) on every forward that
    passes `past_key_values`; its warning points into transformers, so the pytest filter on
    rlhf_lab cannot see it. Generation must use the current keyword and raise neither."""
    from rlhf_lab.models.lora import LoraSettings

    policy = _seeded_policy(name.split("+")[0], tokenizer, lora=LoraSettings() if "lora" in name else None)
    logged: list[str] = []
    if hasattr(logging.Logger, "warning_once"):  # transformers' once-per-process log warning
        monkeypatch.setattr(logging.Logger, "warning_once",
                            lambda self, msg, *args, **kw: logged.append(str(msg)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sample_pinned(policy)
        policy.generate(PINNED_PROMPTS, max_new_tokens=3, greedy=True)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert deprecations == []
    assert [m for m in logged if "past_key_values" in m or "cache" in m] == []
