"""`rlhf-lab fit kto` and `fit orpo`: the registry's offline preference presets from files, as `fit dpo`."""

import json

import pytest

from rlhf_lab.cli import main
from rlhf_lab.runs.builder import FitConfig, build_fit_config, build_run

TINY = ["--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2}", "--trainer.enable_progress_bar", "false",
        "--eval.prompts", "0"]


@pytest.fixture
def files(tmp_path, task):
    rows = task.sft_pairs()[0][:24]
    unpaired, pairs = tmp_path / "unpaired.jsonl", tmp_path / "pairs.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"] if i % 2 == 0
                                            else " 42", "label": i % 2 == 0}) + "\n" for i, r in enumerate(rows)))
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"], "rejected": " 42"}) + "\n"
                             for r in rows))
    return {"unpaired": str(unpaired), "preference": str(pairs)}


@pytest.mark.parametrize("fmt, rows", [("unpaired", 24), ("preference", 24)])
def test_fit_kto_on_unpaired_rows_and_on_pairs(tmp_path, files, fmt, rows):
    out = str(tmp_path / "out")
    assert main(["fit", "kto", "--data.format", fmt, "--data.path", files[fmt], "--data.val_fraction", "0.25",
                 "--out", out, "--trainer.max_steps", "2", "--config.batch_size", "8", *TINY]) == 0
    summary = json.load(open(f"{out}/kto/summary.json"))
    assert summary["steps"] == 2 and summary["train_rows"] == rows * 3 // 4  # rows as loaded; pairs split later
    assert summary["config"]["config"]["variant"] == "kto"
    assert {"train/loss", "train/kl_reference_point", "val/loss", "val/reward_accuracy"} <= set(summary["metrics"])
    assert summary["metrics"]["budget/samples"] == 16  # 2 steps of 8 rows


def test_fit_orpo_needs_no_reference_model(tmp_path, files):
    config = build_fit_config({"stage": "orpo", "data": {"format": "preference", "path": files["preference"]},
                               "out": str(tmp_path), "model": {"overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
                               "eval": {"prompts": 0}, "trainer": {"max_steps": 2}})
    assert (config.config.variant, config.config.beta, config.config.nll_coef) == ("orpo", 0.1, 1.0)
    run = build_run(config)
    assert not run.policy.has_reference  # reference-free: no frozen copy in memory
    summary = run.fit()
    assert summary["steps"] == 2 and {"train/nll", "train/log_odds_ratio"} <= set(summary["metrics"])


def test_unpaired_data_needs_the_kto_variant(tmp_path, files, capsys):
    assert main(["fit", "dpo", "--data.format", "unpaired", "--data.path", files["unpaired"], "--out",
                 str(tmp_path), *TINY]) == 2
    assert "only variant 'kto' trains on" in capsys.readouterr().err
    with pytest.raises(ValueError, match="variant 'orpo' needs pairs"):
        FitConfig(stage="orpo", data=build_fit_config({"stage": "kto", "data": {
            "format": "unpaired", "path": files["unpaired"]}}).data)
