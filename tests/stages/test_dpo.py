"""DPO (offline, every variant, three kinds of reference) and online DPO."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lab.losses import DPO_LOSSES
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import DPO, DPOConfig, OnlineDPO
from rlhf_lab.stages.dpo import sequence_logprobs

DPO_METRICS = {"train/loss", "train/rewards_chosen", "train/rewards_rejected", "train/reward_margin",
               "train/reward_accuracy"}


def _pairs(task, n=48):
    rows = []
    for r in task.sft_pairs()[0][:n]:
        rows.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": " 42"})
    return rows


def _fit(stage, tmp_path, name, steps, **kw):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=CSVLogger(str(tmp_path), name=name, version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, accelerator="cpu", num_sanity_val_steps=0, **kw)
    trainer.fit(stage)
    with open(tmp_path / name / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _col(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.parametrize("variant", sorted(DPO_LOSSES))
def test_every_variant_learns_the_preference_and_logs_the_names(make_policy, task, tmp_path, variant):
    rows = _pairs(task)
    stage = DPO(make_policy(reference="copy"), rows[:40], rows[40:],
                DPOConfig(variant=variant, lr=3e-3, batch_size=8, label_smoothing=0.1 if "robust" in variant else 0.0))
    logged = _fit(stage, tmp_path, variant, 20, val_check_interval=20, check_val_every_n_epoch=None)
    keys = {k for r in logged for k, v in r.items() if v}
    assert DPO_METRICS <= keys and {"val/loss", "val/reward_accuracy"} <= keys
    margins = _col(logged, "train/reward_margin")
    assert margins[-1] > margins[0]  # chosen pulls away from rejected
    assert _col(logged, "val/reward_accuracy")[-1] == 1.0


def test_precomputed_reference_equals_the_frozen_copy(make_policy, task, tmp_path):
    rows = _pairs(task, 16)
    copy_stage = DPO(make_policy(seed=3, reference="copy"), rows, None, DPOConfig(batch_size=8))
    pre_stage = DPO(make_policy(seed=3), rows, None, DPOConfig(batch_size=8, reference="precomputed"))
    assert pre_stage.policy.reference is None  # no second model in memory
    pre_stage.data_seed = copy_stage.data_seed  # the same batches in the same order
    batch = next(iter(pre_stage.train_dataloader()))
    from_copy = copy_stage._reference(batch, "train")
    from_table = pre_stage._reference(batch, "train")
    for a, b in zip(from_copy, from_table, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # And the loss trains the same way from either reference.
    a = _fit(copy_stage, tmp_path, "copy", 4)
    b = _fit(pre_stage, tmp_path, "pre", 4)
    assert _col(a, "train/loss") == pytest.approx(_col(b, "train/loss"), abs=1e-4)


def test_sequence_logprobs_sum_only_completion_tokens(make_policy, task):
    policy = make_policy()
    stage = DPO(policy, _pairs(task, 4), None, DPOConfig(variant="simpo", batch_size=4))
    batch = next(iter(stage.train_dataloader()))
    logps, lengths = sequence_logprobs(policy, batch)
    full = policy.logprobs(batch["input_ids"], batch["attention_mask"])
    expected = (full * batch["loss_mask"]).sum(1)  # column 0 is never a completion token
    torch.testing.assert_close(logps, expected)
    assert lengths.tolist() == batch["loss_mask"].sum(1).float().tolist()


def test_dpo_config_errors_name_the_field(make_policy, task):
    with pytest.raises(ValueError, match="variant must be one of"):
        DPOConfig(variant="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="needs Policy\\(reference='copy'\\)"):
        DPO(make_policy(), _pairs(task, 4), None, DPOConfig())
    DPO(make_policy(), _pairs(task, 4), None, DPOConfig(variant="simpo"))  # reference-free


def test_beta_changes_the_update(make_policy, task, tmp_path):
    weights = []
    for beta in (0.1, 1.0):
        policy = make_policy(seed=0, reference="copy")
        _fit(DPO(policy, _pairs(task, 16), None, DPOConfig(beta=beta, lr=1e-2, batch_size=8)), tmp_path, f"b{beta}", 3)
        weights.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    assert not torch.allclose(weights[0], weights[1])


def test_nll_coef_changes_the_update_and_logs_the_chosen_nll(make_policy, task, tmp_path):
    weights, logged = [], []
    for nll_coef in (0.0, 1.0):
        policy = make_policy(seed=0, reference="copy")
        logged.append(_fit(DPO(policy, _pairs(task, 16), None,
                               DPOConfig(nll_coef=nll_coef, lr=1e-2, batch_size=8)), tmp_path, f"n{nll_coef}", 3))
        weights.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    assert not torch.allclose(weights[0], weights[1])
    assert all("train/nll" not in row for row in logged[0])  # only logged when the term is on
    nll = _col(logged[1], "train/nll")
    assert len(nll) == 3 and all(v > 0 for v in nll)  # a per-token NLL of the chosen answers
    with pytest.raises(ValueError, match="nll_coef must be"):
        DPOConfig(nll_coef=-0.5)


def test_online_dpo_raises_a_simple_reward(make_policy, task, tmp_path):
    def chars(prompts, completions):
        return [len(c) / 10 for c in completions]

    policy = make_policy(reference="copy")
    stage = OnlineDPO(policy, task.rl_prompts(), CallableSource(chars),
                      DPOConfig(lr=3e-3, batch_size=16, max_new_tokens=4, beta=0.5), gold_fn=CallableSource(chars))
    rows = _fit(stage, tmp_path, "online", 15)
    keys = {k for r in rows for k, v in r.items() if v}
    assert DPO_METRICS | {"train/reward", "train/gold_reward", "train/kl", "train/response_length",
                          "budget/generated_tokens", "budget/reward_calls"} <= keys
    rewards = _col(rows, "train/reward")
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4
    with pytest.raises(ValueError, match="precomputed"):
        OnlineDPO(policy, ["x"], CallableSource(chars), DPOConfig(reference="precomputed"))


@pytest.mark.parametrize("knob, value, variant", [
    *[("label_smoothing", 0.1, v) for v in sorted(DPO_LOSSES) if v not in ("robust", "robust_unbiased")],
    *[("gamma", 1.0, v) for v in sorted(DPO_LOSSES) if v != "simpo"],
    ("reference", "precomputed", "simpo"),
])
def test_a_variant_knob_is_refused_where_the_variant_ignores_it(knob, value, variant):
    with pytest.raises(ValueError, match=rf"^{knob} has no effect with variant='{variant}'.*leave it at its default"):
        DPOConfig(variant=variant, **{knob: value})
    DPOConfig(variant=variant)  # the knob at its default is fine


def test_variant_knobs_are_accepted_where_they_act():
    DPOConfig(variant="robust", label_smoothing=0.1)
    DPOConfig(variant="robust_unbiased", label_smoothing=0.1)
    DPOConfig(variant="simpo", gamma=1.0)
    DPOConfig(variant="sigmoid", reference="precomputed")
