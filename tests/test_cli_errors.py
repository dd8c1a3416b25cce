"""A user error is one line on stderr and exit code 2, from the real command (no traceback unless --debug).

The subprocess tests run `python -m rlhf_lab.cli` as a user would; each fails before training,
so each takes the few seconds of the imports. `--debug` (the traceback too) is checked in process.
"""

import csv
import os
import subprocess
import sys

import pytest

from rlhf_lab.cli import main

TINY = ["--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2}", "--trainer.enable_progress_bar", "false"]


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "rlhf_lab.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _in_process(capsys, *args: str):
    """`main(args)` in this process, as (returncode, stderr): the same code path as the command,
    without the seconds of a fresh process's imports (one test below runs the real process)."""
    from types import SimpleNamespace

    capsys.readouterr()
    code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def _one_line_error(result: subprocess.CompletedProcess, command: str = "fit") -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"rlhf-lab {command}: error: ")
    return lines[0].removeprefix(f"rlhf-lab {command}: error: ")


@pytest.fixture
def reward_model_dir(make_policy, tmp_path):
    folder = tmp_path / "runs" / "reward_model"
    make_policy(scalar_head=True).save(str(folder), extra={"stage": "reward_model"})
    return folder


def test_an_empty_data_file_is_one_line_naming_it_and_writes_no_folder(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    result = _in_process(capsys, "fit", "sft", "--data.format", "prompt_completion", "--data.path", str(data),
                         "--out", str(tmp_path / "run"))
    assert _one_line_error(result) == (f"{data}: has no rows (the file is empty or holds only blank lines); "
                                       "data.path needs at least one row")
    assert not (tmp_path / "run").exists()


def test_a_reward_model_given_as_the_policy_is_one_line(reward_model_dir, tmp_path, capsys):
    result = _in_process(capsys, "fit", "sft", "--task", "arithmetic", "--model.backbone", str(reward_model_dir),
                         "--out", str(tmp_path / "run"))
    assert _one_line_error(result) == (f"{reward_model_dir} is a reward model (stage reward_model); model.backbone "
                                       "needs a policy checkpoint (pretrain, sft, or an RL or DPO stage's)")
    assert not (tmp_path / "run").exists()


def test_a_typo_backbone_is_one_line_with_the_closest_name_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ["fit", "sft", "--task", "arithmetic", "--model.backbone", "gpt2-tiy", "--out", str(tmp_path / "run")]
    message = _one_line_error(_run(*args, cwd=tmp_path))
    assert message.startswith("model.backbone: unknown backbone 'gpt2-tiy'; did you mean 'gpt2-tiny'?")
    for debug_args in (["--debug", *args], [*args, "--debug"]):  # after the command, fit would read an override
        assert main(debug_args) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "ConfigError" in err
        assert err.splitlines()[-1] == f"rlhf-lab fit: error: {message}"


def test_user_errors_in_process(make_policy, reward_model_dir, tmp_path, capsys):
    sft = tmp_path / "runs" / "sft"
    make_policy().save(str(sft), extra={"stage": "sft"})
    out = str(tmp_path / "run")
    capsys.readouterr()  # the save's progress bar
    assert main(["fit", "ppo", "--task", "arithmetic", "--reward.source", "reward_model", "--reward.path", str(sft),
                 "--model.backbone", str(sft), "--out", out]) == 2
    assert capsys.readouterr().err == (f"rlhf-lab fit: error: {sft} is a policy (stage sft), not a reward model; "
                                       "reward.path needs a reward-model checkpoint (stage reward_model)\n")
    assert main(["fit", "sft", "--task", "arithmetic", "--trainer.on_nonfinite", "ignore"]) == 2
    assert "trainer: on_nonfinite must be one of 'skip', 'stop'; got 'ignore'" in capsys.readouterr().err
    assert main(["generate", str(reward_model_dir), "--prompt", "Q: 1+1=\nA:"]) == 2
    assert capsys.readouterr().err.startswith(f"rlhf-lab generate: error: {reward_model_dir} is a reward model")
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "Q"]) == 2
    assert "rlhf-lab generate: error: policy folder" in capsys.readouterr().err


def test_every_fit_logs_skipped_steps(tmp_path):
    out = tmp_path / "run"
    assert main(["fit", "sft", "--task", "arithmetic", "--out", str(out), "--trainer.max_steps", "2",
                 "--eval.prompts", "0", *TINY]) == 0
    metrics = next(out.rglob("metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")] == [0.0, 0.0]


def test_build_run_refuses_empty_training_rows_before_writing_anything(tmp_path):
    from rlhf_lab.errors import DataError
    from rlhf_lab.runs.builder import FitConfig, build_run

    config = FitConfig(stage="reward_model", task="arithmetic", out=str(tmp_path / "run"))
    with pytest.raises(DataError) as info:
        build_run(config, rows=([], [{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    assert str(info.value) == ("the rows handed to build_run: no training rows for 'reward_model' (after "
                               "filtering); it needs at least one")
    assert not (tmp_path / "run").exists()


def test_a_config_the_builder_refuses_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["fit", "ppo", "--task", "arithmetic", "--out", str(tmp_path), "--reward.source", "reward_model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["rlhf-lab fit: error: reward.source is reward_model: set reward.path to its "
                                 "checkpoint folder"]
    assert not os.listdir(tmp_path)  # refused before anything was written
