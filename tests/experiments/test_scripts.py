"""Every experiment script runs in a tiny setting, and every YAML config parses against its stage."""

import glob
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

from rlhf_lab.algorithms import stage_classes
from rlhf_lab.config import load_yaml
from rlhf_lab.experiment import build_fit_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "**", "*.yaml"), recursive=True))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
TINY_GPT2 = ["--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 384}", "--model.vocab_size", "300"]
QUIET = ["--trainer.enable_progress_bar", "false"]


def test_there_are_configs_and_scripts():
    assert len(CONFIGS) >= 8 and len(SCRIPTS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_yaml_parses_against_its_stage_config(path):
    config = build_fit_config(load_yaml(path), source=path)
    assert isinstance(config.config, stage_classes(config.stage_name)[1])
    # Every key the file sets under config: reached the stage's dataclass unchanged.
    for key, value in (load_yaml(path).get("config") or {}).items():
        if key != "preset":
            assert getattr(config.config, key) == value, key


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_every_script_is_short(path):
    with open(path) as f:
        assert len(f.read().splitlines()) < 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny Dolly-, HH- and GSM8K-format files (the real ones live in ../shared/data)."""
    d = tmp_path_factory.mktemp("data")
    dolly = [{"instruction": f"Name colour {i}", "context": "" if i % 2 else f"Colours: red blue {i}",
              "response": f"The colour is {'red' if i % 3 else 'blue'}. " * 8} for i in range(24)]
    hh = [{"chosen": f"\n\nHuman: hello {i}\n\nAssistant: Hi, how can I help?",
           "rejected": f"\n\nHuman: hello {i}\n\nAssistant: Go away."} for i in range(24)]
    gsm = [{"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
           for a in range(6) for b in range(4)]
    for name, rows in (("dolly", dolly), ("hh", hh), ("gsm8k", gsm)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _run(script: str, *args: str, quiet: bool = True) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args, *(QUIET if quiet else [])],
                          capture_output=True, text=True, timeout=600, env=env,
                          cwd=tempfile.mkdtemp())  # scripts run from any directory
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_toy_pipeline(tmp_path):
    out = _run("toy_pipeline.py", "--out", str(tmp_path), "--trainer.max_steps", "3", "--eval.prompts", "8")
    assert "reward model val accuracy" in out and "SFT" in out and "-> PPO" in out
    for stage in ("pretrain", "sft", "reward_model", "ppo"):
        summary = json.loads((tmp_path / stage / "summary.json").read_text())
        # PPO's one iteration takes all its 2 x 4 minibatch steps before max_steps can stop it.
        assert summary["steps"] == (8 if stage == "ppo" else 3) and (tmp_path / stage / "metrics.csv").exists()
    assert (tmp_path / "reward_model" / "scalar_head.safetensors").exists()


def test_lora_sft_dolly(tmp_path, data_dir):
    out = _run("lora_sft_dolly.py", "--data.path", str(data_dir / "dolly.jsonl"), "--out", str(tmp_path),
               "--trainer.max_steps", "3", "--eval.prompts", "4", "--eval.max_new_tokens", "8", "--model.vocab_size",
               "300", "--model.overrides",
               "{num_hidden_layers: 1, hidden_size: 32, ffn_dim: 64, word_embed_proj_dim: 32, max_position_embeddings: 320}")
    for key in ("val/rouge1", "val/rougeL", "val/reference_perplexity"):
        assert key in out
    assert (tmp_path / "sft" / "adapter_config.json").exists()  # a LoRA adapter folder
    metrics = json.loads((tmp_path / "sft" / "eval" / "metrics.json").read_text())["metrics"]
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    # The reloaded adapter scores the held-out references as the end of training did (same weights).
    assert metrics["val/reference_perplexity"] == pytest.approx(
        summary["history"][-1]["val/reference_perplexity"], rel=1e-4)


def test_dpo_hh(tmp_path, data_dir):
    out = _run("dpo_hh.py", "--data.path", str(data_dir / "hh.jsonl"), "--out", str(tmp_path),
               "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", *TINY_GPT2)
    assert "implicit-reward accuracy" in out
    # At the start the policy is its reference and the DPO loss is log 2; 4 steps moved it.
    loss = json.loads((tmp_path / "dpo" / "summary.json").read_text())["metrics"]["val/loss"]
    assert abs(loss - math.log(2)) > 1e-4


def test_rl_gsm8k(tmp_path, data_dir):
    path = str(data_dir / "gsm8k.jsonl")
    out = _run("rl_gsm8k.py", "--data.path", path, "--data.val_path", path, "--out", str(tmp_path),
               "--trainer.max_steps", "2", "--eval.prompts", "4", "--eval.max_new_tokens", "8",
               "--grpo.config.max_new_tokens", "8", *TINY_GPT2)
    assert "-> GRPO" in out
    rl = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    sft = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert rl["config"]["config"]["algorithm"] == "grpo" and rl["config"]["reward"]["source"] == "gsm8k"
    # --grpo.key reached the RL stage only (SFT has no such key and kept its own config).
    assert rl["config"]["config"]["max_new_tokens"] == 8 and "max_new_tokens" not in sft["config"]["config"]
    assert rl["steps"] == 2 and len(rl["history"]) == 2  # evaluated at the start and at the end


def test_sft_then_ppo_on_gold(tmp_path):
    out = _run("sft_then_ppo_on_gold.py", "--out", str(tmp_path), "--sft-steps", "5", "--ppo-iterations", "1", quiet=False)
    assert "greedy gold accuracy: SFT" in out
    for stage in ("sft", "ppo"):
        assert (tmp_path / stage / "model.safetensors").exists()
    assert (tmp_path / "ppo" / "scalar_head.safetensors").exists()


@pytest.mark.slow
def test_compare_algorithms(tmp_path):
    out = _run("compare_algorithms.py", "--out", str(tmp_path), "--algorithms", "reinforce,dpo", "--seeds", "1",
               "--quick", quiet=False)
    assert "1. " in out and "2. " in out and "mean gold score" in out
    assert (tmp_path / "report.md").exists() and (tmp_path / "runs" / "dpo-s0" / "result.json").exists()


SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is absent")
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_quickstart_real_data_commands_run_from_any_directory(tmp_path, monkeypatch, where, capsys):
    """`fit sft --config experiments/configs/sft_gsm8k.yaml` (quickstart §4) from the repository
    root as written, and from another directory with the config's path: the same data is read."""
    from rlhf_lab.cli import main

    config = "experiments/configs/sft_gsm8k.yaml"
    if where == "root":
        monkeypatch.chdir(ROOT)
    else:
        monkeypatch.chdir(tmp_path)
        config = os.path.join(ROOT, config)
    out = str(tmp_path / "run")
    assert main(["fit", "sft", "--config", config, "--trainer.max_steps", "1", "--out", out, "--data.limit", "64",
                 "--eval.prompts", "2", "--eval.max_new_tokens", "4", "--trainer.enable_progress_bar", "false",
                 "--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 384}"]) == 0
    summary = json.loads(open(os.path.join(out, "sft", "summary.json")).read())
    assert os.path.samefile(summary["config"]["data"]["path"], os.path.join(SHARED, "gsm8k", "train.jsonl"))
    assert (summary["train_rows"], summary["steps"]) == (64, 1)
    assert not os.path.exists(os.path.join(str(tmp_path if where == "elsewhere" else ROOT), "runs", "fit"))
