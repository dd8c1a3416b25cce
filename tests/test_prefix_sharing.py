"""Shared prefixes (`Policy._shared_prefix`): rows that repeat the columns before the first scored
one — a prompt's k samples, a preference pair's two sides — run those columns once, and the
log-probs, entropies, values and gradients equal the whole-sequence pass's.

Each test compares a pass with sharing (the default) against the same pass with it switched off
(`PREFIX_SHARING_MIN_SAVED` above 1), and counts the positions the model's body ran. Nothing
asserts a time.
"""

from __future__ import annotations

import pytest
import torch

import rlhf_lab.policy as policy_module
from rlhf_lab.models.backbones import build_tiny_model
from rlhf_lab.models.lora import LoraSettings
from rlhf_lab.policy import Policy, first_scored_column

OFF = 2.0  # no pass can save more than all of its positions


def _group_rollout(tokenizer, samples=3, completion=7, seed=0):
    """A rollout laid out as the online stages lay it out: three left-padded prompts of different
    lengths, each repeated `samples` times (rows shuffled), then `completion` random tokens
    (the last row right-padded, as a finished row is). Returns ids, attention mask, response mask."""
    enc = tokenizer(["Q: 2+3=\nA:", "Q: 17-9=\nA:", "Hi"], return_tensors="pt", padding=True,
                    padding_side="left")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(3 * samples, generator=g)
    rows = torch.arange(3).repeat_interleave(samples)[order]
    prompt_ids, prompt_mask = enc["input_ids"][rows], enc["attention_mask"][rows]
    response = torch.randint(3, len(tokenizer), (len(rows), completion), generator=g)
    response_mask = torch.ones_like(response)
    response_mask[-1, -2:] = 0
    response[-1, -2:] = tokenizer.pad_token_id
    ids = torch.cat([prompt_ids, response], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return ids, mask, torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)


def _body_positions(model) -> list[int]:
    """Positions (rows × columns) each forward of `model`'s first transformer block sees."""
    seen: list[int] = []
    block = model.get_base_model() if hasattr(model, "get_base_model") else model
    block.transformer.h[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2].numel()))
    return seen


def _pass(policy, ids, mask, scored, sharing, monkeypatch):
    """logprobs + entropy + values of the policy and a loss's gradients, with or without sharing."""
    monkeypatch.setattr(policy_module, "PREFIX_SHARING_MIN_SAVED", 0.1 if sharing else OFF)
    policy.zero_grad()
    start = first_scored_column(scored)
    if policy.scalar_head is not None:
        logp, entropy, values = policy.logprobs_and_values(ids, mask, temperature=0.9, start=start)
    else:
        (logp, entropy), values = policy.logprobs(ids, mask, 0.9, return_entropy=True, start=start), None
    weights = torch.linspace(-1.0, 2.0, ids.numel()).view(ids.shape)
    loss = ((logp * weights - 0.3 * entropy) * scored).sum()
    if values is not None:
        loss = loss + (values * scored).pow(2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    ref = policy.ref_logprobs(ids, mask, 0.9, start=start) if policy.has_reference else None
    return logp.detach(), entropy.detach(), None if values is None else values.detach(), ref, grads


def _assert_same(shared, whole):
    for got, want in zip(shared[:4], whole[:4], strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert shared[4].keys() == whole[4].keys() and shared[4]
    for name, grad in whole[4].items():
        torch.testing.assert_close(shared[4][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("budget", [64, 2**30], ids=["sliced-head", "full-logits"])
def test_group_samples_share_their_prompt_and_match_the_whole_pass(make_policy, tokenizer, monkeypatch, budget):
    monkeypatch.setattr(policy_module, "LOGPROB_CHUNK_ELEMENTS", budget)
    policy = make_policy(seed=2, scalar_head=True, reference="copy")
    ids, mask, scored = _group_rollout(tokenizer)
    positions = _body_positions(policy.model)
    ref_positions = _body_positions(policy.reference)
    whole = _pass(policy, ids, mask, scored, False, monkeypatch)
    whole_positions, whole_ref = sum(positions), sum(ref_positions)
    positions.clear()
    ref_positions.clear()
    shared = _pass(policy, ids, mask, scored, True, monkeypatch)
    _assert_same(shared, whole)
    # 9 rows of T columns, the first start-1 of which are 3 distinct prefixes: 6 prefixes fewer.
    b, t = ids.shape
    cut = first_scored_column(scored) - 1
    assert whole_positions == b * t and whole_ref == b * t
    assert sum(positions) == b * t - 6 * cut == 3 * cut + b * (t - cut)
    assert sum(ref_positions) == b * t - 6 * cut
    assert (shared[0][:, :cut + 1] == 0).all()  # columns before start are still 0


def test_preference_pairs_share_their_prompt(make_policy, tokenizer, monkeypatch):
    """A DPO batch (chosen rows, then rejected rows, right-padded) shares each pair's prompt."""
    from rlhf_lab.data import PreferenceDataset, preference_collate

    policy = make_policy(seed=4, reference="copy")
    rows = [{"prompt": "Q: 12+30=\nA:", "chosen": " 42", "rejected": " 41 no"},
            {"prompt": "Q: 5*5=\nA:", "chosen": " 25 yes", "rejected": " 24"}]
    data = PreferenceDataset(rows, tokenizer)
    batch = preference_collate([data[0], data[1]], tokenizer.pad_token_id)
    ids, mask, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    positions = _body_positions(policy.model)
    whole = _pass(policy, ids, mask, scored, False, monkeypatch)
    positions.clear()
    shared = _pass(policy, ids, mask, scored, True, monkeypatch)
    _assert_same(shared, whole)
    b, t = ids.shape
    cut = first_scored_column(scored) - 1
    assert cut > 0 and sum(positions) == b * t - 2 * cut  # 4 rows, 2 distinct prompts


def test_lora_policy_and_its_adapter_off_reference_share_prefixes(make_policy, tokenizer, monkeypatch):
    policy = make_policy(seed=6, lora=LoraSettings(r=2, alpha=4.0), reference="base")
    with torch.no_grad():  # a non-zero adapter, so the policy and the reference differ
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, mask, scored = _group_rollout(tokenizer, seed=1)
    whole = _pass(policy, ids, mask, scored, False, monkeypatch)
    shared = _pass(policy, ids, mask, scored, True, monkeypatch)
    _assert_same(shared, whole)
    assert (shared[0] - shared[3]).abs().max() > 1e-3  # the reference really is another policy


@pytest.mark.parametrize("name", ["llama-tiny", "opt-tiny", "attention", "lstm"])
def test_other_backbones_and_toy_models_share_prefixes_through_their_cache(tokenizer, monkeypatch, name):
    torch.manual_seed(3)
    policy = Policy(build_tiny_model(name, tokenizer), tokenizer, reference="copy")
    ids, mask, scored = _group_rollout(tokenizer, seed=2)
    calls: list[int] = []
    policy.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[1]),
                                       with_kwargs=True)
    whole = _pass(policy, ids, mask, scored, False, monkeypatch)
    assert calls == [ids.shape[1]]
    calls.clear()
    shared = _pass(policy, ids, mask, scored, True, monkeypatch)
    cut = first_scored_column(scored) - 1
    assert calls == [cut, ids.shape[1] - cut]  # the distinct prefixes, then every row's rest
    _assert_same(shared, whole)


def test_sharing_is_skipped_where_it_saves_too_little_or_the_model_cannot_cache(make_policy, tokenizer,
                                                                               monkeypatch):
    policy = make_policy(seed=1)
    ids, mask, scored = _group_rollout(tokenizer, samples=1)  # three distinct prompts
    positions = _body_positions(policy.model)
    start = first_scored_column(scored)
    policy.logprobs(ids, mask, start=start)
    assert positions == [ids.numel()]
    ids, mask, scored = _group_rollout(tokenizer)
    positions.clear()
    model = policy.model
    on, off = ("activation_checkpointing_enable", "activation_checkpointing_disable") \
        if hasattr(model, "activation_checkpointing_enable") else ("gradient_checkpointing_enable",
                                                                   "gradient_checkpointing_disable")
    getattr(model, on)()  # no cache under activation checkpointing: the whole pass
    policy.logprobs(ids, mask, start=start)
    assert positions == [ids.numel()]
    getattr(model, off)()
    positions.clear()
    policy.logprobs(ids, mask, start=start)
    assert len(positions) == 2 and sum(positions) < ids.numel()


def test_values_from_a_start_column_share_prefixes_for_every_kind_of_critic(make_policy, tokenizer, monkeypatch):
    """`values(start=k)`: columns ≥ k equal the whole pass's values, the ones before are 0, and the
    head, a critic adapter and a separate critic all run a shared prefix once."""
    ids, mask, scored = _group_rollout(tokenizer, seed=3)
    start = first_scored_column(scored)
    b, t = ids.shape
    head = make_policy(seed=8, scalar_head=True)
    adapter = make_policy(seed=9, lora=LoraSettings(r=2, alpha=4.0), critic="adapter")
    separate = make_policy(seed=10, critic=make_policy(seed=11, scalar_head=True))
    for policy, body in ((head, head.model), (adapter, adapter.model), (separate, separate.critic.model)):
        positions = _body_positions(body)
        whole = policy.values(ids, mask)
        assert positions == [b * t]
        positions.clear()
        shared = policy.values(ids, mask, start=start)
        assert sum(positions) == b * t - 6 * (start - 1)  # 3 distinct prefixes of 9 rows
        assert (shared[:, :start] == 0).all()
        torch.testing.assert_close(shared[:, start:], whole[:, start:], atol=1e-5, rtol=0)
        monkeypatch.setattr(policy_module, "PREFIX_SHARING_MIN_SAVED", OFF)
        positions.clear()
        torch.testing.assert_close(policy.values(ids, mask, start=start), shared, atol=1e-5, rtol=0)
        assert positions == [b * t]
        monkeypatch.setattr(policy_module, "PREFIX_SHARING_MIN_SAVED", 0.1)
