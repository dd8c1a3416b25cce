"""EvalCallback: periodic evaluate_policy during fit, val/ metrics in the loggers, sample tables."""

import csv
import glob
import json
import math
import os
import time
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lab.eval import EvalCallback, evaluate_policy, gold_accuracy
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import SFT, OnlineRL, OnlineRLConfig, SFTConfig


def _chars(prompts, completions):
    return [len(c) / 10 for c in completions]


SMALL = dict(lr=3e-3, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=4, minibatches=1, ppo_epochs=1,
             kl_coef=0.1)
EVAL_PROMPTS = 6
MAX_ROWS = 3


def _trainer(logger, max_steps, *callbacks):
    return L.Trainer(max_steps=max_steps, max_epochs=-1, logger=logger, callbacks=list(callbacks),
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

    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every=2, reward_fn=_chars, gold_fn=gold,
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
    # PPO with 2 optimiser steps per iteration: global_step goes 2, 4, 6. every=3 is reached
    # during the batches ending at 4 (3) and 6 (6); the evaluation is logged at the step seen.
    stage, config = _online(make_policy, task, "ppo", ppo_epochs=2)
    assert config.steps_per_iteration == 2
    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every=3, gold_fn=task.gold_reward,
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
    callback = EvalCallback([r["prompt"] for r in val[:EVAL_PROMPTS]], every=1, gold_fn=task.gold_reward,
                            references=[r["completion"] for r in val[:EVAL_PROMPTS]], max_new_tokens=4,
                            max_rows=MAX_ROWS, table_name="sft_samples")
    L.seed_everything(0, verbose=False)
    _trainer(CSVLogger(str(tmp_path), name="sft", version=""), 2, callback).fit(stage)

    assert [h["step"] for h in callback.history] == [1, 2]
    rows = [r for r in _rows(tmp_path / "sft" / "metrics.csv") if r.get("val/reference_perplexity")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    keys = ("val/rouge1", "val/rougeL", "val/reference_perplexity", "val/references_truncated",
            "val/gold_reward", "val/distinct_2")
    for row, h in zip(rows, callback.history, strict=True):
        for key in keys:
            assert float(row[key]) == pytest.approx(h[key])
        assert h["val/references_truncated"] == 0.0
        assert "val/kl" not in row or row["val/kl"] == ""  # no reference policy
        assert "val/perplexity" not in row or row["val/perplexity"] == ""  # SFT without val rows logs none
    # The last evaluation is the trained policy's: the same numbers as evaluate_policy on it now.
    direct = evaluate_policy(policy, [r["prompt"] for r in val[:EVAL_PROMPTS]], gold_fn=task.gold_reward,
                             references=[r["completion"] for r in val[:EVAL_PROMPTS]], max_new_tokens=4).metrics
    for key in keys:
        assert callback.history[-1][key] == pytest.approx(direct[key], rel=1e-6)
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
    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every=2, reward_fn=_chars,
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
    with pytest.raises(ValueError, match="every"):
        EvalCallback(["a"], every=-1)
    with pytest.raises(ValueError, match="axis"):
        EvalCallback(["a"], axis="tokens")
    with pytest.raises(ValueError, match="stop_at"):
        EvalCallback(["a"], stop_at=0)
    with pytest.raises(ValueError, match="extra_seconds"):
        EvalCallback(["a"], extra_seconds=-1.0)
    with pytest.raises(ValueError, match="gold_fn"):
        EvalCallback(["a"], greedy_gold=True, greedy=False)
    with pytest.raises(ValueError, match="greedy=False"):
        EvalCallback(["a"], greedy_gold=True, gold_fn=_chars)  # a greedy evaluation already is greedy gold
    with pytest.raises(TypeError, match="eval_seed"):
        EvalCallback(["a"], generator=torch.Generator())
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


class _Record(L.Callback):
    """The stage's (global_step, samples, generated_tokens) after every batch; listed before EvalCallback."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        b = pl_module.budget
        self.values.append((trainer.global_step, b.samples, b.generated_tokens))


def test_samples_axis_schedule_stop_at_and_history_rows(make_policy, task, tmp_path):
    # REINFORCE: 4 prompts x 2 samples = 8 samples per batch -> 8, 16, 24, 32, 40 after batches 1..5.
    # every=12: 16 passes 12, 24 reaches 24, 32 passes nothing, 40 passes 36; stop_at=40 ends the run
    # after batch 5 although max_steps allows 100; at_end then lands on the point just evaluated.
    stage, config = _online(make_policy, task, "reinforce")
    record = _Record()
    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every=12, axis="samples", stop_at=40,
                            gold_fn=task.gold_reward, max_new_tokens=4, max_rows=0, at_start=True)
    L.seed_everything(0, verbose=False)
    trainer = _trainer(CSVLogger(str(tmp_path), name="run", version=""), 100, record, callback)
    trainer.fit(stage)
    assert trainer.global_step == 5
    assert [h["samples"] for h in callback.history] == [0, 16, 24, 40]
    assert [h["step"] for h in callback.history] == [0, 2, 3, 5]
    tokens = {step: float(g) for step, _, g in record.values}
    for h in callback.history:
        assert set(h) == {"step", "samples", "generated_tokens", "optimizer_steps", "seconds",
                          "val/gold_reward", "val/kl", "val/distinct_1", "val/distinct_2", "val/response_length"}
        assert h["optimizer_steps"] == h["step"]  # one optimiser step per REINFORCE batch
        assert h["generated_tokens"] == tokens.get(h["step"], 0.0)
    assert [h["seconds"] for h in callback.history] == sorted(h["seconds"] for h in callback.history)
    assert not os.path.exists(tmp_path / "run" / "samples.csv")  # max_rows=0: no table


def test_generated_tokens_axis_evaluates_after_each_batch_that_passes_a_multiple(make_policy, task, tmp_path):
    stage, _ = _online(make_policy, task, "reinforce")
    record = _Record()
    every = 40
    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every=every, axis="generated_tokens",
                            gold_fn=task.gold_reward, max_new_tokens=4, max_rows=0, at_end=False)
    L.seed_everything(0, verbose=False)
    _trainer(None, 8, record, callback).fit(stage)
    expected, prev = [], 0
    for step, _, tokens in record.values:
        if math.floor(tokens / every) > math.floor(prev / every):
            expected.append(step)
        prev = tokens
    assert 0 < len(expected) < len(record.values)  # some batches pass a multiple, some do not
    assert [h["step"] for h in callback.history] == expected
    with pytest.raises(TypeError, match="budget"):
        EvalCallback(["a"], axis="samples").axis_value(None, L.LightningModule())


def test_budget_of_prefix_and_seconds_exclude_evaluation_time(make_policy, task, tmp_path):
    stage, _ = _online(make_policy, task, "reinforce")
    pause = 0.3

    def slow_gold(prompts, completions):
        time.sleep(pause)
        return task.gold_reward(prompts, completions)

    callback = EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every=1, gold_fn=slow_gold, max_new_tokens=4,
                            max_rows=0, at_start=True, budget_of=lambda m: {"pairs": 10 * m.budget.samples},
                            budget_prefix="compare", extra_seconds=100.0)
    L.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    _trainer(CSVLogger(str(tmp_path), name="run", version=""), 3, callback).fit(stage)
    wall = time.perf_counter() - t0
    h = callback.history
    assert [r["step"] for r in h] == [0, 1, 2, 3]
    assert [r["pairs"] for r in h] == [0, 80, 160, 240]
    assert "samples" not in h[0]  # budget_of replaces the default budget
    assert 100.0 <= h[0]["seconds"] < h[1]["seconds"] < h[2]["seconds"] < h[3]["seconds"]
    # Three evaluations (>= 0.3 s each) ran before the last row: its time leaves them out.
    assert h[3]["seconds"] < 100.0 + wall - 3 * pause
    assert callback.eval_seconds >= 4 * pause
    rows = [r for r in _rows(tmp_path / "run" / "metrics.csv") if r.get("compare/pairs")]
    assert [float(r["compare/pairs"]) for r in rows] == [0, 80, 160, 240]
    assert [float(r["compare/seconds"]) for r in rows] == pytest.approx([r["seconds"] for r in h])


class _Holder(L.LightningModule):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy


class _FakeTrainer:
    def __init__(self):
        self.global_step = 0
        self.is_global_zero = True
        self.loggers = []


def test_sampled_evaluation_draws_from_its_own_seeded_generator(make_policy, task):
    prompts = task.eval_prompts()[:EVAL_PROMPTS]
    policy = make_policy(seed=0, reference="copy")
    module, trainer = _Holder(policy), _FakeTrainer()
    kw = dict(gold_fn=task.gold_reward, max_new_tokens=4, max_rows=None, greedy=False, samples_per_prompt=2)
    callback = EvalCallback(prompts, eval_seed=7, greedy_gold=True, **kw)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = callback.evaluate(trainer, module)
    assert torch.equal(torch.get_rng_state(), state)  # the training run's stream is untouched
    assert callback.evaluate(trainer, module) is None  # same (step, budget) point: not repeated
    trainer.global_step = 1
    torch.manual_seed(999)  # a different global stream changes nothing
    second = callback.evaluate(trainer, module)
    metrics = {k: v for k, v in first.items() if k.startswith("val/")}
    assert {k: v for k, v in second.items() if k.startswith("val/")} == metrics
    # The completions are those of a generator seeded with eval_seed.
    own = policy.generate(prompts, max_new_tokens=4, samples_per_prompt=2, generator=torch.Generator().manual_seed(7))
    assert [r["completion"] for r in callback.last_result.samples] == own.completions
    assert metrics["val/gold_reward"] == pytest.approx(sum(task.gold_reward(own.prompts, own.completions)) / len(own))
    # greedy_gold: the gold judge's mean on the greedy completions, beside the sampled one.
    assert metrics["val/greedy_gold_reward"] == pytest.approx(gold_accuracy(policy, prompts, task.gold_reward, 4))
    other = EvalCallback(prompts, eval_seed=8, **kw)
    other.evaluate(trainer, module)
    assert [r["completion"] for r in other.last_result.samples] != own.completions
    assert "val/greedy_gold_reward" not in other.history[0]


def test_evaluation_leaves_the_training_run_unchanged(make_policy, task):
    def final_weights(with_callback):
        stage, _ = _online(make_policy, task, "reinforce")
        callbacks = [EvalCallback(task.eval_prompts()[:EVAL_PROMPTS], every=1, gold_fn=task.gold_reward,
                                  max_new_tokens=4, max_rows=0, greedy=False, at_start=True)] if with_callback else []
        L.seed_everything(0, verbose=False)
        _trainer(None, 3, *callbacks).fit(stage)
        return [p.detach().clone() for p in stage.policy.model.parameters()]

    for a, b in zip(final_weights(False), final_weights(True), strict=True):
        assert torch.equal(a, b)


def test_truncated_references_are_counted_and_warned_once(make_policy, task, tmp_path):
    train, val = task.sft_pairs()
    stage = SFT(make_policy(seed=0), train[:16], config=SFTConfig(lr=1e-3, batch_size=8))
    # Every eval prompt has 10 tokens, so each prompt + answer + EOS row exceeds 10 and is cut.
    callback = EvalCallback([r["prompt"] for r in val[:EVAL_PROMPTS]], every=1, max_new_tokens=2, max_rows=0,
                            references=[r["completion"] for r in val[:EVAL_PROMPTS]], max_length=10)
    L.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _trainer(CSVLogger(str(tmp_path), name="sft", version=""), 2, callback).fit(stage)
    assert [h["step"] for h in callback.history] == [1, 2]
    assert [h["val/references_truncated"] for h in callback.history] == [EVAL_PROMPTS, EVAL_PROMPTS]
    cut = [w for w in caught if "reference rows exceed" in str(w.message)]
    assert len(cut) == 1, [str(w.message) for w in cut]
    rows = [r for r in _rows(tmp_path / "sft" / "metrics.csv") if r.get("val/references_truncated")]
    assert [float(r["val/references_truncated"]) for r in rows] == [EVAL_PROMPTS, EVAL_PROMPTS]
