"""Bad configuration fails at construction with a message that names the field."""

import pytest

from rlhf_lab.stages import PPOConfig, PretrainConfig, RewardModelConfig, SFTConfig, get_stage


@pytest.mark.parametrize("config_cls", [PretrainConfig, SFTConfig, RewardModelConfig, PPOConfig])
def test_negative_learning_rate_names_the_field(config_cls):
    with pytest.raises(ValueError, match=r"^lr must be > 0, got -0.001"):
        config_cls(lr=-1e-3)


@pytest.mark.parametrize("value", [0.0, -0.2])
def test_clip_ratio_must_be_positive(value):
    with pytest.raises(ValueError, match="clip_ratio must be > 0"):
        PPOConfig(clip_ratio=value)
    assert PPOConfig(clip_ratio=None).clip_ratio is None  # None = plain policy gradient


def test_samples_per_prompt_at_least_one():
    with pytest.raises(ValueError, match="samples_per_prompt must be > 0, got 0"):
        PPOConfig(samples_per_prompt=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kl_estimator", "k4", "kl_estimator must be one of 'k1', 'k2', 'k3'"),
        ("ratio_level", "word", "ratio_level must be one of 'token', 'sequence'"),
        ("aggregation", "sum", "aggregation must be one of 'token_mean', 'seq_mean'"),
        ("gamma", 1.5, "gamma must be in"),
        ("top_p", 0.0, "top_p must be in"),
        ("minibatches", 64, "minibatches .* must not exceed"),
        ("kl_target", 0.0, "kl_target must be > 0"),
    ],
)
def test_ppo_config_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**{field: value})


def test_unknown_stage_name():
    with pytest.raises(ValueError, match="unknown stage name 'dpo_typo'; choose from: pretrain, sft"):
        get_stage("dpo_typo")
    stage_cls, config_cls = get_stage("online_rl")
    assert stage_cls.config_class is config_cls
