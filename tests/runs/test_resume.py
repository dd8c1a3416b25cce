"""Kill-and-resume: a run killed with SIGKILL and resumed ends exactly as
an uninterrupted run of the same seed (weights bit for bit, metrics.csv and samples.csv row for row
except wall-clock columns). Every case runs real processes (`faults.py`). The demo's case is
tests/test_demo.py::test_full_demo_killed_and_resumed_gives_the_readme_numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("faults", Path(__file__).with_name("faults.py"))
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)
at_fault, cli, kill_at, run, same_run = faults.at_fault, faults.cli, faults.kill_at, faults.run, faults.same_run

pytestmark = pytest.mark.slow

TINY = ["--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2}", "--trainer.enable_progress_bar", "false"]
# stage -> arguments; each run is long enough to be killed between checkpoints.
CASES = {
    "pretrain": ["--task", "arithmetic", "--trainer.max_steps", "40", "--checkpoint.every_n_steps", "3",
                 "--config.batch_size", "8"],
    "sft": ["--task", "arithmetic", "--trainer.max_steps", "40", "--checkpoint.every_n_steps", "3",
            "--config.batch_size", "8", "--eval.prompts", "8", "--eval.every", "10"],
    "reward_model": ["--data.format", "preference", "--trainer.max_steps", "40", "--checkpoint.every_n_steps", "3",
                     "--config.batch_size", "4"],
    "dpo": ["--data.format", "preference", "--trainer.max_steps", "40", "--checkpoint.every_n_steps", "3",
            "--config.batch_size", "4", "--eval.prompts", "4", "--eval.every", "10"],
    "ppo": ["--task", "arithmetic", "--trainer.max_steps", "48", "--checkpoint.every_n_steps", "16",
            "--config.prompts_per_step", "8", "--eval.prompts", "8", "--eval.every", "16"],
    "grpo": ["--task", "arithmetic", "--trainer.max_steps", "24", "--checkpoint.every_n_steps", "2",
             "--config.prompts_per_step", "4", "--eval.prompts", "8", "--eval.every", "8"],
    "online_dpo": ["--task", "arithmetic", "--trainer.max_steps", "24", "--checkpoint.every_n_steps", "2",
                   "--config.batch_size", "8", "--eval.prompts", "8", "--eval.every", "8"],
}
# stage -> where its run is killed (faults.at_fault), and the checkpoint files it leaves (a
# partial write as NAME.tmp). A checkpoint writes step=N.ckpt, then last.ckpt.
FAULTS = {
    "pretrain": ({"step": 20}, ["last.ckpt", "step=18.ckpt"]),  # two steps after a checkpoint
    "sft": ({"write": 2}, ["last.ckpt.tmp", "step=3.ckpt"]),  # last.ckpt half-written: resumes from step=3
    "reward_model": ({"step": 2}, None),  # before the first checkpoint: starts over
    "dpo": ({"write": 7}, ["last.ckpt", "step=12.ckpt.tmp", "step=9.ckpt"]),  # resumes from step 9
    "ppo": ({"step": 24}, ["last.ckpt", "step=16.ckpt"]),  # 8 optimiser steps per iteration
    "grpo": ({"write": 24}, ["last.ckpt", "last.ckpt.tmp", "step=24.ckpt"]),  # writing the final one
    "online_dpo": ({"step": 13}, ["last.ckpt", "step=12.ckpt"]),  # after the evaluation of step 8
}


def _checkpoint_files(folder: Path) -> list[str] | None:
    if not folder.is_dir():
        return None
    return sorted(re.sub(r"\.tmp-\d+$", ".tmp", name) for name in os.listdir(folder))


def _pairs_file(path: Path) -> str:
    """Arithmetic preference pairs: the right answer chosen over a wrong one."""
    with open(path, "w") as f:
        for a in range(8):
            for b in range(8):
                f.write(json.dumps({"prompt": f"Q: {a}+{b}=\nA:", "chosen": f" {a + b}",
                                    "rejected": f" {(a + b + 3) % 17}"}) + "\n")
    return str(path)


def _in_one_process(commands: list[list[str]]) -> list[str]:
    """One Python process that runs these CLI commands in turn (one import for all)."""
    return [sys.executable, "-c", "import json, sys; from rlhf_lab.cli import main; "
            "codes = [main(a) for a in json.loads(sys.argv[1])]; sys.exit(max(codes))", json.dumps(commands)]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Every stage trained twice: uninterrupted (folder a), and killed then resumed (folder b).

    The uninterrupted runs share one process, which runs beside the killed ones; each killed run
    is its own process, SIGKILLed at the point FAULTS names; one process then
    resumes them all. Returns the root folder.
    """
    root = tmp_path_factory.mktemp("resume")
    pairs = _pairs_file(root / "pairs.jsonl")

    def args(stage: str, out: Path) -> list[str]:
        extra = ["--data.path", pairs] if "--data.format" in CASES[stage] else []
        return ["fit", stage, *CASES[stage], *TINY, *extra, "--out", str(out)]

    reference = subprocess.Popen(_in_one_process([args(s, root / "a") for s in CASES]), env=faults.ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for stage in CASES:
            plan, files = FAULTS[stage]
            kill_at(at_fault(args(stage, root / "b"), plan))
            assert _checkpoint_files(root / "b" / stage / "checkpoints") == files, stage
            assert not os.path.exists(root / "b" / stage / "COMPLETE.json")
        run(_in_one_process([[*args(s, root / "b"), "--resume"] for s in CASES]))
    finally:
        _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err[-3000:]
    return root


@pytest.mark.parametrize("stage", list(CASES))
def test_killed_run_resumes_exactly(stage, resumed):
    same_run(str(resumed / "a" / stage), str(resumed / "b" / stage))
    # No partial file is left; keep=1 holds, except a step=N.ckpt the run resumed from (Lightning keeps it).
    resumed_from = ["step=3.ckpt"] if stage == "sft" else []
    assert _checkpoint_files(resumed / "b" / stage / "checkpoints") == \
        sorted({*_checkpoint_files(resumed / "a" / stage / "checkpoints"), *resumed_from})
    with open(resumed / "b" / stage / "summary.json") as f:
        assert json.load(f)["steps"] == int(CASES[stage][CASES[stage].index("--trainer.max_steps") + 1])


def test_compare_killed_and_resumed_matches(tmp_path):
    args = ["compare", "--algorithms", "grpo", "--seeds", "1", "--quick", "--evals", "2", "--checkpoint-every", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    reference = subprocess.Popen(cli(*args, "--out", a), env=faults.ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Killed in the GRPO run (writing its third checkpoint file), then the same command again.
    kill_at(at_fault([*args, "--out", b], {"write": 3, "under": "grpo-s0"}))
    assert reference.wait(timeout=900) == 0, reference.stderr.read()[-3000:]
    reference.stderr.close()
    run(cli(*args, "--out", b), timeout=900)
    same_run(os.path.join(a, "runs", "grpo-s0", "grpo"), os.path.join(b, "runs", "grpo-s0", "grpo"))
    ra, rb = (json.load(open(os.path.join(d, "runs", "grpo-s0", "result.json"))) for d in (a, b))
    for key in ("gold_reward", "proxy_reward", "kl", "samples", "generated_tokens"):
        assert ra[key] == rb[key]
