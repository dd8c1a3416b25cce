"""Mixed precision (issue 13): `bf16-mixed` and `16-mixed` runs of every stage.

Under `torch.autocast` (what Lightning's `bf16-mixed` / `16-mixed` put around a training step,
generation included) a model's logits come out in bf16/fp16. The Policy and the sampler upcast
them and compute every log-prob, entropy, value and score in fp32 with autocast off, so:

- the log-probs used in ratios and KL, and those recorded at sampling time, are fp32 tensors, close
  to the fp32 model's but not equal to them (the logits matmul ran in bf16): that gap between a
  low-precision sampler and the learner is what a truncated-importance-sampling correction needs;
- an fp32 run is unchanged bit for bit (pinned here against the plain formulas);
- saved weights keep the model's dtype: trained under `bf16-mixed`, an fp32 model stays fp32 on
  disk; a bf16 model stays bf16.

The stage runs go through the `rlhf-lab fit` command in this process, 2 optimiser steps each,
from one saved tiny GPT-2. Lightning refuses fp16 AMP on CPU, so `16-mixed` runs on CUDA when
there is one; on CPU the same Lightning fp16 path (the `MixedPrecision` plugin with a
`GradScaler`, which scales the loss and unscales before the step) is exercised by putting that
plugin, with a CPU scaler, into the built Trainer.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from rlhf_lab.models.backbones import backbone_names, build_tiny_model
from rlhf_lab.models.lora import LoraSettings
from rlhf_lab.policy import Policy

TINY = dict(n_layer=1, n_embd=32, n_head=2)
MAX_GAP = 0.05  # |bf16-autocast log-prob - fp32 log-prob| on these tiny models (observed ~0.005)
PROMPTS = ["Q: 2+3=\nA:", "Q: 7-4=\nA:", "Q: 1+1=\nA: 2\nQ: 3+4=\nA:", "Q: 9-9=\nA:"]  # left padding


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _sequences(policy: Policy):
    """A fixed batch of prompt + sampled response (fp32 sampling), with left padding."""
    rollout = policy.generate(PROMPTS, max_new_tokens=6, suppress_eos=True,
                              generator=torch.Generator().manual_seed(0))
    assert (rollout.attention_mask[:, 0] == 0).any()
    return rollout.input_ids, rollout.attention_mask, rollout.response_mask.bool()


def _gap(low: torch.Tensor, high: torch.Tensor, mask: torch.Tensor) -> float:
    return float((low.detach() - high.detach())[mask].abs().max())


def _safetensors_dtypes(path: str) -> set[str]:
    with safe_open(path, "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


# ------------------------------------------------------------------ the Policy under autocast
def test_logprobs_values_and_scores_under_bf16_autocast_are_fp32_and_close(make_policy):
    policy = make_policy(scalar_head=True, reference="copy")
    ids, attn, mask = _sequences(policy)
    logits_dtypes = []
    policy.model.register_forward_hook(lambda m, a, out: logits_dtypes.append(out.logits.dtype))

    high = {
        "logprobs": policy.logprobs(ids, attn, temperature=0.7),
        "entropy": policy.logprobs(ids, attn, return_entropy=True)[1],
        "logprobs_and_values": policy.logprobs_and_values(ids, attn)[0],
        "values": policy.values(ids, attn),
        "ref_logprobs": policy.ref_logprobs(ids, attn),
    }
    high_scores = policy.scores(ids, attn)
    logits_dtypes.clear()
    with bf16_autocast():
        low = {
            "logprobs": policy.logprobs(ids, attn, temperature=0.7),
            "entropy": policy.logprobs(ids, attn, return_entropy=True)[1],
            "logprobs_and_values": policy.logprobs_and_values(ids, attn)[0],
            "values": policy.values(ids, attn),
            "ref_logprobs": policy.ref_logprobs(ids, attn),
        }
        low_scores = policy.scores(ids, attn)
    assert set(logits_dtypes) == {torch.bfloat16}, "autocast should put the policy's logits in bf16"
    for name, value in low.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
        gap = _gap(value, high[name], mask)
        assert gap <= MAX_GAP, (name, gap)
        # Not the fp32 numbers: the logits matmul ran in bf16 (the sampler/learner gap).
        assert gap > 0, name
    assert low_scores.dtype == torch.float32
    assert float((low_scores - high_scores).detach().abs().max()) <= MAX_GAP


def test_logprobs_get_gradients_under_bf16_autocast(make_policy):
    """The fp32 log-softmax sits on the autograd path: a bf16-mixed loss trains fp32 weights."""
    policy = make_policy(scalar_head=True)
    ids, attn, mask = _sequences(policy)
    with bf16_autocast():
        logprobs, entropy, values = policy.logprobs_and_values(ids, attn)
        loss = -(logprobs * mask).sum() / mask.sum() + (values ** 2).mean() - entropy.mean()
    assert loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # The head's gradient is the fp32 one up to bf16 rounding of the trunk (not zero, not off-scale).
    low = policy.scalar_head.weight.grad.clone()
    policy.model.zero_grad()
    policy.scalar_head.zero_grad()
    logprobs, entropy, values = policy.logprobs_and_values(ids, attn)
    (-(logprobs * mask).sum() / mask.sum() + (values ** 2).mean() - entropy.mean()).backward()
    high = policy.scalar_head.weight.grad
    assert float(high.norm()) > 0
    assert float((low - high).norm() / high.norm()) < 0.05


def test_generate_under_bf16_autocast_records_fp32_logprobs(make_policy):
    policy = make_policy()
    with bf16_autocast():
        rollout = policy.generate(PROMPTS, max_new_tokens=6, temperature=0.8,
                                  generator=torch.Generator().manual_seed(3))
        learner_bf16 = policy.logprobs(rollout.input_ids, rollout.attention_mask, temperature=0.8)
    mask = rollout.response_mask.bool()
    assert rollout.logprobs.dtype == torch.float32
    assert (rollout.logprobs[~mask] == 0).all()
    learner_fp32 = policy.logprobs(rollout.input_ids, rollout.attention_mask, temperature=0.8)
    # The sampler's bf16 log-probs against an fp32 learner: close, and not equal (what TIS corrects).
    gap = _gap(rollout.logprobs, learner_fp32, mask)
    assert 0 < gap <= MAX_GAP
    # Against the same bf16 model recomputed teacher-forced (other kernels, same precision): close.
    assert _gap(rollout.logprobs, learner_bf16, mask) <= MAX_GAP


def test_fp32_logprobs_values_and_scores_are_the_plain_formulas_bit_for_bit(make_policy):
    """The fp32 path is what it always was: no cast and no autocast switch changes a bit."""
    policy = make_policy(scalar_head=True)
    ids, attn, _ = _sequences(policy)
    out = policy._forward(policy.model, ids, attn, hidden=True)
    logp_all = (out.logits[:, :-1] / 0.7).log_softmax(dim=-1)
    expected = torch.nn.functional.pad(logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
    entropy = torch.nn.functional.pad(-(logp_all.exp() * logp_all).sum(dim=-1), (1, 0))
    logprobs, got_entropy = policy.logprobs(ids, attn, temperature=0.7, return_entropy=True)
    assert torch.equal(logprobs, expected) and torch.equal(got_entropy, entropy)
    hidden = out.hidden_states[-1]
    values = torch.nn.functional.pad(policy.scalar_head(hidden[:, :-1]).squeeze(-1), (1, 0))
    assert torch.equal(policy.values(ids, attn), values)
    last = attn.shape[1] - 1  # left padding: every row's last real token is the last column
    assert torch.equal(policy.scores(ids, attn), policy.scalar_head(hidden[:, last]).squeeze(-1))


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_samples_and_scores_under_bf16_autocast(name, tokenizer):
    """Every named backbone runs under bf16 autocast (the toy LSTM's recurrence stays in fp32)."""
    torch.manual_seed(0)
    policy = Policy(build_tiny_model(name, tokenizer), tokenizer)
    with bf16_autocast():
        rollout = policy.generate(PROMPTS, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
        low = policy.logprobs(rollout.input_ids, rollout.attention_mask)
    high = policy.logprobs(rollout.input_ids, rollout.attention_mask)
    mask = rollout.response_mask.bool()
    assert rollout.logprobs.dtype == low.dtype == torch.float32
    assert torch.isfinite(low).all() and torch.isfinite(rollout.logprobs).all()
    assert _gap(low, high, mask) <= MAX_GAP
    assert _gap(rollout.logprobs, high, mask) <= MAX_GAP


# ------------------------------------------------------------------ saved weights keep their dtype
def test_fp32_model_trained_under_bf16_autocast_is_saved_and_loaded_fp32(make_policy, tmp_path):
    policy = make_policy(scalar_head=True)
    ids, attn, mask = _sequences(policy)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    for _ in range(2):
        with bf16_autocast():
            logprobs, _, values = policy.logprobs_and_values(ids, attn)
            loss = -(logprobs * mask).sum() / mask.sum() + (values ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
    policy.save(str(tmp_path))
    assert _safetensors_dtypes(str(tmp_path / "model.safetensors")) == {"F32"}
    assert _safetensors_dtypes(str(tmp_path / "scalar_head.safetensors")) == {"F32"}
    loaded = Policy.load(str(tmp_path))
    for (name, p), q in zip(policy.named_parameters(), loaded.parameters(), strict=True):
        assert q.dtype == torch.float32 and torch.equal(p, q), name


def test_bf16_model_is_saved_and_loaded_bf16(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model("gpt2-tiny", tokenizer, **TINY).to(torch.bfloat16)
    policy = Policy(model, tokenizer, scalar_head=True)
    ids, attn, _ = _sequences(policy)
    assert policy.logprobs(ids, attn).dtype == policy.values(ids, attn).dtype == torch.float32
    policy.save(str(tmp_path / "full"))
    assert _safetensors_dtypes(str(tmp_path / "full" / "model.safetensors")) == {"BF16"}
    assert _safetensors_dtypes(str(tmp_path / "full" / "scalar_head.safetensors")) == {"F32"}  # the head's own
    loaded = Policy.load(str(tmp_path / "full"))
    for (name, p), q in zip(policy.model.named_parameters(), loaded.model.parameters(), strict=True):
        assert q.dtype == torch.bfloat16 and torch.equal(p, q), name

    # A LoRA policy on a bf16 base: the base stays bf16, merged or not (the adapter keeps peft's fp32).
    torch.manual_seed(0)
    base = build_tiny_model("gpt2-tiny", tokenizer, **TINY).to(torch.bfloat16)
    lora = Policy(base, tokenizer, lora=LoraSettings(r=4))
    lora.save(str(tmp_path / "lora"))
    assert _safetensors_dtypes(str(tmp_path / "lora" / "base" / "model.safetensors")) == {"BF16"}
    lora.save(str(tmp_path / "merged"), merge=True)
    assert _safetensors_dtypes(str(tmp_path / "merged" / "model.safetensors")) == {"BF16"}


# ------------------------------------------------------------------ every stage through `rlhf-lab fit`
STAGES = ["pretrain", "sft", "reward_model", "dpo", "ppo", "grpo", "online_dpo"]
ONLINE = {"ppo", "grpo", "online_dpo", "trpo"}
# TRPO (the online stage with a trust-region update: a double backward through the bf16 model)
# runs under bf16-mixed; under fp16 AMP its critic-less iteration steps the optimiser without a
# scaled backward, which GradScaler refuses, so it is left out of the fp16 cases.
BF16_STAGES = [*STAGES, "trpo"]
LEARNED_REWARD = {"grpo", "online_dpo", "trpo"}  # the stages scored by the reward model (see _stage_args)


def _stage_args(stage: str, root: str) -> list[str]:
    pairs = os.path.join(root, "pairs.jsonl")
    # The online stages score with the reward model trained first: a random policy gets gold
    # reward 0 on every sample, which would leave GRPO's advantages and online DPO's pairs empty.
    learned = ["--reward.source", "reward_model", "--reward.path", os.path.join(root, "reward_model"),
               "--reward.normalize", "false"]
    return {
        "pretrain": ["--task", "arithmetic", "--config.batch_size", "8"],
        "sft": ["--task", "arithmetic", "--config.batch_size", "8", "--eval.prompts", "4"],
        "reward_model": ["--data.format", "preference", "--data.path", pairs, "--config.batch_size", "4"],
        "dpo": ["--data.format", "preference", "--data.path", pairs, "--config.batch_size", "4",
                "--eval.prompts", "4"],
        "ppo": ["--task", "arithmetic", "--config.prompts_per_step", "4", "--config.ppo_epochs", "1",
                "--config.minibatches", "1", "--eval.prompts", "4"],
        "grpo": ["--task", "arithmetic", *learned, "--config.prompts_per_step", "2", "--eval.prompts", "4"],
        "online_dpo": ["--task", "arithmetic", *learned, "--config.batch_size", "4", "--eval.prompts", "4"],
        "trpo": ["--task", "arithmetic", *learned, "--config.prompts_per_step", "4", "--eval.prompts", "4"],
    }[stage]


def _prepare(root: str, tokenizer) -> str:
    """The starting policy (a saved 1-layer GPT-2 in fp32) and the preference pairs; returns the policy folder."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "pairs.jsonl"), "w") as f:
        for a in range(8):
            for b in range(8):
                f.write(json.dumps({"prompt": f"Q: {a}+{b}=\nA:", "chosen": f" {a + b}",
                                    "rejected": f" {(a + b + 3) % 17}"}) + "\n")
    torch.manual_seed(0)
    init = os.path.join(root, "init")
    Policy(build_tiny_model("gpt2-tiny", tokenizer, **TINY), tokenizer).save(init)
    return init


class _Recorder:
    """Wraps `Policy.generate`, `logprobs`, `logprobs_and_values` and `scores` to record, per call,
    whether CPU autocast was on (and in which dtype) and the dtype of the log-probs (scores) returned."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str | None, torch.dtype]] = []
        for name in ("generate", "logprobs", "logprobs_and_values", "scores"):
            monkeypatch.setattr(Policy, name, self._wrap(name, getattr(Policy, name)))

    def _wrap(self, name, fn):
        def wrapped(policy, *args, **kwargs):
            out = fn(policy, *args, **kwargs)
            logprobs = out.logprobs if name == "generate" else out[0] if isinstance(out, tuple) else out
            amp = str(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else None
            self.calls.append((name, amp, logprobs.dtype))
            return out

        return wrapped


def _fit(stage: str, root: str, init: str, precision: str, *extra: str, steps: int = 2) -> int:
    from rlhf_lab.cli import main

    return main(["fit", stage, *_stage_args(stage, root), "--model.backbone", init, "--trainer.max_steps", str(steps),
                 "--trainer.precision", precision, "--trainer.enable_progress_bar", "false", "--out", root, *extra])


def _check_run(folder: str, init: str, precision: str, steps: int = 2) -> dict:
    """What every precision run must show; returns the last train row of metrics.csv."""
    with open(os.path.join(folder, "config.yaml")) as f:
        assert f"precision: {precision}" in f.read()
    with open(os.path.join(folder, "summary.json")) as f:
        assert json.load(f)["steps"] == steps
    with open(os.path.join(folder, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert rows, "no train/loss logged"
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert all(float(r["train/skipped_steps"] or 0) == 0 for r in rows)
    weights = os.path.join(folder, "model.safetensors")
    assert _safetensors_dtypes(weights) == {"F32"}  # an fp32 model trained in mixed precision stays fp32
    with safe_open(weights, "pt") as new, safe_open(os.path.join(init, "model.safetensors"), "pt") as old:
        assert set(new.keys()) == set(old.keys())
        assert any(not torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in new.keys()), "weights unchanged"
    return rows[-1]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, tokenizer):
    """Every stage, 2 optimiser steps under bf16-mixed on CPU; returns (root, init, exit codes, calls)."""
    root = str(tmp_path_factory.mktemp("bf16"))
    init = _prepare(root, tokenizer)
    codes, calls = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        recorder = _Recorder(mp)
        for stage in BF16_STAGES:  # reward_model before the online stages that use it
            recorder.calls.clear()
            codes[stage] = _fit(stage, root, init, "bf16-mixed")
            calls[stage] = list(recorder.calls)
    return root, init, codes, calls


@pytest.mark.slow
@pytest.mark.parametrize("stage", BF16_STAGES)
def test_every_stage_trains_under_bf16_mixed_on_cpu(stage, bf16_runs):
    root, init, codes, calls = bf16_runs
    assert codes[stage] == 0
    _check_run(os.path.join(root, stage), init, "bf16-mixed")
    if stage == "reward_model":
        assert _safetensors_dtypes(os.path.join(root, stage, "scalar_head.safetensors")) == {"F32"}
    # Log-probs are fp32 in every call, inside the autocast of the training step too.
    under_amp = {name for name, amp, _ in calls[stage] if amp == "torch.bfloat16"}
    assert all(dtype == torch.float32 for _, _, dtype in calls[stage])
    if stage in ONLINE:  # the rollout's recorded log-probs were sampled under bf16 autocast, in fp32
        assert "generate" in under_amp
    if stage in ("pretrain", "sft", "dpo", "grpo", "online_dpo", "trpo"):
        assert "logprobs" in under_amp
    if stage == "ppo":
        assert "logprobs_and_values" in under_amp
    if stage == "reward_model":
        assert "scores" in under_amp


# fp16 AMP with manual optimisation: the online stage clips in `on_before_optimizer_step`, which
# Lightning calls after its GradScaler unscaled the gradients (clipping before the step would
# unscale them twice: "unscale_() has already been called on this optimizer").
FP16_STAGES = list(STAGES)


# fp16 runs take more steps: dynamic loss scaling starts at 2^16 and skips the steps whose scaled
# gradients overflow while it halves the scale (the tiny reward model skips 3 of its first 4).
FP16_STEPS = 6


def _fp16_on_cpu(monkeypatch):
    """Put Lightning's fp16 AMP plugin, with a CPU GradScaler, into the Trainer the builder makes."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    import rlhf_lab.runs.builder as builder

    make_trainer = builder.make_trainer

    def with_fp16(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
        return trainer

    monkeypatch.setattr(builder, "make_trainer", with_fp16)


@pytest.mark.slow
@pytest.mark.parametrize("stage", FP16_STAGES)
def test_every_stage_trains_with_fp16_loss_scaling_on_cpu(stage, tmp_path, tokenizer, monkeypatch, bf16_runs):
    root = str(tmp_path)
    init = _prepare(root, tokenizer)
    if stage in LEARNED_REWARD:  # the reward model of the bf16 runs
        os.symlink(os.path.join(bf16_runs[0], "reward_model"), os.path.join(root, "reward_model"))
    _fp16_on_cpu(monkeypatch)
    recorder = _Recorder(monkeypatch)
    # "32-true" is the flag Lightning accepts on CPU; the plugin in the Trainer is fp16 AMP.
    assert _fit(stage, root, init, "32-true", steps=FP16_STEPS) == 0
    _check_run(os.path.join(root, stage), init, "32-true", steps=FP16_STEPS)
    assert all(dtype == torch.float32 for _, _, dtype in recorder.calls)
    assert any(amp == "torch.float16" for _, amp, _ in recorder.calls)


CUDA_CASES = [*(pytest.param(s, "16-mixed") for s in STAGES),
              *(pytest.param(s, "bf16-mixed") for s in BF16_STAGES)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs CUDA (Lightning refuses fp16 AMP on CPU)")
@pytest.mark.parametrize(("stage", "precision"), CUDA_CASES)
def test_every_stage_trains_in_mixed_precision_on_cuda(stage, precision, tmp_path, tokenizer, bf16_runs):
    root = str(tmp_path)
    init = _prepare(root, tokenizer)
    if stage in LEARNED_REWARD:
        os.symlink(os.path.join(bf16_runs[0], "reward_model"), os.path.join(root, "reward_model"))
    steps = FP16_STEPS if precision == "16-mixed" else 2
    assert _fit(stage, root, init, precision, "--trainer.accelerator", "gpu", "--trainer.devices", "1", steps=steps) == 0
    _check_run(os.path.join(root, stage), init, precision, steps=steps)
