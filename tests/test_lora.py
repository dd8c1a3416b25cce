"""LoRA through the one Policy: one frozen base serves the policy, its reference and PPO's critic.

Run as a script (`python tests/test_lora.py`) to print the memory of one PPO-style step with
LoRA + adapter-disabled reference + critic adapter against full fine-tuning + frozen copy +
value head, on a larger tiny GPT-2 (each measured in its own process, for peak RSS).
"""

import copy
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from rlhf_lab.models.backbones import build_tiny_model
from rlhf_lab.models.lora import (
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    adapter_parameters,
    apply_lora,
    base_state_dict,
    default_target_modules,
    parameter_bytes,
)
from rlhf_lab.models.toy import build_toy_model
from rlhf_lab.policy import Policy, position_ids_from_mask
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import OnlineRL, OnlineRLConfig


def _tiny(family: str, tokenizer):
    """A 1-layer, hidden-32 causal LM of `family`, random weights, no dropout."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        return build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2)
    if family.startswith("toy_"):
        return build_toy_model(family.removeprefix("toy_"), tokenizer, hidden_size=32)
    if family == "opt":
        config = OPTConfig(**ids, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                           word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0,
                           attention_dropout=0.0)
    else:
        config = LlamaConfig(**ids, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config)


def _batch(policy, task, n=4):
    rollout = policy.generate(task.eval_prompts()[:n], max_new_tokens=4, greedy=True)
    return rollout.input_ids, rollout.attention_mask, rollout.response_mask


def _snapshot(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in base_state_dict(policy.model).items()}


def _train_adapter(policy, args, steps=3, lr=5e-2):
    """A few steps raising the log-prob of the batch's own tokens: moves the adapter (B ≠ 0)."""
    ids, attn, mask = args
    optimizer = torch.optim.Adam(policy.actor_parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (-(policy.logprobs(ids, attn) * mask).sum() / mask.sum()).backward()
        optimizer.step()


# ---------------------------------------------------------------------- settings and targets
@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be > 0"),
    (dict(r=2.5), "r must be an int"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(target_modules=[]), "target_modules must be a non-empty list"),
])
def test_bad_lora_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraSettings(**kwargs)


def test_unknown_model_types_and_targets_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match=r"no default LoRA target modules for model_type 'rlhf_lab_lstm'; "
                                         r"pass target_modules=\[\.\.\.\]"):
        default_target_modules("rlhf_lab_lstm")

    class LSTMLM(nn.Module):  # no default targets, and an LSTM LoRA cannot wrap
        config = SimpleNamespace(model_type="rlhf_lab_lstm")

        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(8, 8), nn.Linear(8, 10)

    with pytest.raises(ValueError, match="no default LoRA target modules for model_type 'rlhf_lab_lstm'"):
        apply_lora(LSTMLM(), LoraSettings())
    with pytest.raises(ValueError, match=r"LSTM layers, which LoRA cannot adapt; choose from: \['head'\]"):
        apply_lora(LSTMLM(), LoraSettings(target_modules=["lstm"]))
    with pytest.raises(ValueError, match=r"match no layer of model_type 'gpt2'.*'c_attn'"):
        apply_lora(_tiny("gpt2", tokenizer), LoraSettings(target_modules=["q_proj"]))
    # The toy LSTM LM: no default, and the error names what could be adapted instead.
    with pytest.raises(ValueError, match=r"model_type 'rlhf_lab_lstm'.*can adapt here: \['embed_tokens', 'lm_head'\]"):
        apply_lora(_tiny("toy_lstm", tokenizer), LoraSettings())
    assert apply_lora(_tiny("toy_lstm", tokenizer), LoraSettings(target_modules=["lm_head"])) is not None


def test_reference_base_and_critic_adapter_need_an_adapter(make_policy):
    with pytest.raises(ValueError, match="reference='base' .* needs a LoRA adapter"):
        make_policy(reference="base")
    with pytest.raises(ValueError, match="critic='adapter' needs a LoRA adapter"):
        make_policy(critic="adapter")
    with pytest.raises(ValueError, match="critic must be a Policy, 'adapter' or None"):
        make_policy(lora=LoraSettings(), critic="head")


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "toy_attention"])
def test_adapter_trains_while_the_base_and_reference_stay_put(tokenizer, task, family):
    torch.manual_seed(0)
    model = _tiny(family, tokenizer)
    plain = Policy(copy.deepcopy(model), tokenizer)  # the untouched base, to compare against
    policy = Policy(model, tokenizer, lora=LoraSettings(r=4), reference="base")
    # The default targets of this architecture got adapters, and only adapters train.
    adapted = {n.split(".")[-1] for n, m in policy.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(DEFAULT_TARGET_MODULES[model.config.model_type])
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert policy.actor_parameters() == policy.trainable_parameters() and policy.critic_parameters() == []

    args = _batch(policy, task)
    ids, attn, _ = args
    base_logprobs = plain.logprobs(ids, attn)
    torch.testing.assert_close(policy.ref_logprobs(ids, attn), base_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(policy.logprobs(ids, attn), base_logprobs, atol=1e-6, rtol=0)  # B = 0

    base_before = _snapshot(policy)
    _train_adapter(policy, args)
    assert not torch.allclose(policy.logprobs(ids, attn), base_logprobs, atol=1e-3)
    torch.testing.assert_close(policy.ref_logprobs(ids, attn), base_logprobs, atol=1e-6, rtol=0)
    for key, value in base_state_dict(policy.model).items():
        assert torch.equal(value, base_before[key]), f"base weight {key} moved"
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable


# ---------------------------------------------------------------------- sharing and memory
def test_reference_runs_the_very_same_base_weights(make_policy, task):
    policy = make_policy(lora=LoraSettings(), reference="base")
    assert policy.reference is None and policy.has_reference

    def weights_used(fn):
        """data_ptr of every parameter of every module that runs inside `fn`, and which modules ran."""
        used, ran = set(), set()

        def record(name, module):
            ran.add(name)
            used.update(p.data_ptr() for p in module.parameters(recurse=False))

        hooks = [m.register_forward_hook(lambda mod, a, o, name=name: record(name, mod))
                 for name, m in policy.model.named_modules()]
        try:
            fn()
        finally:
            for h in hooks:
                h.remove()
        return used, ran

    ids, attn, _ = _batch(policy, task)
    ref_used, ref_ran = weights_used(lambda: policy.ref_logprobs(ids, attn))
    pol_used, pol_ran = weights_used(lambda: policy.logprobs(ids, attn))
    frozen = {p.data_ptr() for p in policy.model.parameters() if not p.requires_grad}
    adapter = {p.data_ptr() for p in adapter_parameters(policy.model, "default")}
    # The reference reads base storages only, the same ones the policy reads, and no adapter runs.
    assert ref_used and ref_used <= frozen and ref_used <= pol_used
    assert not any("lora_" in name for name in ref_ran)
    assert adapter <= pol_used and not adapter & ref_used
    c_attn = policy.model.get_base_model().transformer.h[0].attn.c_attn.base_layer.weight
    assert c_attn.data_ptr() in ref_used and c_attn.data_ptr() in pol_used

    # No second copy: LoRA policy = base + adapter; a full fine-tune with a frozen copy = 2 × base.
    base = parameter_bytes(make_policy().model)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapter_parameters(policy.model, "default"))
    assert parameter_bytes(policy) == base + adapter_bytes
    assert parameter_bytes(policy) < 1.1 * base
    assert parameter_bytes(make_policy(reference="copy")) == 2 * base


def _ppo_step_bytes(policy, task) -> dict[str, int]:
    """One PPO-style step (rollout, logprobs, ref_logprobs, values, backward, AdamW step); the bytes
    of the distinct storages it leaves: weights, gradients and optimiser state."""
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    rollout = policy.generate(task.rl_prompts()[:8], max_new_tokens=8)
    ids, attn, mask = rollout.input_ids, rollout.attention_mask, rollout.response_mask.float()
    ref = policy.ref_logprobs(ids, attn)
    logprobs, _, values = policy.logprobs_and_values(ids, attn)
    loss = -((logprobs - ref.detach()) * mask).sum() / mask.sum() + (values * mask).pow(2).mean()
    loss.backward()
    optimizer.step()

    def unique_bytes(tensors):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    sizes = {"weights": parameter_bytes(policy), "grads": unique_bytes(grads), "optimizer": unique_bytes(state)}
    sizes["total"] = sum(sizes.values())
    return sizes


def test_lora_ppo_step_holds_far_less_than_full_fine_tuning(make_policy, task):
    lora = _ppo_step_bytes(make_policy(lora=LoraSettings(), reference="base", critic="adapter"), task)
    full = _ppo_step_bytes(make_policy(reference="copy", scalar_head=True), task)
    base = parameter_bytes(make_policy().model)
    # 1-layer GPT-2, hidden 32: base 109,824 B; each r=8 adapter on c_attn (32 → 96) is
    # (8·32 + 96·8)·4 = 4,096 B. Full: weights 2 × base + head, gradients and two AdamW moments
    # for all of it. LoRA: base + 2 adapters + head; gradients and moments for the adapters only.
    assert full["weights"] > 1.99 * base and lora["weights"] < 1.1 * base
    assert lora["grads"] < 0.1 * full["grads"] and lora["optimizer"] < 0.1 * full["optimizer"]
    assert lora["total"] < 0.3 * full["total"]


# ---------------------------------------------------------------------- the critic adapter
def test_critic_adapter_and_policy_adapter_get_only_their_own_gradients(make_policy, task):
    policy = make_policy(lora=LoraSettings(), reference="copy", critic="adapter")
    assert policy.has_values and policy.has_separate_critic and policy.scalar_head is None
    policy_adapter = {id(p) for p in adapter_parameters(policy.model, "default")}
    critic = {id(p) for p in adapter_parameters(policy.model, "critic")} | {id(p) for p in policy.critic_head.parameters()}
    assert {id(p) for p in policy.critic_parameters()} == critic
    assert {id(p) for p in policy.actor_parameters()} == policy_adapter
    flags = [p.requires_grad for p in policy.parameters()]

    ids, attn, mask = _batch(policy, task)
    logprobs, _, values = policy.logprobs_and_values(ids, attn)
    assert values.shape == ids.shape and (values[:, 0] == 0).all()
    assert policy.model.active_adapter == "default"  # back to the policy after the critic ran
    assert [p.requires_grad for p in policy.parameters()] == flags  # peft's switches left no trace

    (values * mask).pow(2).sum().backward(retain_graph=True)
    # (A's gradient is 0 while B is 0, as LoRA starts; what matters is which weights it reaches.)
    got = {id(p) for p in policy.parameters() if p.grad is not None}
    assert got == critic
    policy.zero_grad(set_to_none=True)
    (logprobs * mask).sum().backward()
    got = {id(p) for p in policy.parameters() if p.grad is not None}
    assert got == policy_adapter

    # Training the policy adapter leaves the values alone, and the critic adapter the log-probs.
    before = policy.values(ids, attn).detach()
    _train_adapter(policy, (ids, attn, mask))
    torch.testing.assert_close(policy.values(ids, attn), before, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- saving and loading
def test_save_load_round_trip_with_adapter_and_critic(make_policy, task, tmp_path):
    policy = make_policy(lora=LoraSettings(r=4, alpha=8), reference="base", critic="adapter", scalar_head=True)
    args = _batch(policy, task)
    ids, attn, _ = args
    _train_adapter(policy, args)
    with torch.no_grad():
        for p in policy.critic_parameters():
            p.add_(0.05)
    folder = tmp_path / "p"
    policy.save(str(folder), extra={"stage": "test"})
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "scalar_head.safetensors",
                 "rlhf_lab_policy.json", "base/config.json", "base/model.safetensors",
                 "critic/adapter_config.json", "critic/adapter_model.safetensors", "critic/scalar_head.safetensors"):
        assert (folder / name).exists(), name
    assert not (folder / "model.safetensors").exists()  # the folder holds the adapter, the base is apart
    meta = json.loads((folder / "rlhf_lab_policy.json").read_text())
    assert meta["base_model"] == "base" and meta["critic"] == "adapter" and meta["stage"] == "test"

    loaded = Policy.load(str(folder), reference="base")
    assert loaded.adapter_name == "default" and loaded.critic_adapter == "critic"
    for fn in ("logprobs", "values", "ref_logprobs", "scores"):
        torch.testing.assert_close(getattr(loaded, fn)(ids, attn), getattr(policy, fn)(ids, attn), atol=1e-6, rtol=0)
    names = lambda p: [n for n, q in p.named_parameters() if q.requires_grad]  # noqa: E731
    assert names(loaded) == names(policy)


def test_reference_copy_of_a_trained_adapter_is_the_adapter_not_the_base(make_policy, task, tmp_path):
    policy = make_policy(lora=LoraSettings())
    args = _batch(policy, task)
    ids, attn, _ = args
    _train_adapter(policy, args)
    policy.save(str(tmp_path / "sft"))
    # "copy" = the policy as loaded (its trained adapter, frozen), "base" = adapters off.
    as_copy = Policy.load(str(tmp_path / "sft"), reference="copy")
    as_base = Policy.load(str(tmp_path / "sft"), reference="base")
    torch.testing.assert_close(as_copy.ref_logprobs(ids, attn), policy.logprobs(ids, attn), atol=1e-6, rtol=0)
    with policy.model.disable_adapter():
        base_logprobs = policy.logprobs(ids, attn)
    torch.testing.assert_close(as_base.ref_logprobs(ids, attn), base_logprobs, atol=1e-6, rtol=0)
    # The copy is adapter-sized and frozen; it stays put while the policy adapter trains.
    frozen = adapter_parameters(as_copy.model, "reference")
    assert frozen and not any(p.requires_grad for p in frozen)
    assert parameter_bytes(as_copy) < 1.1 * parameter_bytes(as_base)
    _train_adapter(as_copy, args)
    torch.testing.assert_close(as_copy.ref_logprobs(ids, attn), policy.logprobs(ids, attn), atol=1e-6, rtol=0)


def test_merged_export_loads_as_a_plain_model_with_the_same_logits(make_policy, task, tmp_path):
    policy = make_policy(lora=LoraSettings(), reference="base", critic="adapter")
    args = _batch(policy, task)
    ids, attn, _ = args
    _train_adapter(policy, args)
    policy.save(str(tmp_path / "merged"), merge=True)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert not (tmp_path / "merged" / "critic").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    kw = dict(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn))
    with torch.no_grad():
        torch.testing.assert_close(plain(**kw).logits, policy.model(**kw).logits, atol=1e-5, rtol=0)
    # The base of the live policy is untouched by the export (nothing merged in place).
    torch.testing.assert_close(policy.ref_logprobs(ids, attn), make_policy().logprobs(ids, attn), atol=1e-6, rtol=0)
    torch.testing.assert_close(Policy.load(str(tmp_path / "merged")).logprobs(ids, attn), policy.logprobs(ids, attn),
                               atol=1e-5, rtol=0)


def test_adapter_alone_goes_onto_a_base_and_a_known_base_is_referenced(make_policy, task, tmp_path):
    make_policy().save(str(tmp_path / "base"))
    policy = Policy.load(str(tmp_path / "base"), lora=LoraSettings())
    args = _batch(policy, task)
    ids, attn, _ = args
    _train_adapter(policy, args)
    policy.save_adapter(str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    for base in (str(tmp_path / "base"), Policy.load(str(tmp_path / "base"))):
        onto = Policy.load_adapter(base, str(tmp_path / "adapter"), reference="base")
        torch.testing.assert_close(onto.logprobs(ids, attn), policy.logprobs(ids, attn), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no LoRA adapter to save"):
        make_policy().save_adapter(str(tmp_path / "nothing"))

    # Loaded from a local folder, the base is named in the metadata, not copied.
    policy.save(str(tmp_path / "run"))
    assert not (tmp_path / "run" / "base").exists()
    meta = json.loads((tmp_path / "run" / "rlhf_lab_policy.json").read_text())
    assert meta["base_model"] == str(tmp_path / "base")
    torch.testing.assert_close(Policy.load(str(tmp_path / "run")).logprobs(ids, attn), policy.logprobs(ids, attn),
                               atol=1e-6, rtol=0)
    # Saving over a folder that holds another policy's copied base removes that stale base/.
    make_policy(seed=1, lora=LoraSettings()).save(str(tmp_path / "reused"))
    assert (tmp_path / "reused" / "base").exists()
    policy.save(str(tmp_path / "reused"))
    assert not (tmp_path / "reused" / "base").exists()
    torch.testing.assert_close(Policy.load(str(tmp_path / "reused")).logprobs(ids, attn), policy.logprobs(ids, attn),
                               atol=1e-6, rtol=0)
    policy.save(str(tmp_path / "standalone"), save_base=True)
    assert (tmp_path / "standalone" / "base" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "base")
    torch.testing.assert_close(Policy.load(str(tmp_path / "standalone")).logprobs(ids, attn),
                               policy.logprobs(ids, attn), atol=1e-6, rtol=0)
    with pytest.raises(OSError, match="has no base model"):
        Policy.load(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="save_base=False names the base's folder"):
        make_policy(lora=LoraSettings()).save(str(tmp_path / "x"), save_base=False)


def test_a_lora_policy_refuses_a_base_that_changed_since_it_was_saved(make_policy, task, tmp_path):
    from rlhf_lab.errors import CheckpointError

    base, run, copied = str(tmp_path / "base"), str(tmp_path / "run"), str(tmp_path / "copied")
    make_policy().save(base)
    policy = Policy.load(base, lora=LoraSettings())
    args = _batch(policy, task)
    _train_adapter(policy, args)
    policy.save(run)  # names base/ in its metadata
    policy.save(copied, save_base=True)  # holds its own copy in copied/base
    meta = json.loads((tmp_path / "run" / "rlhf_lab_policy.json").read_text())
    assert meta["base_fingerprint"].startswith("sha256:")
    ids, attn, _ = args
    want = policy.logprobs(ids, attn)
    torch.testing.assert_close(Policy.load(run).logprobs(ids, attn), want, atol=1e-6, rtol=0)

    make_policy(seed=1).save(base)  # another run overwrites the base folder
    make_policy(seed=1).save(os.path.join(copied, "base"))
    for folder, base_dir in ((run, base), (copied, os.path.join(copied, "base"))):
        with pytest.raises(CheckpointError, match="changed since its adapter was trained") as err:
            Policy.load(folder)
        assert f"'{folder}'" in str(err.value) and f"'{base_dir}'" in str(err.value)
        assert isinstance(err.value, ValueError)
    # The way out the message names: put the adapter on the new base explicitly.
    onto = Policy.load_adapter(base, run)
    assert not torch.allclose(onto.logprobs(ids, attn), want)


def test_a_lora_folder_saved_without_a_base_fingerprint_loads_with_a_warning(make_policy, task, tmp_path,
                                                                              caplog):
    make_policy().save(str(tmp_path / "base"))
    policy = Policy.load(str(tmp_path / "base"), lora=LoraSettings())
    args = _batch(policy, task)
    _train_adapter(policy, args)
    policy.save(str(tmp_path / "run"))
    meta_file = tmp_path / "run" / "rlhf_lab_policy.json"
    meta = json.loads(meta_file.read_text())
    del meta["base_fingerprint"]  # as a folder saved before fingerprints were recorded
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="rlhf_lab.models.io"):
        loaded = Policy.load(str(tmp_path / "run"))
    assert "records no fingerprint of its base" in caplog.text and str(tmp_path / "base") in caplog.text
    ids, attn, _ = args
    torch.testing.assert_close(loaded.logprobs(ids, attn), policy.logprobs(ids, attn), atol=1e-6, rtol=0)


def test_weights_fingerprint_follows_the_values_not_the_storage():
    from rlhf_lab.models.lora import weights_fingerprint

    torch.manual_seed(0)
    state = {"b.weight": torch.randn(3, 4).bfloat16().float(), "a.bias": torch.zeros(4), "n": torch.tensor(3)}
    same = weights_fingerprint(state)
    assert same.startswith("sha256:") and len(same) == len("sha256:") + 64
    assert weights_fingerprint(dict(reversed(list(state.items())))) == same  # order of the dict
    assert weights_fingerprint({**state, "b.weight": state["b.weight"].bfloat16()}) == same  # exact in bf16
    changed = state["b.weight"].clone()
    changed[1, 2] += 1
    assert weights_fingerprint({**state, "b.weight": changed}) != same
    assert weights_fingerprint({**state, "b.weight": state["b.weight"].reshape(4, 3)}) != same
    assert weights_fingerprint({"c.weight" if k == "b.weight" else k: v for k, v in state.items()}) != same


# ---------------------------------------------------------------------- one PPO iteration
def test_one_ppo_iteration_with_lora_reference_and_critic_adapter(make_policy, task, tmp_path):
    policy = make_policy(seed=0, lora=LoraSettings(), reference="base", critic="adapter")
    base_before = _snapshot(policy)
    adapters_before = {n: [p.detach().clone() for p in adapter_parameters(policy.model, n)] for n in ("default", "critic")}
    config = OnlineRLConfig(lr=3e-3, critic_lr=1e-2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6,
                            minibatches=1, ppo_epochs=2, kl_coef=0.1)
    stage = OnlineRL(policy, task.rl_prompts(), CallableSource(lambda p, c: [len(x) / 10 for x in c]), config)
    groups = stage.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [3e-3, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in policy.critic_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(policy.trainable_parameters())
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=config.steps_per_iteration, max_epochs=-1, accelerator="cpu",
                        logger=CSVLogger(str(tmp_path), name="lora", version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        num_sanity_val_steps=0)
    trainer.fit(stage)
    with open(tmp_path / "lora" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/kl")]
    assert len(rows) == 1 and rows[0]["train/value_loss"]
    kl = float(rows[0]["train/kl"])
    assert math.isfinite(kl) and abs(kl) < 1e-4  # sampled from base + fresh adapter = the reference
    for key, value in base_state_dict(policy.model).items():
        assert torch.equal(value, base_before[key]), f"base weight {key} moved"
    for name, before in adapters_before.items():
        after = adapter_parameters(policy.model, name)
        assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), f"adapter {name} did not train"


# ---------------------------------------------------------------------- memory report (script)
def _measure(kind: str, n_embd: int, n_layer: int) -> dict:
    """Peak RSS growth and held bytes of one PPO-style step, in this (fresh) process."""
    import resource

    from rlhf_lab.models.tokenizer import train_bpe_tokenizer
    from rlhf_lab.tasks import get_task

    torch.set_num_threads(1)
    task = get_task("arithmetic")
    tokenizer = train_bpe_tokenizer(task.tokenizer_texts())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; the peak so far
    torch.manual_seed(0)
    model = build_tiny_model("gpt2-tiny", tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=8, n_positions=64)
    if kind == "lora":
        policy = Policy(model, tokenizer, lora=LoraSettings(), reference="base", critic="adapter")
    else:
        policy = Policy(model, tokenizer, reference="copy", scalar_head=True)
    sizes = _ppo_step_bytes(policy, task)
    base = model.parameters() if kind == "full" else base_state_dict(policy.model).values()
    sizes["base"] = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in base}.values())
    sizes["peak_rss_delta"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return sizes


if __name__ == "__main__":
    if len(sys.argv) > 1:  # one measurement, in a child process
        print(json.dumps(_measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
        sys.exit(0)
    n_embd, n_layer = 512, 8
    print(f"one PPO-style step, GPT-2 n_embd={n_embd} n_layer={n_layer}, CPU fp32 (MiB)")
    for kind in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, kind, str(n_embd), str(n_layer)], capture_output=True,
                             text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        sizes = json.loads(out.stdout.strip().splitlines()[-1])
        print(kind.ljust(5), "  ".join(f"{k}={v / 2**20:.1f}" for k, v in sizes.items()))
