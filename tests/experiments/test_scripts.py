"""Every experiment script runs in a tiny setting and leaves its checkpoints."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sft_then_ppo_on_gold_script(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "sft_then_ppo_on_gold.py"), "--out", str(out),
         "--sft-steps", "5", "--ppo-iterations", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "greedy gold accuracy: SFT" in proc.stdout
    for stage in ("sft", "ppo"):
        assert (out / stage / "model.safetensors").exists()
    assert (out / "ppo" / "scalar_head.safetensors").exists()
