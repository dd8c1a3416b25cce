"""The registry's kto and orpo reach the demo and compare by name, as dpo does: KTO on the demo's
gold-ranked pairs (split into rows), ORPO with no reference model, and both in a comparison."""

import json
import os

import pytest

from rlhf_lab.cli import main


@pytest.mark.slow
def test_quick_demo_and_compare_take_kto_and_orpo(tmp_path):
    from rlhf_lab.compare import CompareConfig, run_compare

    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--no-progress", "--out", out, "--algorithm", "kto"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["rl"]["algorithm"] == "kto" and summary["rl"]["steps"] == 4
    config = json.load(open(os.path.join(out, "kto", "rlhf_lab_policy.json")))["config"]
    assert (config["variant"], config["batch_size"]) == ("kto", 64)
    stage = json.load(open(os.path.join(out, "kto", "summary.json")))
    pairs = summary["reward_model"]["pairs"]
    n_val = max(1, pairs // 10)
    # The stage took the reward model's training pairs; its budget counts rows, two per pair.
    assert stage["train_rows"] == pairs - n_val
    assert "train/kl_reference_point" in stage["metrics"]

    outcome = run_compare(CompareConfig(algorithms=("orpo", "kto"), seeds=1, quick=True, evals=2),
                          str(tmp_path / "cmp"), echo=lambda *a: None)
    assert sorted(r["algorithm"] for r in outcome.results) == ["kto", "orpo"]
    report = open(outcome.report).read()
    assert "`kto`:" in report and "rows (KTO splits each pair into two)" in report
    assert "DPO (orpo, kto) is offline" in report
