"""The demo end to end: the run folder it leaves, and (slow) the gain PPO must show."""

import csv
import json
import os

import pytest
import torch

from rlhf_lab.cli import main


def _check_run_folder(out, algorithm="ppo"):
    for stage in ("pretrain", "sft", "reward_model", algorithm):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "rlhf_lab_policy.json", "metrics.csv"):
            assert os.path.exists(os.path.join(out, stage, name)), f"{stage}/{name}"
    assert os.path.exists(os.path.join(out, "reward_model", "scalar_head.safetensors"))
    assert os.path.isdir(os.path.join(out, algorithm, "critic")) == (algorithm == "ppo")
    with open(os.path.join(out, "rl_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, algorithm, "metrics.csv")) as f:
        header = set(next(csv.reader(f)))
    if algorithm == "dpo":
        assert {"train/loss", "train/reward_margin", "train/reward_accuracy", "val/reward_accuracy"} <= header
    else:
        assert {"train/reward", "train/gold_reward", "train/kl"} <= header
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) >= {"pretrain", "sft", "reward_model", "rl", "seconds"}
    assert "val_loss" in summary["pretrain"] and "gold_accuracy" in summary["sft"]
    assert "val_accuracy" in summary["reward_model"]
    assert summary["rl"]["algorithm"] == algorithm
    assert {"gold_accuracy", "reward", "kl"} <= set(summary["rl"])
    return summary


# PPO's run folder is checked on the full demo (test_full_demo_...), online DPO's on the first
# demo of test_quick_demo_from_a_local_hf_folder: one demo run each.
@pytest.mark.parametrize("algorithm", ["dpo"])
def test_quick_demo_writes_the_run_folder(tmp_path, capsys, algorithm):
    out = str(tmp_path / "run")
    assert main(["demo", "--quick", "--no-progress", "--out", out, "--algorithm", algorithm]) == 0
    summary = _check_run_folder(out, algorithm)
    # The SFT gold score is the judge's mean on the saved SFT policy's greedy answers.
    from rlhf_lab.eval import greedy_completions
    from rlhf_lab.policy import Policy
    from rlhf_lab.tasks import get_task

    task = get_task("arithmetic")
    answers = greedy_completions(Policy.load(os.path.join(out, "sft")), task.eval_prompts(), task.max_new_tokens)
    assert summary["sft"]["gold_accuracy"] == pytest.approx(
        sum(task.gold_reward(task.eval_prompts(), answers)) / len(answers))
    printed = capsys.readouterr().out
    for title in ("== pretrain", "== sft", "== reward model", f"== {algorithm}", "== generations before and after RL"):
        assert title in printed
    assert f"wrote {out}/" in printed

    # Interrupted in its last stage (that stage and the demo unfinished): --resume keeps the
    # finished stages' folders untouched, trains the last stage again and ends with the same numbers.
    from rlhf_lab.runs.checkpoint import COMPLETE_FILE

    kept = {name: os.stat(os.path.join(out, name, "model.safetensors")).st_mtime_ns
            for name in ("pretrain", "sft", "reward_model")}
    for folder in (out, os.path.join(out, algorithm)):
        os.remove(os.path.join(folder, COMPLETE_FILE))
    assert main(["demo", "--quick", "--no-progress", "--out", out, "--algorithm", algorithm, "--resume"]) == 0
    assert {name: os.stat(os.path.join(out, name, "model.safetensors")).st_mtime_ns for name in kept} == kept
    resumed = _check_run_folder(out, algorithm)
    assert (resumed["sft"], resumed["rl"]["gold_accuracy"]) == (summary["sft"], summary["rl"]["gold_accuracy"])


def test_quick_demo_on_alice_with_the_lstm_toy_model(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["demo", "--quick", "--no-progress", "--out", out, "--task", "alice", "--backbone", "lstm"]) == 0
    summary = _check_run_folder(out)
    assert (summary["task"], summary["backbone"]) == ("alice", "lstm")
    with open(os.path.join(out, "sft", "config.json")) as f:
        assert json.load(f)["model_type"] == "rlhf_lab_lstm"
    assert "on 43 eval prompts" in capsys.readouterr().out  # the alice questions, not arithmetic's 200


def test_quick_demo_with_lora_trains_an_adapter_against_the_adapter_free_reference(tmp_path):
    from rlhf_lab.policy import Policy

    out = str(tmp_path / "run")
    assert main(["demo", "--quick", "--no-progress", "--out", out, "--algorithm", "reinforce", "--lora",
                 "--lora-rank", "4"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["rl"]["lora"] is True and summary["config"]["lora"]["r"] == 4
    assert os.path.exists(os.path.join(out, "reinforce", "adapter_config.json"))
    policy = Policy.load(os.path.join(out, "reinforce"))
    sft = Policy.load(os.path.join(out, "sft"))
    # The adapter moved the policy away from SFT; the base under it is SFT, bit for bit.
    base = dict(policy.model.get_base_model().named_parameters())
    for name, p in sft.model.named_parameters():
        prefix, leaf = name.rsplit(".", 1)  # peft keeps a wrapped layer's weights under base_layer
        key = name if name in base else f"{prefix}.base_layer.{leaf}"
        assert torch.equal(base[key], p), name


def test_quick_demo_from_a_local_hf_folder(tmp_path):
    first = str(tmp_path / "first")
    assert main(["demo", "--quick", "--no-progress", "--out", first, "--algorithm", "online_dpo"]) == 0
    _check_run_folder(first, "online_dpo")
    out = str(tmp_path / "second")
    assert main(["demo", "--quick", "--no-progress", "--out", out, "--algorithm", "online_dpo",
                 "--backbone", os.path.join(first, "sft")]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["backbone"] == os.path.join(first, "sft")
    # Continued pretraining starts from the folder's weights: its loss starts far below a fresh model's.
    with open(os.path.join(first, "pretrain", "metrics.csv")) as f:
        fresh = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    with open(os.path.join(out, "pretrain", "metrics.csv")) as f:
        warm = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert warm[0] < fresh[0] - 1.0


# The default demo's seed-0 numbers (README), from an uninterrupted run with the locked versions.
SEED0 = {"sft_gold": 0.33, "pairs": 1696, "rm_val_accuracy": 0.923, "rl_gold": 0.54, "rl_reward": 0.227,
         "rl_kl": 0.555, "steps": 480}


@pytest.mark.slow
def test_full_demo_killed_and_resumed_gives_the_readme_numbers(tmp_path):
    """The default demo, SIGKILLed in its pretraining and resumed, ends with the seed-0 numbers of
    an uninterrupted run: resume is exact, and a change of a dependency or of the code that moves
    the numbers is caught here."""
    import importlib.util
    import subprocess
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("faults", Path(__file__).parent / "runs" / "faults.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    out = str(tmp_path / "run")
    args = ["demo", "--no-progress", "--out", out]
    # Killed at pretraining step 150 of 1000 (checkpoints every 100), so little work is lost: the
    # resumed demo continues pretraining from step 100 and every later stage from its random stream.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the README's numbers come from the default threads
    faults.kill_at(faults.at_fault(args, {"step": 150}), env=env)
    assert sorted(os.listdir(os.path.join(out, "pretrain", "checkpoints"))) == ["last.ckpt", "step=100.ckpt"]
    assert not os.path.exists(os.path.join(out, "summary.json"))
    resumed = subprocess.run(faults.cli(*args, "--resume"), env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _check_run_folder(out)
    seen = {"sft_gold": summary["sft"]["gold_accuracy"], "pairs": summary["reward_model"]["pairs"],
            "rm_val_accuracy": round(summary["reward_model"]["val_accuracy"], 3),
            "rl_gold": summary["rl"]["gold_accuracy"], "rl_reward": round(summary["rl"]["reward"], 3),
            "rl_kl": round(summary["rl"]["kl"], 3), "steps": summary["rl"]["steps"]}
    assert seen == SEED0
    assert summary["rl"]["gold_accuracy"] >= summary["sft"]["gold_accuracy"] + 0.10  # what the README shows


def test_cli_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--seed", "--logger", "--quick", "--task", "--backbone", "--lora", "--algorithm"):
        assert flag in text
    assert main([]) == 2


def test_rank_into_pairs_pairs_each_completion_with_every_lower_one():
    import random

    from rlhf_lab.demo import rank_into_pairs

    prompts = ["a", "a", "a", "b", "a", "b"]
    completions = [" 1", " 2", " 3", " 7", " 2", " 7"]
    scores = [0.5, 1.0, 0.0, 0.3, 9.9, 0.3]  # " 2" for "a" recurs: its first score (1.0) counts
    pairs = rank_into_pairs(prompts, completions, scores, random.Random(0))
    # "a": 2 > 1 > 3 gives three pairs; "b" has one distinct completion, so none.
    assert sorted((p["prompt"], p["chosen"], p["rejected"]) for p in pairs) == [
        ("a", " 1", " 3"), ("a", " 2", " 1"), ("a", " 2", " 3")]
    capped = rank_into_pairs(prompts, completions, scores, random.Random(0), max_pairs_per_prompt=2)
    assert len(capped) == 2 and all(p in pairs for p in capped)
