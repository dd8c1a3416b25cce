"""Smoke tests: each stage runs a few CPU steps, writes its HF folder and logs DESIGN.md's names."""

import csv
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lab.eval import EvalCallback
from rlhf_lab.policy import Policy
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import (
    PPO,
    SFT,
    PPOConfig,
    Pretrain,
    PretrainConfig,
    RewardModel,
    RewardModelConfig,
    SFTConfig,
)
from rlhf_lab.stages.common import SavePolicy


def _fit(stage, tmp_path, name, max_steps, callbacks=(), **kw):
    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, logger=CSVLogger(str(tmp_path), name=name, version=""),
                        callbacks=[SavePolicy(str(tmp_path / name / "checkpoint")), *callbacks],
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        accelerator="cpu", num_sanity_val_steps=0, **kw)
    trainer.fit(stage)
    with open(tmp_path / name / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return trainer, rows


def _column(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


def _assert_checkpoint(folder, head=False):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "rlhf_lab_policy.json"):
        assert os.path.exists(os.path.join(folder, name)), name
    assert os.path.exists(os.path.join(folder, "scalar_head.safetensors")) == head
    Policy.load(str(folder))  # loads back


BUDGET = {"budget/samples", "budget/optimizer_steps", "budget/seconds"}


def test_pretrain_smoke(make_policy, task, tmp_path):
    corpus = task.pretrain_corpus(n_lines=300)
    stage = Pretrain(make_policy(), corpus[20:], corpus[:20], PretrainConfig(lr=3e-3, batch_size=8, block_size=32))
    _, rows = _fit(stage, tmp_path, "pretrain", 30, val_check_interval=30, check_val_every_n_epoch=None)
    assert {"train/loss", "train/perplexity", "val/loss", "val/perplexity"} | BUDGET <= set(rows[0]) | set(rows[-1])
    losses = _column(rows, "train/loss")
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    val_loss, val_ppl = _column(rows, "val/loss")[-1], _column(rows, "val/perplexity")[-1]
    assert val_ppl == pytest.approx(math.exp(val_loss), rel=1e-4)
    _assert_checkpoint(tmp_path / "pretrain" / "checkpoint")


def test_sft_trains_on_completion_tokens_only(make_policy, task, tmp_path):
    train, val = task.sft_pairs()
    policy = make_policy()
    stage = SFT(policy, train, val[:8], SFTConfig(lr=3e-3, batch_size=16))
    batch = next(iter(stage.train_dataloader()))
    # The loss mask covers the answer and its EOS, never the prompt or the padding.
    for ids, lm in zip(batch["input_ids"], batch["loss_mask"], strict=True):
        text = policy.tokenizer.decode(ids[lm.bool()])
        assert text.endswith(policy.tokenizer.eos_token) and "Q:" not in text
    _, rows = _fit(stage, tmp_path, "sft", 20, val_check_interval=20, check_val_every_n_epoch=None)
    losses = _column(rows, "train/loss")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert {"train/loss", "val/loss", "val/perplexity"} <= {k for r in rows for k, v in r.items() if v}
    _assert_checkpoint(tmp_path / "sft" / "checkpoint")


def test_lm_val_perplexity_is_token_weighted_over_whole_rows(make_policy, task):
    _, val = task.sft_pairs()
    policy = make_policy()
    with torch.no_grad():  # sharper logits: per-token NLLs differ, so the way of averaging shows
        policy.model.transformer.ln_f.weight.mul_(20.0)
    answers = ["1", "2 3 4 5 6 7 8 9 10 11 12 13 14", "3", "4 5", "6"]
    rows = [{"prompt": r["prompt"], "completion": a} for r, a in zip(val[:5], answers, strict=True)]
    # max_length=16 cuts training rows, but the 10-token prompt + 25-token answer row is scored whole.
    stage = SFT(policy, rows, rows, SFTConfig(batch_size=3, max_length=16))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    out = trainer.validate(stage, verbose=False)[0]
    tok = policy.tokenizer
    nll, count, batch_means = 0.0, 0, []
    for start in (0, 3):  # the validation batches: rows 0-2 and 3-4
        b_nll, b_count = 0.0, 0
        for row in rows[start:start + 3]:
            prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            target = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + target])
            with torch.no_grad():
                logp = policy.logprobs(ids, torch.ones_like(ids))[0]
            b_nll -= float(logp[len(prompt):].sum())  # every answer token and the EOS
            b_count += len(target)
        nll, count = nll + b_nll, count + b_count
        batch_means.append(b_nll / b_count)
    assert count > 25  # the long answer counts in full
    assert out["val/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert out["val/perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # What a mean of per-batch means would have reported instead (batches of 3 and 2 rows):
    assert out["val/loss"] != pytest.approx((3 * batch_means[0] + 2 * batch_means[1]) / 5, rel=1e-3)


def test_reward_model_smoke(make_policy, task, tmp_path):
    train, _ = task.sft_pairs()
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " 42"} for r in train]
    stage = RewardModel(make_policy(scalar_head=True), rows[:-16], rows[-16:], RewardModelConfig(lr=3e-3, batch_size=16))
    _, logged = _fit(stage, tmp_path, "rm", 30, val_check_interval=30, check_val_every_n_epoch=None)
    keys = {k for r in logged for k, v in r.items() if v}
    assert {"train/loss", "train/accuracy", "train/reward_margin", "val/loss", "val/accuracy"} <= keys
    # "always reject 42" is trivially learnable: held-out accuracy reaches 1.
    assert _column(logged, "val/accuracy")[-1] == 1.0
    _assert_checkpoint(tmp_path / "rm" / "checkpoint", head=True)


def test_reward_model_needs_a_head(make_policy, task):
    with pytest.raises(ValueError, match="scalar head"):
        RewardModel(make_policy(), [{"prompt": "a", "chosen": "b", "rejected": "c"}])


PPO_METRICS = {
    "train/loss", "train/reward", "train/gold_reward", "train/kl", "train/entropy",
    "train/response_length", "train/policy_loss", "train/value_loss", "train/clipfrac",
    "train/approx_kl", "train/advantage_std", "budget/generated_tokens", "budget/samples",
    "budget/reward_calls", "budget/optimizer_steps", "budget/seconds",
}


def _chars(prompts, completions):
    # A dense toy reward: characters in the completion / 10 (the benchmark's reward, rescaled).
    return [len(c) / 10 for c in completions]


def _ppo(policy, task, **overrides):
    config = PPOConfig(**{**dict(lr=3e-3, prompts_per_step=16, samples_per_prompt=2, max_new_tokens=4,
                                 minibatches=2, ppo_epochs=2, kl_coef=0.01), **overrides})
    return PPO(policy, task.rl_prompts(), CallableSource(_chars), config, gold_fn=CallableSource(_chars))


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_ppo_smoke_raises_a_simple_reward(make_policy, task, tmp_path, critic):
    if critic == "head":
        policy = make_policy(scalar_head=True, reference="copy")
    else:
        policy = make_policy(reference="copy", critic=make_policy(seed=1, scalar_head=True))
    stage = _ppo(policy, task)
    iterations = 12
    # The val/ metrics come from the one evaluation path, EvalCallback, every 24 optimiser steps.
    evaluator = EvalCallback(task.eval_prompts()[:8], every=24, reward_fn=CallableSource(_chars),
                             gold_fn=CallableSource(_chars), max_new_tokens=4, at_start=True)
    _, rows = _fit(stage, tmp_path, "ppo", iterations * 2 * 2, callbacks=[evaluator])
    keys = {k for r in rows for k, v in r.items() if v}
    assert PPO_METRICS | {"val/reward", "val/gold_reward", "val/kl"} <= keys
    assert [h["step"] for h in evaluator.history] == [0, 24, 48]
    assert evaluator.history[0]["val/kl"] == 0.0  # the start: the policy is its reference
    assert len(stage.history) == iterations
    assert _column(rows, "budget/samples")[-1] == iterations * 32
    assert _column(rows, "budget/optimizer_steps")[-1] == iterations * 4
    rewards = _column(rows, "train/reward")
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1
    kl = _column(rows, "train/kl")
    assert abs(kl[0]) < 1e-4  # the first rollout comes from the reference itself
    assert kl[-1] > 0.01  # and the policy has moved away from it since
    folder = tmp_path / "ppo" / "checkpoint"
    _assert_checkpoint(folder, head=critic == "head")
    assert os.path.isdir(folder / "critic") == (critic == "separate")


def test_ppo_separate_critic_keeps_value_gradients_off_the_policy(make_policy, task):
    policy = make_policy(reference="copy", critic=make_policy(seed=1, scalar_head=True))
    stage = _ppo(policy, task)
    rollout = stage.make_rollout(task.rl_prompts()[:4])
    _, _, values = policy.logprobs_and_values(rollout.input_ids, rollout.attention_mask)
    values.sum().backward()
    assert all(p.grad is None for p in policy.model.parameters())
    assert any(p.grad is not None for p in policy.critic.parameters())


def test_ppo_requires_critic_and_reference(make_policy, task):
    reward = CallableSource(lambda p, c: [0.0] * len(c))
    with pytest.raises(ValueError, match="needs a critic"):
        PPO(make_policy(reference="copy"), task.rl_prompts(), reward)
    with pytest.raises(ValueError, match="reference"):
        PPO(make_policy(scalar_head=True), task.rl_prompts(), reward)


def test_critic_lr_sets_the_critic_group_and_changes_its_update(make_policy, task, tmp_path):
    after = []
    for critic_lr in (None, 1e-2):
        policy = make_policy(reference="copy", critic=make_policy(seed=1, scalar_head=True))
        stage = _ppo(policy, task, lr=1e-3, critic_lr=critic_lr, ppo_epochs=1)
        groups = stage.configure_optimizers().param_groups
        assert [g["lr"] for g in groups] == [1e-3, critic_lr or 1e-3]
        assert sum(len(g["params"]) for g in groups) == len(policy.trainable_parameters())
        L.seed_everything(0)
        _fit(stage, tmp_path, f"critic_lr_{critic_lr}", 2)
        after.append(policy.critic.scalar_head.weight.detach().clone())
    assert not torch.allclose(after[0], after[1])


def test_rows_longer_than_the_model_positions_fail_at_construction(tokenizer, task):
    from rlhf_lab.models.backbones import build_tiny_model
    from rlhf_lab.policy import Policy
    from rlhf_lab.stages import (
        DPO,
        SFT,
        DPOConfig,
        Pretrain,
        PretrainConfig,
        RewardModel,
        RewardModelConfig,
        SFTConfig,
    )

    model = build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    policy = Policy(model, tokenizer, reference="copy", scalar_head=True)
    rows, _ = task.sft_pairs()
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " 0"} for r in rows]
    for build, field in (
        (lambda: Pretrain(policy, task.pretrain_corpus(n_lines=50), None, PretrainConfig(block_size=65)), "block_size"),
        (lambda: SFT(policy, rows, None, SFTConfig(max_length=65)), "max_length"),
        (lambda: RewardModel(policy, pairs, None, RewardModelConfig(max_length=65)), "max_length"),
        (lambda: DPO(policy, pairs, None, DPOConfig(max_length=65)), "max_length"),
    ):
        with pytest.raises(ValueError, match=f"config.{field} = 65 is longer than the model's 64 positions"):
            build()
    SFT(policy, rows, None, SFTConfig(max_length=64))  # exactly the table fits
