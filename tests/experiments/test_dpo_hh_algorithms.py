"""experiments/dpo_hh.py --algorithm: the same HH-format pairs through ORPO and KTO."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 384}", "--model.vocab_size", "300",
        "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, variant", [("orpo", "orpo"), ("kto", "kto")])
def test_dpo_hh_takes_another_offline_algorithm(tmp_path, algorithm, variant):
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps({"chosen": f"\n\nHuman: hello {i}\n\nAssistant: Hi, how can I help?",
                                      "rejected": f"\n\nHuman: hello {i}\n\nAssistant: Go away."}) + "\n"
                          for i in range(24)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "dpo_hh.py"), "--algorithm", algorithm,
                           "--data.path", str(hh), "--out", str(tmp_path), *TINY, "--config.lr", "1e-3"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tempfile.mkdtemp())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{algorithm} loss" in proc.stdout
    summary = json.loads((tmp_path / algorithm / "summary.json").read_text())
    config = summary["config"]["config"]
    # The registry's preset replaced the file's variant; the file's and the command line's other knobs stay.
    assert (summary["stage"], config["variant"], config["lr"], config["max_length"]) == (algorithm, variant, 1e-3, 192)
    assert summary["steps"] == 4
