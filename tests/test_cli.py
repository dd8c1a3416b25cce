"""The rlhf-lab command: fit from YAML + overrides, --print_config, generate, eval, --help."""

import csv
import json

import pytest
import yaml

from rlhf_lab.cli import main

TINY = ["--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2}", "--trainer.enable_progress_bar", "false"]


def test_help_of_every_command_names_its_options(capsys):
    for command, flags in {
        "demo": ["--algorithm", "--task", "--backbone", "--lora", "--logger", "--quick"],
        "fit": ["--config", "--print_config", "config.*", "trainer.max_steps", "logger.group", "data.format",
                "reward.source", "eval.every", "model.lora"],
        "generate": ["--prompt", "--prompts-file", "--max-new-tokens", "--temperature", "--greedy", "--samples"],
        "eval": ["--task", "--data", "--format", "--reward-model", "--reference", "--prompts"],
        "compare": ["--algorithms", "--seeds", "--budget", "--workers", "--out", "--logger"],
    }.items():
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text, (command, flag)
    with pytest.raises(SystemExit):
        main(["fit", "grpo", "--help"])
    text = capsys.readouterr().out
    assert "config.kl_estimator" in text and "config.block_size" not in text  # that stage's keys only


def test_print_config_resolves_file_and_overrides_and_reloads(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text("stage: sft\ntask: arithmetic\nconfig:\n  lr: 1.0e-3\n  batch_size: 8\n")
    assert main(["fit", "sft", "--config", str(path), "--config.lr", "1e-4", "--trainer.max_steps=7",
                 "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["config"] == {**printed["config"], "lr": 1e-4, "batch_size": 8}
    assert printed["trainer"]["max_steps"] == 7 and printed["stage"] == "sft"
    again = tmp_path / "resolved.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert main(["fit", "sft", "--config", str(again), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_bad_config_fails_with_the_key_and_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("task: arithmetic\nconfig:\n  lr: fast\n")
    assert main(["fit", "sft", "--config", str(path)]) == 2
    assert "bad.yaml: config.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["fit", "sft", "--task", "arithmetic", "--trainer.max_stepz", "3"]) == 2
    assert "unknown key(s) trainer.max_stepz" in capsys.readouterr().err


def test_fit_generate_and_eval_through_the_command(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["fit", "pretrain", "--task", "arithmetic", "--out", out, "--trainer.max_steps", "3", *TINY]) == 0
    assert main(["fit", "sft", "--task", "arithmetic", "--out", out, "--model.backbone", f"{out}/pretrain",
                 "--trainer.max_steps", "3", "--eval.prompts", "8", "--trainer.enable_progress_bar", "false"]) == 0
    summary = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())
    assert summary["steps"] == 3 and "val/gold_reward" in summary["metrics"] and "val/loss" in summary["metrics"]
    assert yaml.safe_load((tmp_path / "run" / "sft" / "config.yaml").read_text())["model"]["backbone"] == f"{out}/pretrain"
    capsys.readouterr()

    assert main(["generate", f"{out}/sft", "--prompt", "Q: 2+3=\\nA:", "--escapes", "--greedy",
                 "--max-new-tokens", "3", "--samples", "1"]) == 0
    assert capsys.readouterr().out.startswith("'Q: 2+3=\\nA:' -> ")
    gen = tmp_path / "gen.jsonl"
    assert main(["generate", f"{out}/sft", "--prompt", "Q: 1+1=\nA:", "--samples", "3", "--max-new-tokens", "3",
                 "--out", str(gen)]) == 0
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(rows) == 3 and all(r["prompt"] == "Q: 1+1=\nA:" for r in rows)

    assert main(["eval", f"{out}/sft", "--task", "arithmetic", "--prompts", "16", "--reference", f"{out}/pretrain",
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert {"val/gold_reward", "val/win_rate", "val/kl", "val/distinct_2", "val/response_length"} <= set(metrics)
    assert "val/reward" not in metrics  # no reward model: the gold judge is only val/gold_reward
    with open(tmp_path / "ev" / "samples.csv", newline="") as f:
        table = list(csv.DictReader(f))
    # The win rate is the gold judge's verdict on the rows of the table: a win 1, a tie 1/2.
    wins = [(float(r["gold_reward"]) > float(r["reference_gold_reward"]))
            + 0.5 * (float(r["gold_reward"]) == float(r["reference_gold_reward"])) for r in table]
    assert metrics["val/win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert len(table) == 16 and "reward" not in table[0]
    assert {"prompt", "completion", "gold_reward", "reference_completion", "reference_gold_reward"} <= set(table[0])


def test_docs_cli_lists_every_fit_key():
    import pathlib

    from rlhf_lab.config import field_help
    from rlhf_lab.data import DataConfig
    from rlhf_lab.experiment import FitConfig

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    keys = [k for k, _, _ in field_help(FitConfig) if not k.startswith("config") and k != "data"]
    keys += [f"data.{k}" for k, _, _ in field_help(DataConfig)]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/cli.md does not document: {missing}"


def test_the_choices_come_from_the_registries(capsys, monkeypatch):
    from rlhf_lab.tasks import TASKS, ArithmeticTask

    monkeypatch.setitem(TASKS, "my_task", ArithmeticTask)
    for command in ("demo", "fit", "eval", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "my_task" in capsys.readouterr().out, command
    assert main(["fit", "sft", "--task", "my_task", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["task"] == "my_task"
