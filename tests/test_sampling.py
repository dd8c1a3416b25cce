"""The sampling loop (`rlhf_lab.sampling`), behind `Policy.generate`."""

import math

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
