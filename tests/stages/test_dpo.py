"""DPO (offline, every variant, three kinds of reference), KTO on unpaired rows, and online DPO."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lab.losses import DPO_LOSSES
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import DPO, DPOConfig, OnlineDPO
from rlhf_lab.stages.dpo import REFERENCE_FREE, sequence_logprobs

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
    with pytest.raises(ValueError, match="variant must be one of.*'orpo', 'kto'"):
        DPOConfig(variant="cpo")
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
    *[("reference", "precomputed", v) for v in REFERENCE_FREE],
    *[(knob, 2.0, v) for knob in ("desirable_weight", "undesirable_weight") for v in sorted(DPO_LOSSES)],
    ("nll_coef", 1.0, "kto"),
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
    DPOConfig(variant="orpo", nll_coef=1.0)
    DPOConfig(variant="kto", desirable_weight=1.33, undesirable_weight=0.5, reference="precomputed")
    for knob in ("desirable_weight", "undesirable_weight"):
        with pytest.raises(ValueError, match=f"{knob} must be > 0"):
            DPOConfig(variant="kto", **{knob: 0.0})



# ----------------------------------------------------------------------------------------- ORPO


def test_orpo_preset_raises_the_chosen_likelihood_and_the_odds_ratio(make_policy, task, tmp_path):
    # ORPO needs no reference model; its SFT term (nll_coef = 1) pulls the chosen answers up while
    # the odds-ratio term pushes the rejected ones down.
    rows = _pairs(task)
    stage = DPO(make_policy(), rows[:40], rows[40:], DPOConfig(variant="orpo", beta=0.1, nll_coef=1.0, lr=3e-3,
                                                                batch_size=8))
    logged = _fit(stage, tmp_path, "orpo", 20, val_check_interval=20, check_val_every_n_epoch=None)
    keys = {k for r in logged for k, v in r.items() if v}
    assert DPO_METRICS | {"train/nll", "train/log_odds_ratio", "val/log_odds_ratio"} <= keys
    loss, chosen, odds = (_col(logged, k) for k in ("train/loss", "train/rewards_chosen", "train/log_odds_ratio"))
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4  # the loss goes down
    assert chosen[-1] > chosen[0]  # beta * mean log-prob of the chosen answers rises
    assert odds[-1] > odds[0] and _col(logged, "val/reward_accuracy")[-1] == 1.0


# ------------------------------------------------------------------------------------------ KTO

KTO_METRICS = DPO_METRICS | {"train/kl_reference_point"}


def _unpaired(task, n=48):
    """Unpaired rows: the right answer (desirable) for the even questions, " 42" (undesirable) for
    the odd ones, so no prompt has both."""
    rows = task.sft_pairs()[0][:n]
    return [{"prompt": r["prompt"], "completion": r["completion"] if i % 2 == 0 else " 42", "label": i % 2 == 0}
            for i, r in enumerate(rows)]


def _weights(policy):
    return torch.cat([p.detach().flatten() for p in policy.model.parameters()])


def test_kto_learns_from_unpaired_rows(make_policy, task, tmp_path):
    rows = _unpaired(task)
    stage = DPO(make_policy(reference="copy"), rows[:40], rows[40:], DPOConfig(variant="kto", lr=3e-3, batch_size=8))
    assert len(stage.train_data) == 40  # one row each, nothing split
    logged = _fit(stage, tmp_path, "kto", 20, val_check_interval=20, check_val_every_n_epoch=None)
    keys = {k for r in logged for k, v in r.items() if v}
    assert KTO_METRICS | {"val/loss", "val/reward_accuracy", "val/kl_reference_point"} <= keys
    loss, margin = _col(logged, "train/loss"), _col(logged, "train/reward_margin")
    # At the start r = 0 and z0 = 0: every row's loss is 1 - sigmoid(0) = 0.5.
    assert loss[0] == pytest.approx(0.5, abs=1e-6)
    assert sum(loss[-4:]) / 4 < 0.45 and margin[-1] > margin[0]
    assert _col(logged, "val/reward_accuracy")[-1] == 1.0


def test_kto_splits_pairs_into_a_desirable_and_an_undesirable_row(make_policy, task, tmp_path):
    pairs = _pairs(task)
    stage = DPO(make_policy(reference="copy"), pairs[:40], pairs[40:], DPOConfig(variant="kto", lr=3e-3, batch_size=8))
    train = stage.train_data.data
    assert len(train) == 80 and len(stage.val_data) == 16  # 40 and 8 pairs, two rows each
    assert train.labels == [True, False] * 40
    tokens = stage.policy.tokenizer
    for i in (0, 1, 78, 79):
        item = train[i]["row"]
        completion = tokens.decode(item["input_ids"][item["loss_mask"].bool()][:-1])  # without EOS
        assert completion == pairs[i // 2]["chosen" if i % 2 == 0 else "rejected"]
    # Each row's mismatched sequence takes another prompt's completion (here every prompt has another).
    prompts = [pairs[i // 2]["prompt"] for i in range(80)]
    assert all(prompts[j] != prompts[i] for i, j in enumerate(train.partners))
    # And it trains the chosen answers up against the rejected ones: the chosen log-prob margin rises.
    logged = _fit(stage, tmp_path, "kto_pairs", 20, val_check_interval=20, check_val_every_n_epoch=None)
    margin = _col(logged, "train/reward_margin")
    assert margin[-1] > margin[0] > -0.05
    # Held out: the chosen answers' implicit reward is above the rejected ones', and most rows are on
    # their label's side of z0.
    assert _col(logged, "val/reward_margin")[-1] > 0.1 and _col(logged, "val/reward_accuracy")[-1] >= 0.75


def test_kto_micro_batches_give_the_whole_batch_update(make_policy, task, tmp_path):
    rows = _unpaired(task, 24)
    runs = []
    for micro in (None, 3):  # 8 rows in parts of 3, 3 and 2, under activation checkpointing
        policy = make_policy(seed=1, reference="copy")
        stage = DPO(policy, rows, None, DPOConfig(variant="kto", lr=1e-2, batch_size=8, micro_batch_size=micro))
        runs.append((_fit(stage, tmp_path, f"micro{micro}", 3), _weights(policy)))
    (whole, w_whole), (parts, w_parts) = runs
    torch.testing.assert_close(w_whole, w_parts, atol=1e-5, rtol=0)
    for key in KTO_METRICS:
        assert _col(whole, key) == pytest.approx(_col(parts, key), abs=1e-5), key


def test_kto_precomputed_reference_equals_the_frozen_copy(make_policy, task, tmp_path):
    rows = _unpaired(task, 16)
    copy_stage = DPO(make_policy(seed=3, reference="copy"), rows, None, DPOConfig(variant="kto", batch_size=8))
    pre_stage = DPO(make_policy(seed=3), rows, None, DPOConfig(variant="kto", batch_size=8, reference="precomputed"))
    assert pre_stage.policy.reference is None  # no second model in memory
    pre_stage.data_seed = copy_stage.data_seed
    batch = next(iter(pre_stage.train_dataloader()))
    for mismatched in (False, True):  # the rows and their mismatched sequences
        torch.testing.assert_close(copy_stage._kto_reference(batch, "train", mismatched),
                                   pre_stage._kto_reference(batch, "train", mismatched), atol=1e-5, rtol=0)
    a, b = _fit(copy_stage, tmp_path, "copy", 4), _fit(pre_stage, tmp_path, "pre", 4)
    assert _col(a, "train/loss") == pytest.approx(_col(b, "train/loss"), abs=1e-4)


@pytest.mark.parametrize("knob, value", [("beta", 1.0), ("desirable_weight", 3.0), ("undesirable_weight", 3.0)])
def test_kto_knobs_change_the_update(make_policy, task, tmp_path, knob, value):
    weights = []
    for setting in ({}, {knob: value}):
        policy = make_policy(seed=0, reference="copy")
        config = DPOConfig(variant="kto", lr=1e-2, batch_size=8, **setting)
        _fit(DPO(policy, _unpaired(task, 16), None, config), tmp_path, f"{knob}{setting}", 3)
        weights.append(_weights(policy))
    assert not torch.allclose(weights[0], weights[1])


def test_bad_unpaired_rows_and_mismatched_variants_fail_clearly(make_policy, task):
    rows = _unpaired(task, 4)
    with pytest.raises(ValueError, match="unpaired row 1: field 'label' must be a boolean.*got 'no'"):
        DPO(make_policy(reference="copy"), [rows[0], {**rows[1], "label": "no"}], None, DPOConfig(variant="kto"))
    with pytest.raises(ValueError, match="row 0 is neither a preference pair .* nor an unpaired row"):
        DPO(make_policy(reference="copy"), [{"prompt": "Q", "completion": " 1"}], None, DPOConfig(variant="kto"))
    with pytest.raises(ValueError, match="variant 'sigmoid' trains on prompt/chosen/rejected pairs, but train row 0 "
                                         ".*need variant='kto'"):
        DPO(make_policy(reference="copy"), rows, None, DPOConfig())
    with pytest.raises(ValueError, match="needs Policy\\(reference='copy'\\)"):
        DPO(make_policy(), rows, None, DPOConfig(variant="kto"))
    with pytest.raises(ValueError, match="variant 'kto' trains on fixed unpaired rows"):
        OnlineDPO(make_policy(reference="copy"), ["x"], CallableSource(lambda p, c: [0.0] * len(c)),
                  DPOConfig(variant="kto"))
