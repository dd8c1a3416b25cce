"""The online loop: presets are only defaults, every knob changes the update, metric names line up."""

import csv
import dataclasses
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lab.algorithms import ALGORITHMS
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import OnlineRL, OnlineRLConfig

# The online RL algorithms of the registry and their preset knobs.
PRESETS = {name: dict(a.preset) for name, a in ALGORITHMS.items() if a.stage == "online_rl"}


def _chars(prompts, completions):
    return [len(c) / 10 for c in completions]


SMALL = dict(lr=3e-3, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, minibatches=1, ppo_epochs=2,
             kl_coef=0.1)
# TRPO without a critic moves the policy outside AdamW: SMALL's optimiser knobs would be refused.
TRPO_SMALL = {k: v for k, v in SMALL.items() if k not in ("lr", "minibatches", "ppo_epochs")}


def _small(preset):
    """SMALL's knobs the preset neither sets itself nor leaves without effect."""
    small = TRPO_SMALL if PRESETS[preset].get("update") == "trpo" else SMALL
    return {k: v for k, v in small.items() if k not in PRESETS[preset]}


def _run(make_policy, task, tmp_path, config, iterations=1, name="run"):
    """Fit `iterations` iterations from a fixed seed; return the policy's flat weights and the logged rows."""
    critic = config.baseline == "critic"
    policy = make_policy(seed=0, scalar_head=critic, reference="copy")
    eos = policy.tokenizer.eos_token_id

    def favour_eos(module, args, output):
        # A random tiny model almost never samples EOS; this makes response lengths vary, so
        # length-dependent knobs (aggregation, missing_eos_penalty) have something to act on.
        output.logits[..., eos] += 5.0
        return output

    policy.model.register_forward_hook(favour_eos)
    stage = OnlineRL(policy, task.rl_prompts(), CallableSource(_chars), config, gold_fn=CallableSource(_chars))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=iterations * config.steps_per_iteration, max_epochs=-1,
                        logger=CSVLogger(str(tmp_path), name=name, version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(stage)
    with open(tmp_path / name / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    weights = torch.cat([p.detach().flatten() for p in policy.model.parameters()])
    return weights, rows, stage


def test_presets_are_only_defaults():
    grpo = OnlineRLConfig.preset("grpo")
    # k3+ (k3's value, an unbiased gradient): the paper's k3 is one override away.
    assert (grpo.baseline, grpo.kl_in, grpo.kl_estimator, grpo.samples_per_prompt) == ("group_norm", "loss", "k3+", 4)
    assert OnlineRLConfig.preset("grpo", kl_estimator="k3").kl_estimator == "k3"
    assert OnlineRLConfig.preset("rloo", samples_per_prompt=8).samples_per_prompt == 8
    # A preset is the default config with its registry entry's knobs applied, nothing else.
    for name, knobs in PRESETS.items():
        config = OnlineRLConfig.preset(name)
        default = OnlineRLConfig(**{**knobs, "algorithm": name})
        assert config == default
    assert OnlineRLConfig() == OnlineRLConfig.preset("ppo")
    with pytest.raises(ValueError, match="preset must be one of"):
        OnlineRLConfig.preset("a2c")


@pytest.mark.parametrize("field, value, message", [
    ("baseline", "median", "baseline must be one of"),
    ("kl_in", "value", "kl_in must be one of"),
])
def test_bad_knobs_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        OnlineRLConfig(**{field: value})


def test_group_baselines_need_groups():
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2 for baseline 'leave_one_out'"):
        OnlineRLConfig(baseline="leave_one_out", samples_per_prompt=1)
    with pytest.raises(ValueError, match="group_norm"):
        OnlineRLConfig(baseline="group_norm", samples_per_prompt=1)


SHARED = {"train/loss", "train/reward", "train/gold_reward", "train/kl", "train/entropy",
          "train/response_length", "train/policy_loss", "train/clipfrac", "train/approx_kl",
          "train/advantage_std", "budget/generated_tokens", "budget/samples", "budget/reward_calls",
          "budget/optimizer_steps", "budget/seconds"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_and_logs_the_shared_names(make_policy, task, tmp_path, preset):
    config = OnlineRLConfig.preset(preset, **_small(preset))
    _, rows, stage = _run(make_policy, task, tmp_path, config, iterations=2)
    keys = {k for r in rows for k, v in r.items() if v}
    assert SHARED <= keys
    assert ("train/value_loss" in keys) == (config.baseline == "critic")
    assert ("train/kl_loss" in keys) == (config.kl_in == "loss")
    assert len(stage.history) == 2 and stage.hparams["algorithm"] == preset


BASE = OnlineRLConfig(**SMALL, baseline="batch_mean")
KNOBS = [
    ("baseline", "none"), ("baseline", "leave_one_out"), ("baseline", "group_norm"), ("baseline", "critic"),
    ("kl_in", "loss"), ("kl_estimator", "k3"), ("kl_coef", 1.0), ("clip_ratio", None), ("clip_ratio", 0.05),
    ("ratio_level", "sequence"), ("aggregation", "seq_mean"), ("whiten_advantages", False),
    ("missing_eos_penalty", 1.0), ("entropy_coef", 0.5), ("ppo_epochs", 1), ("minibatches", 2),
    ("samples_per_prompt", 4), ("temperature", 0.5), ("top_p", 0.5), ("max_new_tokens", 3), ("lr", 1e-3),
    # The 2025 family: each a knob of the same loop.
    ("baseline", "group_mean"), ("aggregation", "seq_mean_token_sum_norm"), ("clip_ratio_high", 1e-3),
    ("dual_clip", 1.0001), ("surrogate", "cispo"), ("returns", "to_go"), ("overlong_buffer", 0.5),
    ("kl_estimator", "k3+"),
]


def test_each_knob_changes_the_update(make_policy, task, tmp_path):
    base, _, _ = _run(make_policy, task, tmp_path, BASE, name="base")
    again, _, _ = _run(make_policy, task, tmp_path, BASE, name="again")
    assert torch.equal(base, again), "the comparison needs a deterministic run"
    for field, value in KNOBS:
        changed, _, _ = _run(make_policy, task, tmp_path, OnlineRLConfig(**{**SMALL, "baseline": "batch_mean",
                                                                          field: value}), name=f"{field}-{value}")
        assert not torch.allclose(changed, base), f"{field}={value} did not change the update"


def test_kl_in_the_loss_estimator_and_ratio_weighting_change_the_update(make_policy, task, tmp_path):
    # k3 and k3+ have equal values but different gradients; π/π_old weighting acts from the 2nd epoch.
    loss_kl = {**SMALL, "baseline": "batch_mean", "kl_in": "loss", "kl_coef": 1.0, "kl_estimator": "k3"}
    k3, _, _ = _run(make_policy, task, tmp_path, OnlineRLConfig(**loss_kl), name="k3")
    for change in ({"kl_estimator": "k3+"}, {"kl_ratio_weighted": True}):
        other, _, _ = _run(make_policy, task, tmp_path, OnlineRLConfig(**{**loss_kl, **change}), name=str(change))
        assert not torch.allclose(other, k3), change


def _prompt_only(prompts, completions):
    """Rewards that depend on the completion only for the prompts with an even number of '1's: the
    other prompts' groups all score 1.0 and carry no signal under a group baseline."""
    return [len(c) / 10 if p.count("1") % 2 == 0 else 1.0 for p, c in zip(prompts, completions, strict=True)]


def test_dynamic_sampling_keeps_groups_that_differ_and_counts_every_sample(make_policy, task):
    config = OnlineRLConfig(**{**SMALL, "baseline": "group_norm", "dynamic_sampling": True, "max_sampling_rounds": 4})
    policy = make_policy(seed=0, reference="copy")
    eos = policy.tokenizer.eos_token_id

    def favour_eos(module, args, output):  # responses of varied lengths, so some groups differ
        output.logits[..., eos] += 3.0
        return output

    policy.model.register_forward_hook(favour_eos)
    stage = OnlineRL(policy, task.rl_prompts(), CallableSource(_prompt_only), config)
    prompts = task.rl_prompts()[:4]
    assert any(p.count("1") % 2 for p in prompts), "the test needs groups without signal"
    torch.manual_seed(0)
    stage._sampled = (0, 0)
    rollout = stage.make_rollout(prompts)
    kept, sampled = stage._kept_groups
    # Every kept group's scores differ; at most one group per prompt asked for.
    for g in rollout.group_ids.unique():
        scores = rollout.scores[rollout.group_ids == g]
        assert scores.max() > scores.min()
    assert kept == len(rollout.group_ids.unique()) <= len(prompts)
    assert sampled > kept  # groups were dropped and more prompts sampled
    assert stage._sampled[0] == sampled * config.samples_per_prompt  # every sampled row counts
    # Without it, the uninformative groups stay in the batch.
    plain = OnlineRL(make_policy(seed=0, reference="copy"), task.rl_prompts(), CallableSource(_prompt_only),
                     dataclasses.replace(config, dynamic_sampling=False, max_sampling_rounds=3))
    assert len(plain.make_rollout(prompts)) == len(prompts) * config.samples_per_prompt


def test_overlong_penalty_lowers_the_scores_the_update_learns_from(make_policy, task):
    config = OnlineRLConfig(**{**SMALL, "baseline": "batch_mean", "max_new_tokens": 8, "overlong_buffer": 0.5})
    stage = OnlineRL(make_policy(seed=0, reference="copy"), task.rl_prompts(), CallableSource(_chars), config)
    torch.manual_seed(0)
    rollout = stage.make_rollout(task.rl_prompts()[:4])
    lengths = rollout.response_lengths.float()
    # Buffer of 4 tokens before the limit of 8: −(L − 4)/4 for L > 4, so −1 at 8 tokens.
    expected = rollout.scores - ((lengths - 4).clamp_min(0) / 4)
    torch.testing.assert_close(stage._training_scores(rollout), expected)
    assert (lengths > 4).any(), "the test needs responses inside the buffer"
    # The rewards carry the penalised score: their sum is it, less β times the summed k1 KL.
    mask = rollout.response_mask.float()
    kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1)
    torch.testing.assert_close(rollout.rewards.sum(dim=1) + config.kl_coef * kl, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_rollout_correction_weights_replayed_samples_by_the_trainers_log_probs(make_policy, task, tmp_path, mode):
    """A buffer whose recorded log-probs are not the trainer's (here: shifted, as another sampler
    or precision would leave them): the stage logs the mismatch and bounds the weights."""
    from rlhf_lab.rollout import RolloutBuffer

    sampler = OnlineRL(make_policy(seed=0, reference="copy"), task.rl_prompts(), CallableSource(_chars),
                       OnlineRLConfig(**{**SMALL, "baseline": "batch_mean"}))
    torch.manual_seed(0)
    rollout = sampler.make_rollout(task.rl_prompts()[:4])
    mask = rollout.response_mask.float()
    noise = torch.randn(rollout.logprobs.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    rollout.logprobs = rollout.logprobs + noise * mask
    buffer = RolloutBuffer(sampler.policy.tokenizer.pad_token_id)
    buffer.add(rollout)
    config = OnlineRLConfig(**{**SMALL, "baseline": "batch_mean", "rollout_correction": mode,
                               "rollout_correction_cap": 1.5})
    stage = OnlineRL(make_policy(seed=0, reference="copy"), task.rl_prompts(), CallableSource(_chars), config,
                     replay=buffer)
    stage._correction = None
    data = stage.annotate(stage._replay_share())
    # The trainer's log-probs are the policy's own: the recorded ones differ by the noise.
    diff = ((data.train_logprobs - data.logprobs).abs() * mask).sum() / mask.sum()
    assert float(diff) > 0.1
    torch.testing.assert_close(stage._correction["sampling_logprob_diff"], diff, rtol=1e-4, atol=1e-6)
    weights = data.is_weights[mask.bool()]
    assert float(weights.max()) <= 1.5 + 1e-6
    if mode == "tis":
        assert (weights == 1.5).any()  # truncated, not dropped
    else:
        assert (weights == 0).any()  # masked: above the cap
    trainer = L.Trainer(max_steps=config.steps_per_iteration, max_epochs=-1,
                        logger=CSVLogger(str(tmp_path), name=mode, version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", log_every_n_steps=1)
    trainer.fit(stage)
    logged = {k for k in trainer.logged_metrics}
    assert {"train/sampling_logprob_diff", "train/is_weight", "train/is_capped_frac"} <= logged


def test_adaptive_kl_coef_moves_with_the_observed_kl(make_policy, task, tmp_path):
    config = OnlineRLConfig(**{**SMALL, "baseline": "batch_mean", "kl_target": 1e-4, "kl_horizon": 10})
    _, rows, stage = _run(make_policy, task, tmp_path, config, iterations=3)
    coefs = [float(r["train/kl_coef"]) for r in rows if r.get("train/kl_coef")]
    # Observed KL ≫ target 1e-4, so the error clips at +0.2 and β grows by
    # (1 + 0.2 · n / horizon) = 1 + 0.2 · 8 / 10 = 1.16 per iteration of n = 8 samples:
    # β = 0.1, 0.116, 0.13456.
    assert coefs == pytest.approx([0.1, 0.116, 0.13456], rel=1e-5)


@pytest.mark.parametrize("max_kl", [1e-3, 1e-2])
def test_trpo_step_stays_inside_the_kl_bound(make_policy, task, tmp_path, max_kl):
    config = OnlineRLConfig.preset("trpo", **{**TRPO_SMALL, "samples_per_prompt": 4, "max_kl": max_kl})
    before = torch.cat([p.detach().flatten().clone() for p in make_policy(seed=0).model.parameters()])
    after, rows, stage = _run(make_policy, task, tmp_path, config, iterations=2, name=f"trpo-{max_kl}")
    achieved = [float(r["train/approx_kl"]) for r in rows if r.get("train/approx_kl")]
    accepted = [float(r["train/trpo_accepted"]) for r in rows if r.get("train/trpo_accepted")]
    assert len(achieved) == 2 and all(0 <= kl <= max_kl * (1 + 1e-4) for kl in achieved)
    assert any(accepted) and not torch.equal(before, after)
    assert stage.budget.optimizer_steps == 2  # one Trainer step per TRPO iteration


def test_trpo_max_kl_changes_the_update(make_policy, task, tmp_path):
    runs = [_run(make_policy, task, tmp_path, OnlineRLConfig.preset("trpo", **{**TRPO_SMALL, "samples_per_prompt": 4,
                                                                            "max_kl": m}), name=f"kl{m}")[0]
            for m in (1e-4, 1e-2)]
    start = torch.cat([p.detach().flatten() for p in make_policy(seed=0).model.parameters()])
    assert (runs[1] - start).norm() > (runs[0] - start).norm()


def test_trpo_with_a_value_head_is_refused(make_policy, task):
    config = OnlineRLConfig(update="trpo")
    with pytest.raises(ValueError, match="needs a separate critic"):
        OnlineRL(make_policy(scalar_head=True, reference="copy"), task.rl_prompts(), CallableSource(_chars), config)


def test_replaying_one_saved_buffer_through_different_losses(make_policy, task, tmp_path):
    from rlhf_lab.rollout import RolloutBuffer

    # 1. Sample and score once, then save the rollouts.
    sampler = OnlineRL(make_policy(seed=0, reference="copy"), task.rl_prompts(), CallableSource(_chars),
                       OnlineRLConfig(**{**SMALL, "baseline": "batch_mean"}))
    torch.manual_seed(0)
    buffer = RolloutBuffer(sampler.policy.tokenizer.pad_token_id)
    buffer.add(sampler.make_rollout(task.rl_prompts()[:4]))
    buffer.save(str(tmp_path / "rollouts.pt"))

    # 2. Train fresh copies of the same policy on those rollouts with four algorithms.
    start = torch.cat([p.detach().flatten() for p in make_policy(seed=0).model.parameters()])
    moved = {}
    for name in ("ppo", "reinforce", "rloo", "grpo"):
        config = OnlineRLConfig.preset(name, **{**SMALL, **{k: v for k, v in PRESETS[name].items()
                                                            if k not in ("samples_per_prompt",)},
                                                "samples_per_prompt": 2})
        policy = make_policy(seed=0, scalar_head=config.baseline == "critic", reference="copy")

        def no_sampling(*args, **kwargs):
            raise AssertionError("a replayed run must not sample")

        policy.generate = no_sampling
        stage = OnlineRL(policy, task.rl_prompts(), CallableSource(_chars), config,
                         replay=RolloutBuffer.load(str(tmp_path / "rollouts.pt"), policy.tokenizer.pad_token_id))
        trainer = L.Trainer(max_steps=2 * config.steps_per_iteration, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu")
        trainer.fit(stage)
        assert stage.budget.samples == 2 * len(buffer) and stage.budget.reward_calls == 0
        moved[name] = torch.cat([p.detach().flatten() for p in policy.model.parameters()]) - start
    # The same samples give a different update under each loss.
    names = sorted(moved)
    for i, a in enumerate(names):
        assert moved[a].norm() > 0
        for b in names[i + 1:]:
            assert not torch.allclose(moved[a], moved[b]), (a, b)


def test_replay_needs_scores_and_groups_the_baseline_can_use(make_policy, task, tmp_path):
    from rlhf_lab.rollout import RolloutBuffer

    sampler = OnlineRL(make_policy(seed=0, reference="copy"), task.rl_prompts(), CallableSource(_chars),
                       OnlineRLConfig(**{**SMALL, "baseline": "batch_mean", "samples_per_prompt": 1}))
    rollout = sampler.make_rollout(task.rl_prompts()[:3])
    assert rollout.group_ids.tolist() == [0, 1, 2]  # one sample per prompt
    buffer = RolloutBuffer(0)
    buffer.add(rollout)
    # RLOO's baseline is the rest of the group: a group of one sample has none.
    with pytest.raises(ValueError, match="leave_one_out needs >= 2 samples in every group"):
        OnlineRL(make_policy(reference="copy"), [], CallableSource(_chars), OnlineRLConfig.preset("rloo", samples_per_prompt=2),
                 replay=buffer)
    ungrouped = RolloutBuffer(0)
    ungrouped.add(dataclasses.replace(rollout, group_ids=None))
    with pytest.raises(ValueError, match="no group_ids"):
        OnlineRL(make_policy(reference="copy"), [], CallableSource(_chars), OnlineRLConfig.preset("reinforce"),
                 replay=ungrouped)
    unscored = RolloutBuffer(0)
    unscored.add(dataclasses.replace(rollout, scores=None))
    with pytest.raises(ValueError, match="no scores"):
        OnlineRL(make_policy(reference="copy"), [], CallableSource(_chars), OnlineRLConfig.preset("reinforce"),
                 replay=unscored)


def test_config_accepts_a_name_added_to_a_registry(monkeypatch):
    from rlhf_lab.losses import AGGREGATIONS, BASELINES

    with pytest.raises(ValueError, match="aggregation"):
        OnlineRLConfig(aggregation="sum")
    monkeypatch.setitem(AGGREGATIONS, "sum", lambda loss, mask: (loss * mask).sum())
    monkeypatch.setitem(BASELINES, "zero", BASELINES["none"])
    config = OnlineRLConfig(aggregation="sum", baseline="zero")
    assert (config.aggregation, config.baseline) == ("sum", "zero")


# ------------------------------------------------------------------ knobs without an effect
# (knob, value, the other knobs that choose the mode): one row per knob the mode never reads.
_TRPO = {"update": "trpo", "baseline": "leave_one_out", "samples_per_prompt": 4}
_TRPO_CRITIC = {"update": "trpo", "baseline": "critic"}
INERT = [
    *[(knob, value, _TRPO_CRITIC, "update='trpo'") for knob, value in
      [("clip_ratio", 0.3), ("clip_ratio", None), ("ratio_level", "sequence"), ("aggregation", "seq_mean"),
       ("entropy_coef", 0.01), ("vf_coef", 1.0)]],
    *[(knob, value, _TRPO, "update='trpo' and baseline='leave_one_out'") for knob, value in
      [("lr", 1e-3), ("weight_decay", 0.1), ("max_grad_norm", 0.5), ("ppo_epochs", 2), ("minibatches", 4)]],
    ("lr", 1e-3, {**_TRPO_CRITIC, "critic_lr": 1e-3}, "update='trpo' and critic_lr set"),
    *[(knob, value, {}, "update='gradient'") for knob, value in
      [("max_kl", 0.05), ("cg_iters", 5), ("cg_damping", 0.01), ("line_search_steps", 3)]],
    *[(knob, value, {"baseline": baseline, "samples_per_prompt": 2}, f"baseline='{baseline}'")
      for baseline in ("none", "batch_mean", "leave_one_out", "group_norm")
      for knob, value in [("gamma", 0.99), ("lam", 1.0), ("vf_coef", 0.1), ("value_clip", None),
                          ("critic_lr", 1e-3)]],
    ("kl_horizon", 500, {}, "kl_target=None"),
    *[(knob, value, {"clip_ratio": None}, "clip_ratio=None") for knob, value in [("clip_ratio_high", 0.3),
                                                                                ("dual_clip", 3.0)]],
    ("dual_clip", 3.0, {"surrogate": "cispo", "clip_ratio_high": 0.28}, "surrogate='cispo'"),
    ("kl_ratio_weighted", True, {}, "kl_in='reward'"),
    ("overlong_penalty", 0.5, {}, "overlong_buffer=None"),
    ("max_sampling_rounds", 5, {}, "dynamic_sampling=False"),
    ("rollout_correction_level", "sequence", {}, "rollout_correction=None"),
    ("rollout_correction_cap", 3.0, {}, "rollout_correction=None"),
    ("kl_target", 6.0, {"kl_coef": 0.0}, "kl_coef=0"),
]


@pytest.mark.parametrize("knob, value, mode, named", INERT,
                         ids=[f"{k}={v}-{'-'.join(f'{a}={b}' for a, b in m.items())}" for k, v, m, _ in INERT])
def test_a_knob_without_an_effect_is_refused(knob, value, mode, named):
    with pytest.raises(ValueError, match=rf"^{knob} has no effect with {re.escape(named)}.*leave it at its default"):
        OnlineRLConfig(**{**mode, knob: value})
    # The same mode with the knob at its default is fine.
    OnlineRLConfig(**mode)


def test_knobs_that_do_act_are_accepted():
    # ratio_level acts without clipping (token vs sequence ratio differ once the policy moves),
    # so it is not refused; the optimiser knobs fit the critic under TRPO with a critic.
    OnlineRLConfig(clip_ratio=None, ratio_level="sequence")
    OnlineRLConfig(update="trpo", baseline="critic", lr=1e-3, weight_decay=0.1, max_grad_norm=0.5, ppo_epochs=2,
                   minibatches=4, value_clip=None, gamma=0.99, lam=1.0, max_kl=0.05)
    OnlineRLConfig(kl_target=6.0, kl_horizon=500)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_constructs_cleanly(preset):
    # A preset that set a knob its own mode never reads would raise here.
    config = OnlineRLConfig.preset(preset)
    assert config.algorithm == preset
    assert all(getattr(config, knob) == value for knob, value in PRESETS[preset].items())


def test_the_stage_does_not_evaluate_itself(make_policy, task):
    # val/ metrics come from EvalCallback only; the stage has no validation loop of its own.
    stage = OnlineRL(make_policy(reference="copy"), task.rl_prompts(), CallableSource(_chars),
                     OnlineRLConfig(**{**SMALL, "baseline": "batch_mean"}))
    for name in ("validation_step", "on_validation_epoch_end", "val_dataloader"):
        assert getattr(type(stage), name) is getattr(L.LightningModule, name)
    with pytest.raises(TypeError, match="val_prompts"):
        OnlineRL(make_policy(reference="copy"), task.rl_prompts(), CallableSource(_chars), val_prompts=["x"])


def test_annotate_builds_the_rewards_with_shape_rewards(make_policy, task):
    from rlhf_lab.losses import shape_rewards

    config = OnlineRLConfig(**{**SMALL, "baseline": "batch_mean", "missing_eos_penalty": 1.0, "kl_estimator": "k2"})
    stage = OnlineRL(make_policy(reference="copy"), task.rl_prompts(), CallableSource(_chars), config)
    torch.manual_seed(0)
    rollout = stage.make_rollout(task.rl_prompts()[:4])
    expected = shape_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask,
                             kl_coef=0.1, kl_estimator="k2", ended_with_eos=rollout.ended_with_eos,
                             missing_eos_penalty=1.0)
    assert torch.equal(rollout.rewards, expected)
