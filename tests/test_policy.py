import pytest
import torch

from rlhf_lab.models.backbones import build_tiny_model
from rlhf_lab.models.tokenizer import train_bpe_tokenizer
from rlhf_lab.policy import Policy, position_ids_from_mask


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_sampled_logprobs_equal_recomputed_with_left_padding(make_policy, task):
    policy = make_policy()
    # Prompts of different lengths force left padding in the batch.
    prompts = task.eval_prompts()[:5] + ["Q: 1+1=\nA: 2\nQ: 3+4=\nA:"]
    for temperature in (1.0, 0.7):
        rollout = policy.generate(prompts, max_new_tokens=8, temperature=temperature,
                                  generator=torch.Generator().manual_seed(0))
        assert (rollout.attention_mask[:, 0] == 0).any(), "the batch should contain left padding"
        recomputed = policy.logprobs(rollout.input_ids, rollout.attention_mask, temperature=temperature)
        mask = rollout.response_mask.bool()
        torch.testing.assert_close(recomputed[mask], rollout.logprobs[mask], atol=1e-5, rtol=0)
        assert (rollout.logprobs[~mask] == 0).all()


def test_left_padding_does_not_change_logprobs(make_policy, task, tokenizer):
    policy = make_policy()
    short, long_ = "Q: 1+1=\nA: 2", "Q: 1+1=\nA: 2\nQ: 3+4=\nA: 7"
    alone = tokenizer([short], return_tensors="pt")
    batch = tokenizer([short, long_], return_tensors="pt", padding=True, padding_side="left")
    lp_alone = policy.logprobs(alone["input_ids"], alone["attention_mask"])[0]
    n = alone["input_ids"].shape[1]
    lp_padded = policy.logprobs(batch["input_ids"], batch["attention_mask"])[0, -n:]
    torch.testing.assert_close(lp_padded[1:], lp_alone[1:], atol=1e-5, rtol=0)


def test_generation_stops_at_eos_and_masks_the_rest(make_policy, tokenizer):
    policy = make_policy()
    eos = tokenizer.eos_token_id

    # Steer the logits: row 0 always prefers EOS, row 1 never samples it.
    def steer(module, args, output):
        output.logits[0, :, eos] += 100.0
        output.logits[1, :, eos] -= 100.0
        return output

    handle = policy.model.register_forward_hook(steer)
    try:
        rollout = policy.generate(["Q: 1+1=\nA:", "Q: 2+2=\nA:"], max_new_tokens=5)
    finally:
        handle.remove()
    assert rollout.ended_with_eos.tolist() == [True, False]
    assert rollout.response_mask.sum(dim=1).tolist() == [1, 5]
    n = rollout.prompt_length
    assert rollout.input_ids[0, n].item() == eos
    assert (rollout.attention_mask[0, n + 1:] == 0).all()  # nothing after EOS is attended
    assert rollout.completions[0] == ""


def test_suppress_eos_gives_fixed_length(make_policy):
    policy = make_policy()
    rollout = policy.generate(["Q: 1+1=\nA:"] * 4, max_new_tokens=6, suppress_eos=True)
    assert rollout.response_mask.sum(dim=1).tolist() == [6, 6, 6, 6]
    assert not rollout.ended_with_eos.any()


def test_samples_per_prompt_groups_rows(make_policy, task):
    policy = make_policy()
    rollout = policy.generate(task.eval_prompts()[:3], max_new_tokens=3, samples_per_prompt=4)
    assert len(rollout) == 12
    assert rollout.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert rollout.prompts[4:8] == [task.eval_prompts()[1]] * 4


def test_greedy_is_deterministic_and_top_p_restricts(make_policy, task):
    policy = make_policy()
    prompts = task.eval_prompts()[:4]
    a = policy.generate(prompts, max_new_tokens=4, greedy=True)
    b = policy.generate(prompts, max_new_tokens=4, greedy=True)
    assert torch.equal(a.input_ids, b.input_ids)
    # top_p → 0 keeps only the most likely token, so sampling equals greedy.
    c = policy.generate(prompts, max_new_tokens=4, top_p=1e-6)
    assert torch.equal(a.input_ids, c.input_ids)


def test_values_and_scores_shapes_and_alignment(make_policy, tokenizer):
    policy = make_policy(scalar_head=True)
    enc = tokenizer(["Q: 1+1=\nA: 2", "Q: 3+4=\nA: 7"], return_tensors="pt", padding=True,
                    padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    values = policy.values(ids, mask)
    assert values.shape == ids.shape and (values[:, 0] == 0).all()
    scores = policy.scores(ids, mask)
    assert scores.shape == (2,)
    # The score is the head at the last real token, i.e. the value column after it.
    padded = torch.nn.functional.pad(ids, (0, 1), value=tokenizer.pad_token_id)
    pmask = torch.nn.functional.pad(mask, (0, 1))
    last = mask.sum(dim=1)
    v = policy.values(padded, torch.where(pmask.bool() | (torch.arange(padded.shape[1]) == last[:, None]), 1, 0))
    torch.testing.assert_close(v[torch.arange(2), last], scores, atol=1e-5, rtol=0)


def test_reference_is_a_frozen_copy(make_policy, task):
    policy = make_policy(reference="copy")
    rollout = policy.generate(task.eval_prompts()[:4], max_new_tokens=4)
    ref = policy.ref_logprobs(rollout.input_ids, rollout.attention_mask)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(ref[mask], rollout.logprobs[mask], atol=1e-5, rtol=0)
    assert all(not p.requires_grad for p in policy.reference.parameters())
    ref_ids = {id(p) for p in policy.reference.parameters()}
    assert not ref_ids & {id(p) for p in policy.trainable_parameters()}
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.1)
    assert not torch.allclose(policy.ref_logprobs(rollout.input_ids, rollout.attention_mask),
                              policy.logprobs(rollout.input_ids, rollout.attention_mask))


def test_save_load_round_trip_gives_identical_outputs(make_policy, task, tmp_path):
    policy = make_policy(scalar_head=True)
    policy.save(str(tmp_path / "p"), extra={"stage": "test"})
    for name in ("config.json", "model.safetensors", "tokenizer.json", "scalar_head.safetensors",
                 "rlhf_lab_policy.json"):
        assert (tmp_path / "p" / name).exists(), name
    loaded = Policy.load(str(tmp_path / "p"))
    rollout = policy.generate(task.eval_prompts()[:3], max_new_tokens=4, greedy=True)
    args = (rollout.input_ids, rollout.attention_mask)
    torch.testing.assert_close(loaded.logprobs(*args), policy.logprobs(*args), atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.values(*args), policy.values(*args), atol=1e-6, rtol=0)
    assert Policy.load(str(tmp_path / "p"), scalar_head=False).scalar_head is None


def test_separate_critic_provides_values_and_round_trips(make_policy, task, tmp_path):
    critic = make_policy(seed=1, scalar_head=True)
    policy = make_policy(reference="copy", critic=critic)
    assert policy.scalar_head is None and policy.has_values
    rollout = policy.generate(task.eval_prompts()[:3], max_new_tokens=3, greedy=True)
    args = (rollout.input_ids, rollout.attention_mask)
    torch.testing.assert_close(policy.values(*args), critic.values(*args))
    critic_ids = {id(p) for p in critic.parameters()}
    assert critic_ids <= {id(p) for p in policy.trainable_parameters()}
    policy.save(str(tmp_path / "p"))
    loaded = Policy.load(str(tmp_path / "p"))
    assert loaded.critic is not None
    torch.testing.assert_close(loaded.values(*args), policy.values(*args), atol=1e-6, rtol=0)


def test_critic_must_share_the_tokenizer(make_policy):
    other = train_bpe_tokenizer(["completely different text"] * 10, vocab_size=300)
    critic = Policy(build_tiny_model("gpt2-tiny", other, n_layer=1, n_embd=32, n_head=2), other, scalar_head=True)
    with pytest.raises(ValueError, match="same tokenizer"):
        make_policy(critic=critic)


def test_long_prompts_keep_their_end_to_fit_the_positions(tokenizer, caplog):
    import logging

    torch.manual_seed(0)
    policy = Policy(build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=24),
                    tokenizer)
    long = "Q: " + "1+2+3+4+5+6+7+8+9+" * 3 + "0=\nA:"  # more than 24 tokens
    short = "Q: 2+3=\nA:"
    assert len(tokenizer(long)["input_ids"]) > 24
    with caplog.at_level(logging.WARNING, logger="rlhf_lab.sampling"):
        rollout = policy.generate([long, short], max_new_tokens=4, greedy=True, suppress_eos=True)
    assert "cut the start of 1 of 2 prompts to 20 tokens" in caplog.text
    assert rollout.input_ids.shape[1] == 24  # 20 prompt columns + 4 response tokens
    # The kept end of the long prompt is its last 20 tokens; the short prompt is untouched.
    assert rollout.input_ids[0, :20].tolist() == tokenizer(long)["input_ids"][-20:]
    n_short = len(tokenizer(short)["input_ids"])
    assert rollout.input_ids[1, 20 - n_short:20].tolist() == tokenizer(short)["input_ids"]
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        policy.generate([short], max_new_tokens=24)


# --------------------------------------------------------------------------- guards: finite weights, the right kind of folder


def test_save_refuses_non_finite_weights_and_writes_no_folder(make_policy, tmp_path):
    from rlhf_lab.errors import NonFiniteError

    policy = make_policy()
    name, param = next(iter(policy.named_parameters()))
    with torch.no_grad():
        param.view(-1)[:3] = float("nan")
    folder = tmp_path / "sft"
    with pytest.raises(NonFiniteError) as info:
        policy.save(str(folder))
    assert str(info.value) == (f"refusing to save {folder}: parameter '{name}' is not finite "
                               f"(3 nan, 0 inf of {param.numel()} values); a non-finite update corrupted the "
                               "weights, so nothing was written")
    assert not folder.exists()
    with torch.no_grad():
        param.view(-1)[:3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"\(0 nan, 3 inf of "):
        policy.save(str(folder))
    assert not folder.exists()


def test_load_refuses_a_checkpoint_of_the_wrong_kind(make_policy, tmp_path):
    from rlhf_lab.errors import CheckpointError

    rm_dir, sft_dir, plain_dir = tmp_path / "reward_model", tmp_path / "sft", tmp_path / "plain"
    rm = make_policy(scalar_head=True)
    rm.save(str(rm_dir), extra={"stage": "reward_model"})
    make_policy().save(str(sft_dir), extra={"stage": "sft"})
    make_policy().save(str(plain_dir))  # no stage recorded, no head
    with pytest.raises(CheckpointError) as info:
        Policy.load(str(rm_dir), expect="policy", field="model.backbone")
    assert str(info.value) == (f"{rm_dir} is a reward model (stage reward_model); model.backbone needs a policy "
                               "checkpoint (pretrain, sft, or an RL or DPO stage's)")
    with pytest.raises(CheckpointError) as info:
        Policy.load(str(sft_dir), scalar_head=True, expect="reward_model", field="reward.path")
    assert str(info.value) == (f"{sft_dir} is a policy (stage sft), not a reward model; reward.path needs a "
                               "reward-model checkpoint (stage reward_model)")
    with pytest.raises(CheckpointError, match=r"has no score head \(scalar_head.safetensors\), so it is not a "
                       r"reward model; reward.path needs"):
        Policy.load(str(plain_dir), scalar_head=True, expect="reward_model", field="reward.path")
    # The legitimate uses still load: each kind as itself, an SFT policy as the start of a reward
    # model (a fresh head), and any folder without `expect`.
    loaded = Policy.load(str(rm_dir), expect="reward_model").scalar_head
    assert torch.equal(loaded.weight, rm.scalar_head.weight) and torch.equal(loaded.bias, rm.scalar_head.bias)
    assert Policy.load(str(sft_dir), expect="policy").scalar_head is None
    fresh = Policy.load(str(sft_dir), scalar_head=True).scalar_head  # a new head: one score per hidden state
    assert fresh.weight.shape == rm.scalar_head.weight.shape and not torch.equal(fresh.weight, rm.scalar_head.weight)
    Policy.load(str(rm_dir))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Policy.load(str(tmp_path / "missing"))
