"""`rlhf-lab bench` on a tiny workload built in tmp_path: one JSON line per stage, with its fields.

The workload has the shared benchmark's files and shapes (16 rows, 8 pairs, 4 prompts × 4 samples
of 32 tokens) on a 1-layer, 32-wide GPT-2, so each stage takes about a second. Nothing here
asserts a time: only that every field is there, typed and positive.
"""

from __future__ import annotations

import json
import random

import pytest

from rlhf_lab.bench import BASE_STAGES, SAMPLE, stage_names
from rlhf_lab.cli import main

WORDS = ("alice rabbit queen hatter tea party cat river tree house small big red blue white one two three "
         "four five plus minus equals was sat under over on late curious shouted smiled").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A workload folder like ../shared/bench, with a small BPE and a 1-layer GPT-2."""
    from rlhf_lab.models.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("workload")
    rng = random.Random(0)
    prompts = [f"Q: {_text(rng, 6)}\nA:" for _ in range(96)]
    tokenizer = train_bpe_tokenizer([*WORDS, *prompts], vocab_size=300)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "model.json").write_text(json.dumps(
        {"vocab_size": len(tokenizer), "n_positions": 160, "n_embd": 32, "n_layer": 1, "n_head": 2}))
    with open(folder / "sft.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p, "completion": " " + _text(rng, 20)}) + "\n" for p in prompts)
    with open(folder / "pref.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p, "chosen": " " + _text(rng, 12), "rejected": " " + _text(rng, 9)}) + "\n"
                     for p in prompts)
    with open(folder / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return folder


# reinforce and rloo run the same online stage as grpo and ppo, with other presets: not repeated here.
@pytest.mark.parametrize("stage", [*(s for s in BASE_STAGES if s not in ("reinforce", "rloo")), SAMPLE])
def test_bench_prints_one_json_line_per_stage(stage, workload, capsys):
    code = main(["bench", "--workload", str(workload), "--stage", stage, "--steps", "2", "--warmup", "1"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    row = json.loads(lines[0])
    assert list(row) == ["stage", "step_s", "tokens_per_s", "peak_rss_mb", "bare_step_s"]
    assert row["stage"] == stage
    for key in ("step_s", "tokens_per_s", "peak_rss_mb", "bare_step_s"):
        assert isinstance(row[key], float) and row[key] > 0, (key, row)


def test_all_is_the_readme_stages_sampling_then_the_other_online_algorithms():
    from rlhf_lab.algorithms import ALGORITHMS

    names = stage_names()
    assert names[:9] == ("pretrain", "sft", "reward", "dpo", "ppo", "reinforce", "rloo", "grpo", "sample")
    online = {n for n, a in ALGORITHMS.items() if a.stage in ("online_rl", "online_dpo")}
    assert set(names[9:]) == online - set(names[:8])
    assert "dpo" not in names[9:]  # offline: the README's dpo stage


@pytest.mark.parametrize("args, message", [
    (["--stage", "nope"], "--stage: unknown stage 'nope'"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_are_one_line_and_exit_code_2(args, message, workload, capsys):
    assert main(["bench", "--workload", str(workload), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-lab bench: error: ") and message in err[0], err


def test_a_workload_without_its_files_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "model.json").write_text("{}")
    assert main(["bench", "--workload", str(tmp_path), "--stage", "sft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing tokenizer.json, sft.jsonl, pref.jsonl, prompts.jsonl" in err[0], err
    assert main(["bench", "--workload", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_bad_model_json_names_the_file(workload, tmp_path, capsys):
    import shutil

    folder = tmp_path / "w"
    shutil.copytree(workload, folder)
    (folder / "model.json").write_text(json.dumps({"n_layers": 2}))
    assert main(["bench", "--workload", str(folder), "--stage", "sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.json: unknown GPT2Config field(s) n_layers" in err


def test_the_trl_side_by_side_script_states_its_stages_and_refuses_ppo():
    """benchmarks/trl_side_by_side.py needs TRL, which this project does not install; without it,
    its arguments still parse: --help lists the stages it runs, and ppo (TRL 1.16 has no PPO
    trainer) or a zero step count is one usage line and exit code 2, before TRL is imported."""
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "trl_side_by_side.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "{sft,reward,dpo,grpo,rloo,ppo,all}" in shown.stdout
    for args, message in ((["--stage", "ppo"], "TRL 1.16.0 has no PPO trainer"),
                          (["--steps", "0"], "need --steps >= 1")):
        refused = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr.strip().splitlines()[-1], refused.stderr
