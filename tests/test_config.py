"""Typed YAML configs with --key.sub overrides: values typed, errors name the key and the file."""

import pytest

from rlhf_lab.config import (
    ConfigError,
    apply_overrides,
    build,
    field_help,
    load_yaml,
    parse_overrides,
)
from rlhf_lab.experiment import FitConfig, build_fit_config
from rlhf_lab.stages import OnlineRLConfig, SFTConfig


def test_overrides_parse_as_yaml_values():
    assert parse_overrides(["--config.lr", "1e-4", "--model.lora.r=4", "--x", "null", "--t", "[a, b]",
                            "--s", "hello"]) == [("config.lr", 1e-4), ("model.lora.r", 4), ("x", None),
                                                 ("t", ["a", "b"]), ("s", "hello")]
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--config.lr"])
    with pytest.raises(ConfigError, match="expected an override"):
        parse_overrides(["lr", "1"])


def test_apply_overrides_creates_nested_keys_and_keeps_the_input():
    data = {"config": {"lr": 1.0}, "out": "a"}
    new = apply_overrides(data, [("config.lr", 2.0), ("model.lora.r", 4)])
    assert new == {"config": {"lr": 2.0}, "out": "a", "model": {"lora": {"r": 4}}}
    assert data == {"config": {"lr": 1.0}, "out": "a"}
    with pytest.raises(ConfigError, match="'out' is 'a', not a mapping"):
        apply_overrides(data, [("out.x", 1)])


def test_build_types_values_and_names_bad_keys(tmp_path):
    config = build_fit_config({"stage": "sft", "task": "arithmetic", "config": {"lr": 1}, "model": {"lora": {"r": 4}}})
    assert isinstance(config.config, SFTConfig) and config.config.lr == 1.0 and isinstance(config.config.lr, float)
    assert config.model.lora.r == 4 and config.model.lora.alpha == 16.0
    with pytest.raises(ConfigError, match="f.yaml: config.lr: expected a number, got 'fast'"):
        build_fit_config({"stage": "sft", "task": "arithmetic", "config": {"lr": "fast"}}, source="f.yaml")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) config.lrate; config takes: lr, "):
        build_fit_config({"stage": "sft", "task": "arithmetic", "config": {"lrate": 1}})
    with pytest.raises(ConfigError, match="unknown key.*trainer.max_step\\b"):
        build_fit_config({"stage": "sft", "task": "arithmetic", "trainer": {"max_step": 1}})
    with pytest.raises(ConfigError, match="model.lora.r: expected an integer"):
        build_fit_config({"stage": "sft", "task": "arithmetic", "model": {"lora": {"r": 1.5}}})
    with pytest.raises(ConfigError, match="config: lr must be > 0"):  # the dataclass' own check
        build_fit_config({"stage": "sft", "task": "arithmetic", "config": {"lr": -1}})
    with pytest.raises(ValueError, match="give data"):
        build_fit_config({"stage": "sft"})
    with pytest.raises(ConfigError, match="data.format 'hh' gives preference rows"):
        build_fit_config({"stage": "sft", "data": {"format": "hh", "path": "x"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml: the top level must be a mapping"):
        load_yaml(bad)


def test_presets_as_stage_names_or_keys():
    grpo = build_fit_config({"task": "arithmetic", "config": {"lr": 1e-5}}, stage="grpo")
    # The algorithm is the run's name (it writes <out>/grpo/); online_rl is the stage that trains it.
    assert (grpo.stage, grpo.stage_name) == ("grpo", "online_rl") and isinstance(grpo.config, OnlineRLConfig)
    assert (grpo.config.algorithm, grpo.config.baseline, grpo.config.kl_in, grpo.config.lr) == \
        ("grpo", "group_norm", "loss", 1e-5)
    rloo = build_fit_config({"stage": "online_rl", "task": "arithmetic", "config": {"preset": "rloo", "samples_per_prompt": 8}})
    assert (rloo.config.baseline, rloo.config.samples_per_prompt) == ("leave_one_out", 8)
    with pytest.raises(ValueError, match="config.preset applies to the online RL stages"):
        build_fit_config({"stage": "sft", "task": "arithmetic", "config": {"preset": "grpo"}})
    with pytest.raises(ValueError, match="config.preset: unknown algorithm 'a2c'; choose from: ppo"):
        build_fit_config({"stage": "online_rl", "task": "arithmetic", "config": {"preset": "a2c"}})
    with pytest.raises(ValueError, match="config.preset is 'rloo' but the stage is 'grpo'"):
        build_fit_config({"task": "arithmetic", "config": {"preset": "rloo"}}, stage="grpo")


def test_field_help_lists_every_field_with_default_and_comment():
    rows = {key: (default, note) for key, default, note in field_help(FitConfig)}
    assert rows["trainer.max_steps"][0] == "100" and "optimiser steps" in rows["trainer.max_steps"][1]
    assert "logger.project" in rows and "model.backbone" in rows
    sft = dict((k, d) for k, d, _ in field_help(SFTConfig))
    assert sft["lr"] == "0.001"


def test_build_on_a_plain_dataclass():
    assert build(SFTConfig, {"batch_size": 4}).batch_size == 4
