"""One dashboard for every algorithm: PPO, REINFORCE and DPO log the shared names under the same keys.

Each run takes a few steps on the arithmetic task with the same `EvalCallback` (so the `val/`
metrics are measured the same way for all three) and a CSVLogger; the test reads the columns of
each run's metrics.csv. Every stage also logs the `budget/` axes and puts its key metrics on
Lightning's progress bar.
"""

import csv

import lightning as L
import pytest
import torch

from rlhf_lab.eval import EvalCallback
from rlhf_lab.rewards import CallableSource
from rlhf_lab.runs import make_trainer
from rlhf_lab.stages import (
    DPO,
    SFT,
    DPOConfig,
    OnlineDPO,
    OnlineRL,
    OnlineRLConfig,
    Pretrain,
    PretrainConfig,
    RewardModel,
    RewardModelConfig,
    SFTConfig,
)

BUDGET = {"budget/samples", "budget/generated_tokens", "budget/reward_calls", "budget/optimizer_steps",
          "budget/seconds"}
# Measured by the same callback for every algorithm, so the curves are comparable.
VAL = {"val/reward", "val/gold_reward", "val/kl", "val/win_rate", "val/distinct_1", "val/distinct_2",
       "val/response_length"}
SHARED = {"train/loss"} | BUDGET | VAL
# The online algorithms share the sampled-batch metrics of DESIGN.md as well.
ONLINE = {"train/reward", "train/gold_reward", "train/kl", "train/entropy", "train/response_length",
          "train/policy_loss", "train/clipfrac", "train/approx_kl", "train/advantage_std"}
DPO_NAMES = {"train/rewards_chosen", "train/rewards_rejected", "train/reward_margin", "train/reward_accuracy"}

PROGRESS_BAR = {
    "pretrain": {"train/loss", "val/loss"},
    "sft": {"train/loss", "val/loss"},
    "reward_model": {"train/loss", "train/accuracy", "val/accuracy"},
    # The online stages no longer evaluate themselves: val/ comes from EvalCallback, logged to the
    # loggers (test_ppo_reinforce_and_dpo_share_metric_names), not to the progress bar.
    "ppo": {"train/reward", "train/gold_reward", "train/kl"},
    "reinforce": {"train/reward", "train/gold_reward", "train/kl"},
    "dpo": {"train/loss", "train/reward_accuracy", "val/loss", "val/reward_accuracy"},
    "online_dpo": {"train/loss", "train/reward_accuracy", "train/reward", "train/gold_reward", "train/kl"},
}


def _chars(prompts, completions):
    return torch.tensor([len(c) / 10 for c in completions])


def _pairs(task, n=16):
    rows = task.sft_pairs()[0][:n]
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " 0"} for r in rows]


def _stage(name, make_policy, task):
    """The stage and its number of optimiser steps (a few iterations each)."""
    rl = dict(lr=1e-3, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=4, minibatches=1, ppo_epochs=1)
    if name in ("ppo", "reinforce"):
        config = OnlineRLConfig.preset(name, **rl)
        policy = make_policy(scalar_head=name == "ppo", reference="copy")
        return OnlineRL(policy, task.rl_prompts(), CallableSource(_chars), config,
                        gold_fn=CallableSource(task.gold_reward)), \
            3 * config.steps_per_iteration
    if name == "dpo":
        return DPO(make_policy(reference="copy"), _pairs(task), _pairs(task, 4), DPOConfig(batch_size=4, lr=1e-3)), 3
    if name == "online_dpo":
        return OnlineDPO(make_policy(reference="copy"), task.rl_prompts(), CallableSource(_chars),
                         DPOConfig(batch_size=4, max_new_tokens=4), gold_fn=CallableSource(task.gold_reward)), 3
    if name == "pretrain":
        return Pretrain(make_policy(), task.pretrain_corpus(n_lines=200), task.pretrain_corpus(n_lines=40, seed=1),
                        PretrainConfig(batch_size=4, block_size=16)), 3
    train, val = task.sft_pairs()
    if name == "sft":
        return SFT(make_policy(), train[:16], val[:8], SFTConfig(batch_size=4)), 3
    return RewardModel(make_policy(scalar_head=True), _pairs(task), _pairs(task, 4), RewardModelConfig(batch_size=4)), 3


def _fit(name, make_policy, task, tmp_path, callbacks=()):
    L.seed_everything(0, verbose=False)
    stage, steps = _stage(name, make_policy, task)
    trainer = make_trainer(str(tmp_path), name, steps, callbacks=list(callbacks), enable_progress_bar=False,
                           val_check_interval=steps, check_val_every_n_epoch=None)
    trainer.fit(stage)
    with open(tmp_path / name / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return trainer, {k for r in rows for k, v in r.items() if v != ""}, rows


@pytest.fixture(scope="module")
def reference_policy(tokenizer):
    from rlhf_lab.models.backbones import build_tiny_model
    from rlhf_lab.policy import Policy

    torch.manual_seed(1)
    return Policy(build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2), tokenizer)


@pytest.mark.parametrize("name", ["ppo", "reinforce", "dpo"])
def test_ppo_reinforce_and_dpo_share_metric_names(name, make_policy, task, tmp_path, reference_policy):
    callback = EvalCallback(task.eval_prompts()[:8], every=0, reward_fn=_chars, gold_fn=task.gold_reward,
                            reference=reference_policy, max_new_tokens=4, at_start=True)
    _, keys, rows = _fit(name, make_policy, task, tmp_path, [callback])
    assert SHARED <= keys, SHARED - keys
    assert (ONLINE <= keys) == (name != "dpo"), ONLINE - keys
    assert (DPO_NAMES <= keys) == (name == "dpo"), DPO_NAMES - keys
    # The callback's rows: at the start and at the end, the same keys for all three algorithms.
    val_rows = [r for r in rows if r.get("val/win_rate")]
    assert len(val_rows) == 2 and all(0.0 <= float(r["val/win_rate"]) <= 1.0 for r in val_rows)
    steps = [float(r["budget/optimizer_steps"]) for r in rows if r.get("budget/optimizer_steps")]
    assert steps == sorted(steps) and steps[-1] >= 3


@pytest.mark.parametrize("name", sorted(PROGRESS_BAR))
def test_every_stage_logs_budget_axes_and_shows_its_key_metrics(name, make_policy, task, tmp_path):
    trainer, keys, _ = _fit(name, make_policy, task, tmp_path)
    assert BUDGET <= keys, BUDGET - keys
    assert "train/loss" in keys
    bar = set(trainer.progress_bar_metrics)
    assert PROGRESS_BAR[name] <= bar, PROGRESS_BAR[name] - bar
    assert not {k for k in bar if k.startswith("budget/")}  # the axes stay off the bar
