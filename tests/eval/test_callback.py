"""EvalCallback: periodic evaluate_policy during fit, val/ metrics in the loggers, sample tables."""

import csv
import glob
import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lab.eval import EvalCallback
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import SFT, OnlineRL, OnlineRLConfig, SFTConfig


def _chars(prompts, completions):
    return [len(c) / 10 for c in completions]


SMALL = dict(lr=3e-3, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=4, minibatches=1, ppo_epochs=1,
             kl_coef=0.1)
EVAL_PROMPTS = 6
MAX_ROWS = 3


def _trainer(logger, max_steps, callback):
    return L.Trainer(max_steps=max_steps, max_epochs=-1, logger=logger, callbacks=[callback],
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, accelerator="cpu", num_sanity_val_steps=0)


def _online(make_policy, task, preset, **overrides):
    config = OnlineRLConfig.preset(preset, **{**SMALL, **overrides})
    policy = make_policy(seed=0, scalar_head=config.baseline == "critic", reference="copy")
    stage = OnlineRL(policy, task.rl_prompts(), CallableSource(_chars), config, gold_fn=CallableSource(_chars))
    return stage, config


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_online_run_logs_val_metrics_and_sample_table(make_policy, task, tmp_path):
    stage, config = _online(make_policy, task, "reinforce")
    assert config.steps_per_iteration == 1
    seen = []

    def gold(prompts, completions):  # records the module's state while the callback evaluates
        seen.append((stage.policy.model.training, torch.is_grad_enabled()))
        return task.gold_reward(prompts, completions)

    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every_n_steps=2, reward_fn=_chars, gold_fn=gold,
                            max_new_tokens=4, max_rows=MAX_ROWS, at_start=True)
    L.seed_everything(0, verbose=False)
    _trainer(CSVLogger(str(tmp_path), name="run", version=""), 4 * config.steps_per_iteration, callback).fit(stage)

    # at_start (step 0), steps 2 and 4; at_end lands on step 4 again and is not repeated.
    assert [h["step"] for h in callback.history] == [0, 2, 4]
    assert seen == [(False, False)] * 3
    expected = {"val/reward", "val/gold_reward", "val/kl", "val/distinct_2", "val/response_length"}
    for h in callback.history:
        assert expected <= set(h)
        assert "val/rouge1" not in h and "val/win_rate" not in h

    rows = _rows(tmp_path / "run" / "metrics.csv")
    val_rows = [r for r in rows if r.get("val/reward")]
    assert [int(r["step"]) for r in val_rows] == [0, 2, 4]
    for row, h in zip(val_rows, callback.history, strict=True):
        for key in expected:
            assert row[key] != "" and float(row[key]) == pytest.approx(h[key])
    assert any(r.get("train/reward") for r in rows)  # the stage's own logging is untouched

    table = _rows(tmp_path / "run" / "samples.csv")
    with open(tmp_path / "run" / "samples.csv") as f:
        header = f.readline().strip().split(",")
    assert header == ["step", "prompt", "completion", "reward", "gold_reward"]
    assert [int(r["step"]) for r in table] == [0] * MAX_ROWS + [2] * MAX_ROWS + [4] * MAX_ROWS
    assert [r["prompt"] for r in table[:MAX_ROWS]] == task.eval_prompts()[:MAX_ROWS]
    assert callback.last_result.table()[1][0][1] == table[-MAX_ROWS]["completion"]

    # The module is back in train mode; the frozen reference copy stays in eval mode.
    assert stage.training and stage.policy.model.training
    assert not stage.policy.reference.training


def test_multi_step_iterations_evaluate_when_a_multiple_is_reached(make_policy, task, tmp_path):
    # PPO with 2 optimiser steps per iteration: global_step goes 2, 4, 6. every_n_steps=3 is reached
    # during the batches ending at 4 (3) and 6 (6); the evaluation is logged at the step seen.
    stage, config = _online(make_policy, task, "ppo", ppo_epochs=2)
    assert config.steps_per_iteration == 2
    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every_n_steps=3, gold_fn=task.gold_reward,
                            max_new_tokens=4, max_rows=2)
    L.seed_everything(0, verbose=False)
    _trainer(CSVLogger(str(tmp_path), name="ppo", version=""), 3 * config.steps_per_iteration, callback).fit(stage)
    assert [h["step"] for h in callback.history] == [4, 6]
    rows = _rows(tmp_path / "ppo" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("val/gold_reward")] == [4, 6]
    assert "val/reward" not in callback.history[0]  # no reward_fn given
    assert len(_rows(tmp_path / "ppo" / "samples.csv")) == 2 * 2
    assert stage.policy.model.training


def test_sft_with_references_logs_rouge_and_perplexity(make_policy, task, tmp_path):
    train, val = task.sft_pairs()
    policy = make_policy(seed=0)
    stage = SFT(policy, train[:16], config=SFTConfig(lr=1e-3, batch_size=8))
    callback = EvalCallback([r["prompt"] for r in val[:EVAL_PROMPTS]], every_n_steps=1, gold_fn=task.gold_reward,
                            references=[r["completion"] for r in val[:EVAL_PROMPTS]], max_new_tokens=4,
                            max_rows=MAX_ROWS, table_name="sft_samples")
    L.seed_everything(0, verbose=False)
    _trainer(CSVLogger(str(tmp_path), name="sft", version=""), 2, callback).fit(stage)

    assert [h["step"] for h in callback.history] == [1, 2]
    rows = [r for r in _rows(tmp_path / "sft" / "metrics.csv") if r.get("val/perplexity")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("val/rouge1", "val/rougeL", "val/perplexity", "val/gold_reward", "val/distinct_2"):
            assert row[key] != ""
        assert float(row["val/perplexity"]) > 1.0
        assert 0.0 <= float(row["val/rougeL"]) <= 1.0
        assert "val/kl" not in row or row["val/kl"] == ""  # no reference policy
    table = _rows(tmp_path / "sft" / "sft_samples.csv")
    assert len(table) == 2 * MAX_ROWS
    assert [r["reference"] for r in table[:MAX_ROWS]] == [r["completion"] for r in val[:MAX_ROWS]]
    assert stage.training and policy.model.training


def test_wandb_offline_run_gets_the_table(make_policy, task, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    stage, config = _online(make_policy, task, "reinforce")
    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every_n_steps=2, reward_fn=_chars,
                            gold_fn=task.gold_reward, max_new_tokens=4, max_rows=MAX_ROWS)
    logger = WandbLogger(project="rlhf_lab_test", name="eval-callback", save_dir=str(tmp_path), offline=True)
    try:
        L.seed_everything(0, verbose=False)
        _trainer(logger, 2 * config.steps_per_iteration, callback).fit(stage)
        run_dir = logger.experiment.dir  # <save_dir>/wandb/offline-run-*/files
        summary = {k: logger.experiment.summary[k] for k in ("val/gold_reward", "samples")}
    finally:
        wandb.finish()

    assert [h["step"] for h in callback.history] == [2]
    tables = glob.glob(os.path.join(run_dir, "media", "table", "samples_*.table.json"))
    assert len(tables) == 1, os.listdir(run_dir)
    with open(tables[0]) as f:
        logged = json.load(f)
    assert logged["columns"] == ["prompt", "completion", "reward", "gold_reward"]
    assert len(logged["data"]) == MAX_ROWS
    assert [row[0] for row in logged["data"]] == task.eval_prompts()[:MAX_ROWS]
    # The run's summary holds the last val/ metrics and the table reference
    # (offline runs keep the summary in the .wandb file, not in a wandb-summary.json).
    assert summary["val/gold_reward"] == pytest.approx(callback.history[-1]["val/gold_reward"])
    assert summary["samples"]["_type"] == "table-file"
    assert not glob.glob(os.path.join(str(tmp_path), "**", "samples.csv"), recursive=True)


def test_bad_arguments_fail_early():
    with pytest.raises(TypeError, match="unknown evaluate_policy argument"):
        EvalCallback(["Q: 1+1=\nA:"], temprature=0.5)
    with pytest.raises(TypeError, match="unknown evaluate_policy argument"):
        EvalCallback(["Q: 1+1=\nA:"], policy=None)
    with pytest.raises(ValueError, match="at least one prompt"):
        EvalCallback([])
    with pytest.raises(ValueError, match="references"):
        EvalCallback(["a", "b"], references=["x"])
    with pytest.raises(ValueError, match="every_n_steps"):
        EvalCallback(["a"], every_n_steps=-1)
    EvalCallback(["a"], greedy=False, temperature=0.7, batch_size=2)  # evaluate_policy's own knobs pass


def test_module_without_a_policy_is_refused(tmp_path):
    class Plain(L.LightningModule):
        pass

    class FakeTrainer:
        global_step = 0
        is_global_zero = True
        loggers = []

    with pytest.raises(TypeError, match="needs a module with a `policy`"):
        EvalCallback(["a"]).evaluate(FakeTrainer(), Plain())
