"""CompareConfig: defaults, validation, and which settings a comparison folder must keep."""

import pytest

from rlhf_lab.compare.config import DEFAULT_BUDGET, QUICK_BUDGET, CompareConfig


def test_budget_defaults_follow_the_unit_and_quick():
    assert CompareConfig().budget == DEFAULT_BUDGET["samples"]
    assert CompareConfig(budget_unit="tokens").budget == DEFAULT_BUDGET["tokens"]
    assert CompareConfig(quick=True).budget == QUICK_BUDGET["samples"]
    assert CompareConfig(budget=1000).budget == 1000


def test_algorithms_parse_from_a_comma_list_and_are_checked():
    assert CompareConfig(algorithms="ppo, grpo").algorithms == ("ppo", "grpo")
    with pytest.raises(ValueError, match="algorithms"):
        CompareConfig(algorithms="ppo,sac")
    with pytest.raises(ValueError, match="twice"):
        CompareConfig(algorithms="ppo,ppo")
    with pytest.raises(ValueError, match="budget_unit"):
        CompareConfig(budget_unit="seconds")
    with pytest.raises(ValueError, match="seeds"):
        CompareConfig(seeds=0)


def test_checkpoints_split_the_budget_evenly():
    assert CompareConfig(budget=600, evals=3).checkpoints == [200.0, 400.0, 600.0]
    assert CompareConfig(seeds=3).seed_list == [0, 1, 2]


def test_identity_ignores_algorithms_and_seeds_but_not_the_budget_or_the_base():
    a = CompareConfig(algorithms="ppo", seeds=1).identity()
    assert a == CompareConfig(algorithms="ppo,dpo", seeds=5).identity()
    assert a != CompareConfig(algorithms="ppo", seeds=1, budget=999).identity()
    assert a != CompareConfig(algorithms="ppo", seeds=1, base_seed=1).identity()
    # The resolved demo settings are part of it: the base's budgets and every algorithm's knobs.
    assert a["settings"]["ppo"]["ppo_epochs"] == 2 and a["settings"]["grpo"]["kl_coef"] == 0.1
    assert CompareConfig(quick=True).demo_config().pretrain_steps == 40
