"""The trainer section passes any `lightning.Trainer` argument through, typed, to the run's Trainer.

Refused in one line (exit code 2 from the command): a key that is neither ours nor a Trainer
argument (with the closest names), an argument the builder sets itself, a value the Trainer's
annotation does not take, a value Lightning itself refuses (before any file is written), and
Lightning's clipping and accumulation in a stage that optimises manually.
"""

import csv
import json

import pytest
import yaml

from rlhf_lab.cli import main
from rlhf_lab.config import ConfigError
from rlhf_lab.experiment import build_fit_config, config_from_files
from rlhf_lab.runs.builder import _check_same_config, build_run

TINY = ["--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2}", "--trainer.enable_progress_bar", "false",
        "--eval.prompts", "0"]


def _error(capsys, *args: str) -> str:
    """The one stderr line of `rlhf-lab ARGS`, which must exit with code 2."""
    capsys.readouterr()
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("rlhf-lab fit: error: ")
    return lines[0].removeprefix("rlhf-lab fit: error: ")


def test_options_from_the_command_line_reach_the_trainer_typed_and_reload(tmp_path):
    config = config_from_files([], ["--task", "arithmetic", "--out", str(tmp_path), "--trainer.max_steps", "3",
                                    "--trainer.accumulate_grad_batches", "2", "--trainer.gradient_clip_val", "0.5",
                                    "--trainer.gradient_clip_algorithm", "value", "--trainer.limit_val_batches", "1",
                                    "--trainer.val_check_interval", "2", *TINY], stage="sft")
    options = config.trainer.options
    assert options == {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5, "gradient_clip_algorithm": "value",
                       "limit_val_batches": 1}
    assert type(options["accumulate_grad_batches"]) is int and type(options["gradient_clip_val"]) is float

    run = build_run(config)
    trainer = run.trainer
    assert trainer.accumulate_grad_batches == 2
    assert trainer.gradient_clip_val == 0.5 and trainer.gradient_clip_algorithm == "value"
    assert trainer.limit_val_batches == 1 and trainer.max_steps == 3
    assert trainer.val_check_interval == 4  # 2 optimiser steps of 2 batches each
    # What the builder owns is still the builder's: its CSV logger and its checkpoint callback.
    assert [type(lg).__name__ for lg in trainer.loggers] == ["RunCSVLogger"]
    assert trainer.checkpoint_callback.dirpath == f"{run.out_dir}/checkpoints"

    # config.yaml holds the options where they were given, and loads back as the same config.
    saved = yaml.safe_load(open(f"{run.out_dir}/config.yaml"))
    assert saved["trainer"]["accumulate_grad_batches"] == 2 and "options" not in saved["trainer"]
    assert build_fit_config(saved) == config

    # --resume: a profiler may be switched on; accumulation changes the run, so it may not change.
    resolved = json.loads(json.dumps(run.resolved))
    _check_same_config(run.out_dir, {**resolved, "trainer": {**resolved["trainer"], "profiler": "simple"}})
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches \(saved 2, now 4\)"):
        _check_same_config(run.out_dir, {**resolved, "trainer": {**resolved["trainer"], "accumulate_grad_batches": 4}})


def test_sft_with_accumulation_counts_optimizer_steps_not_batches(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "sft", "--task", "arithmetic", "--out", str(out), "--trainer.max_steps", "3",
                 "--trainer.accumulate_grad_batches", "2", "--config.batch_size", "4", *TINY]) == 0
    summary = json.loads((out / "sft" / "summary.json").read_text())
    assert summary["steps"] == 3  # trainer.global_step: optimiser steps
    assert summary["metrics"]["budget/optimizer_steps"] == 3
    assert summary["metrics"]["budget/samples"] == 3 * 2 * 4  # steps × batches per step × rows per batch
    rows = list(csv.DictReader(open(out / "sft" / "metrics.csv")))
    steps = [float(r["budget/optimizer_steps"]) for r in rows if r.get("budget/optimizer_steps")]
    assert steps[-1] == 3


def test_unknown_owned_and_mistyped_keys_are_one_line_naming_the_key(tmp_path, capsys):
    base = ["fit", "sft", "--task", "arithmetic", "--out", str(tmp_path / "run")]
    assert _error(capsys, *base, "--trainer.accumulate_grad_batchs", "2") == (
        "unknown key(s) trainer.accumulate_grad_batchs: neither a trainer setting of ours nor an argument of "
        "lightning.Trainer; did you mean accumulate_grad_batches?")
    assert "unknown key(s) trainer.frobnicate" in _error(capsys, *base, "--trainer.frobnicate", "1")
    for key, value, reason in [("logger", "false", "logger.kind"), ("callbacks", "[]", "build_run(callbacks=...)"),
                               ("enable_checkpointing", "true", "checkpoint.every_n_steps"),
                               ("default_root_dir", "x", "set out"), ("plugins", "[]", "checkpoint I/O plugin")]:
        line = _error(capsys, *base, f"--trainer.{key}", value)
        assert line.startswith(f"trainer.{key} cannot be set: ") and reason in line, line
    assert _error(capsys, *base, "--trainer.accumulate_grad_batches", "2.5") == \
        "trainer.accumulate_grad_batches: lightning.Trainer takes int, got 2.5"
    assert _error(capsys, *base, "--trainer.gradient_clip_algorithm", "value") == \
        "trainer.gradient_clip_algorithm has no effect without trainer.gradient_clip_val"
    # A value only Lightning knows to refuse: refused before the run folder is made.
    line = _error(capsys, *base, "--trainer.strategy", "bogus", *TINY)
    assert line.startswith("trainer: lightning.Trainer refused it: ") and "bogus" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["grpo", "online_rl"])
def test_a_manually_optimising_stage_refuses_clipping_and_accumulation(stage, tmp_path, capsys):
    base = ["fit", stage, "--task", "arithmetic", "--out", str(tmp_path)]
    line = _error(capsys, *base, "--trainer.gradient_clip_val", "1.0")
    assert line.startswith(f"trainer.gradient_clip_val does not apply to '{stage}'") and "config.max_grad_norm" in line
    line = _error(capsys, *base, "--trainer.accumulate_grad_batches", "2")
    assert line.startswith(f"trainer.accumulate_grad_batches does not apply to '{stage}'")
    assert "config.micro_batch_size" in line
    # The options that do apply pass: the Trainer of a PPO run gets them.
    config = config_from_files([], [*base[2:], "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "2",
                                    "--trainer.max_steps", "1", *TINY], stage=stage)
    run = build_run(config)
    assert run.trainer.limit_val_batches == 0 and run.trainer.num_sanity_val_steps == 2
    assert run.stage.automatic_optimization is False


def test_python_api_takes_options_and_checks_them():
    from rlhf_lab.runs import TrainerConfig

    assert TrainerConfig(max_steps=2, options={"num_nodes": 2}).trainer_kwargs()["num_nodes"] == 2
    with pytest.raises(ConfigError, match="trainer.options: max_steps is a field of the trainer section"):
        TrainerConfig(options={"max_steps": 2})
    with pytest.raises(ConfigError, match="trainer.callbacks cannot be set"):
        TrainerConfig(options={"callbacks": []})


def test_the_built_module_decides_manual_optimisation(tmp_path, monkeypatch):
    """A stage that optimises manually is refused by its module too, not only by the list of names."""
    import rlhf_lab.runs.builder as builder

    monkeypatch.setattr(builder, "MANUAL_OPTIMIZATION_STAGES", ())
    config = config_from_files([], ["--task", "arithmetic", "--out", str(tmp_path), "--trainer.gradient_clip_val",
                                    "0.5", *TINY], stage="rloo")
    with pytest.raises(ConfigError, match="trainer.gradient_clip_val does not apply to 'rloo'"):
        build_run(config)
    assert not list(tmp_path.rglob("config.yaml"))  # refused before the run folder is written


def test_trpo_refuses_fp16_loss_scaling(tmp_path, capsys):
    # The natural-gradient step moves the weights outside the optimiser, where fp16 loss scaling never runs.
    line = _error(capsys, "fit", "trpo", "--task", "arithmetic", "--out", str(tmp_path), "--trainer.precision", "16-mixed")
    assert line.endswith("trainer.precision 16-mixed does not apply to update 'trpo': its natural-gradient step "
                         "runs outside fp16 loss scaling; use bf16-mixed or 32-true")
    assert not list(tmp_path.iterdir())


def test_micro_batch_size_is_checked_in_every_stage_config():
    from rlhf_lab.stages import DPOConfig, OnlineRLConfig, PretrainConfig, RewardModelConfig, SFTConfig

    for config in (PretrainConfig, SFTConfig, RewardModelConfig, DPOConfig, OnlineRLConfig):
        assert config(micro_batch_size=4).micro_batch_size == 4
        with pytest.raises(ValueError, match="micro_batch_size"):
            config(micro_batch_size=0)
    # TRPO's trust-region step takes the whole batch: the knob would do nothing there.
    with pytest.raises(ValueError, match="micro_batch_size has no effect with update='trpo'"):
        OnlineRLConfig.preset("trpo", micro_batch_size=4)


def test_trpo_refuses_several_processes(tmp_path, capsys):
    line = _error(capsys, "fit", "trpo", "--task", "arithmetic", "--out", str(tmp_path), "--trainer.devices", "2",
                  "--trainer.strategy", "ddp")
    assert line.endswith("update 'trpo' trains on one process (trainer.devices 2, num_nodes 1): its "
                         "conjugate-gradient step and line search are not distributed")
    assert not list(tmp_path.iterdir())


def _needs_fsdp2():
    from rlhf_lab.runs.builder import fsdp2_available

    return pytest.mark.skipif(not fsdp2_available(), reason="FSDP2 needs torch >= 2.6")


@_needs_fsdp2()
def test_fsdp2_is_lightnings_model_parallel_strategy_over_every_process():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rlhf_lab.runs.builder import TrainerConfig

    strategy = TrainerConfig(devices=[0, 1, 2], strategy="fsdp2", options={"num_nodes": 2})._strategy()
    assert isinstance(strategy, ModelParallelStrategy)
    # 3 processes on each of 2 nodes, all in the data-parallel dimension; one whole-model checkpoint file.
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (6, 1)
    assert strategy._save_distributed_checkpoint is False
    assert TrainerConfig(devices=2, strategy="ddp")._strategy() == "ddp"  # Lightning's names pass through


@_needs_fsdp2()
def test_fsdp2_refusals_are_one_line(tmp_path, capsys):
    line = _error(capsys, "fit", "sft", "--task", "arithmetic", "--out", str(tmp_path), "--trainer.devices", "auto",
                  "--trainer.strategy", "fsdp2")
    assert line.endswith("trainer.strategy fsdp2 needs trainer.devices as a number or a list of devices, got 'auto'")
    line = _error(capsys, "fit", "sft", "--task", "arithmetic", "--out", str(tmp_path), "--trainer.devices", "2",
                  "--trainer.strategy", "fsdp2", "--model.lora", "{r: 4}")
    assert line.endswith("trainer.strategy fsdp2 does not shard a LoRA policy (model.lora is set): its frozen base "
                         "and adapters are switched in place; train it with strategy ddp")
    line = _error(capsys, "fit", "trpo", "--task", "arithmetic", "--out", str(tmp_path), "--trainer.devices", "1",
                  "--trainer.strategy", "fsdp2")
    assert "update 'trpo' trains on one process" in line
    assert not list(tmp_path.iterdir())
