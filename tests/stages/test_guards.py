"""NonFiniteGuard: a NaN loss never moves a weight (skip, counted in train/skipped_steps) or stops the run.

Each test injects NaN into one step's loss: an SFT step (automatic optimisation) or an online RL
update (manual optimisation, where the stage calls `optimizer.step()` itself). The guard must see
both, leave the weights and AdamW's state exactly as they were before the step, and log the count.
"""

import copy
import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import rlhf_lab.stages.online as online
from rlhf_lab.errors import NonFiniteError, UserError
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import SFT, NonFiniteGuard, OnlineRL, OnlineRLConfig, SFTConfig


class Snapshot(L.Callback):
    """Copies the weights and the optimiser state at the start of batch `at` (before its step)."""

    def __init__(self, at: int):
        self.at, self.weights, self.state = at, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.state = copy.deepcopy(trainer.optimizers[0].state_dict())


def _fit(stage, tmp_path, max_steps, callbacks):
    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, logger=CSVLogger(str(tmp_path), name="run", version=""),
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(stage)
    with open(tmp_path / "run" / "metrics.csv") as f:
        return trainer, list(csv.DictReader(f))


def _assert_unchanged(stage, trainer, snap: Snapshot):
    after = stage.state_dict()
    assert snap.weights.keys() == after.keys()
    for key, before in snap.weights.items():
        assert torch.equal(before, after[key]), key
    state = trainer.optimizers[0].state_dict()["state"]
    assert state.keys() == snap.state["state"].keys() and state  # AdamW has state from the first step
    for index, entries in snap.state["state"].items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[index][name])), (index, name)


def _nan_on(stage, batch_index: int):
    """Make the stage's training_step return a NaN loss on batch `batch_index` (automatic optimisation)."""
    original = stage.training_step

    def step(batch, batch_idx):
        loss = original(batch, batch_idx)
        return loss * float("nan") if batch_idx == batch_index else loss

    stage.training_step = step


def _sft(make_policy, task):
    return SFT(make_policy(), task.sft_pairs()[0][:32], None, SFTConfig(lr=1e-2, batch_size=8))


def test_skip_mode_leaves_weights_and_adamw_state_unchanged_automatic(make_policy, task, tmp_path):
    stage = _sft(make_policy, task)
    _nan_on(stage, 1)
    snap = Snapshot(at=1)
    trainer, rows = _fit(stage, tmp_path, 2, [NonFiniteGuard("skip"), snap])
    assert trainer.global_step == 2  # the skipped step still counts as a step
    _assert_unchanged(stage, trainer, snap)
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    assert skipped == [0.0, 1.0]
    assert trainer.logged_metrics["train/skipped_steps"] == 1


def test_without_the_guard_a_nan_loss_corrupts_the_weights(make_policy, task, tmp_path):
    # The control of the test above: the same injection moves the weights to NaN.
    stage = _sft(make_policy, task)
    _nan_on(stage, 1)
    _fit(stage, tmp_path, 2, [])
    assert not all(torch.isfinite(p).all() for p in stage.policy.trainable_parameters())


def test_skip_mode_in_manual_optimisation_online_rl(make_policy, task, tmp_path, monkeypatch):
    # One optimiser step per iteration (1 epoch x 1 minibatch); the second iteration's loss is NaN.
    calls = {"n": 0}
    objective = online.online_objective

    def nan_second(*args, **kwargs):
        loss, terms = objective(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), terms) if calls["n"] == 2 else (loss, terms)

    monkeypatch.setattr(online, "online_objective", nan_second)
    config = OnlineRLConfig(baseline="batch_mean", prompts_per_step=4, ppo_epochs=1, minibatches=1, max_new_tokens=3,
                            lr=1e-2)
    stage = OnlineRL(make_policy(reference="copy"), task.rl_prompts()[:8],
                     CallableSource(lambda p, c: [float(len(x)) for x in c]), config)
    snap = Snapshot(at=1)
    guard = NonFiniteGuard("skip")
    trainer, rows = _fit(stage, tmp_path, 2, [guard, snap])
    assert calls["n"] == 2 and guard.skipped_steps == 1
    _assert_unchanged(stage, trainer, snap)
    assert [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")] == [0.0, 1.0]


def test_stop_mode_raises_naming_the_step_and_parameter(make_policy, task, tmp_path):
    stage = _sft(make_policy, task)
    _nan_on(stage, 1)
    with pytest.raises(NonFiniteError) as info:
        _fit(stage, tmp_path, 3, [NonFiniteGuard("stop")])
    message = str(info.value)
    assert message.startswith("non-finite gradient at step 1, first in parameter 'policy.model.")
    assert "(nan;" in message and "trainer.on_nonfinite: skip" in message
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert all(torch.isfinite(p).all() for p in stage.policy.parameters())  # the NaN step never ran


def test_mode_is_checked():
    with pytest.raises(ValueError, match="on_nonfinite must be one of 'skip', 'stop'; got 'ignore'"):
        NonFiniteGuard("ignore")


def test_skipped_count_survives_a_checkpoint():
    guard = NonFiniteGuard()
    guard.skipped_steps = 3
    again = NonFiniteGuard()
    again.load_state_dict(guard.state_dict())
    assert again.skipped_steps == 3
