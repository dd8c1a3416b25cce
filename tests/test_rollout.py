import pytest
import torch

from rlhf_lab.rollout import Rollout, RolloutBuffer


def _rollout(b=6, t=5, offset=0):
    ids = torch.arange(b * t).view(b, t) + offset
    mask = torch.zeros(b, t, dtype=torch.long)
    mask[:, 2:] = 1
    return Rollout(
        input_ids=ids,
        attention_mask=torch.ones(b, t, dtype=torch.long),
        response_mask=mask,
        logprobs=torch.zeros(b, t),
        prompt_length=2,
        rewards=torch.zeros(b, t),
        values=torch.zeros(b, t),
        scores=torch.arange(b, dtype=torch.float),
        group_ids=torch.arange(b) // 2,
        prompts=[f"p{i}" for i in range(b)],
        completions=[f"c{i}" for i in range(b)],
    )


def test_buffer_yields_every_sample_once_per_epoch():
    buffer = RolloutBuffer(pad_token_id=0)
    buffer.add(_rollout(b=7))
    seen_per_epoch = []
    gen = torch.Generator().manual_seed(0)
    batches = list(buffer.minibatches(num_minibatches=3, epochs=4, generator=gen))
    assert len(batches) == 12
    for e in range(4):
        rows = sorted(int(x) for mb in batches[3 * e:3 * e + 3] for x in mb.scores)
        seen_per_epoch.append(rows)
        assert rows == list(range(7))  # each sample exactly once
        assert sorted(len(mb) for mb in batches[3 * e:3 * e + 3]) == [2, 2, 3]
    # Each epoch is a fresh shuffle.
    orders = [[int(x) for mb in batches[3 * e:3 * e + 3] for x in mb.scores] for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1


def test_minibatch_rows_stay_aligned_across_fields():
    buffer = RolloutBuffer(pad_token_id=0)
    buffer.add(_rollout(b=6))
    for mb in buffer.minibatches(2, epochs=1, generator=torch.Generator().manual_seed(1)):
        for i in range(len(mb)):
            k = int(mb.scores[i])
            assert mb.prompts[i] == f"p{k}" and mb.completions[i] == f"c{k}"
            assert mb.input_ids[i, 0].item() == k * 5


def test_concat_right_pads_shorter_rollouts():
    buffer = RolloutBuffer(pad_token_id=99)
    buffer.add(_rollout(b=2, t=5))
    buffer.add(_rollout(b=3, t=7, offset=1000))
    data = buffer.data
    assert data.input_ids.shape == (5, 7)
    assert (data.input_ids[:2, 5:] == 99).all()
    assert (data.response_mask[:2, 5:] == 0).all()
    assert len(buffer) == 5 and data.prompts == ["p0", "p1", "p0", "p1", "p2"]


def test_advantage_estimators_fill_advantages_and_returns():
    buffer = RolloutBuffer(pad_token_id=0)
    r = _rollout(b=4)
    r.rewards[:, -1] = torch.tensor([1.0, 0.0, 3.0, 1.0])  # score on the last token
    buffer.add(r)
    data = buffer.compute_advantages("batch_mean", whiten=False)
    # Sequence return R = [1, 0, 3, 1], mean 1.25 → advantages R − 1.25 on every response token.
    expected = torch.tensor([-0.25, -1.25, 1.75, -0.25])
    torch.testing.assert_close(data.advantages[:, 2], expected)
    assert (data.advantages[:, :2] == 0).all()
    data = buffer.compute_advantages("gae", gamma=1.0, lam=1.0, whiten=False)
    # Zero values, γ = λ = 1: every response token's advantage is the sequence return.
    torch.testing.assert_close(data.advantages[:, 2], torch.tensor([1.0, 0.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        buffer.compute_advantages("bogus")


def test_buffer_save_load_round_trip(tmp_path):
    buffer = RolloutBuffer(pad_token_id=0)
    buffer.add(_rollout(b=4))
    buffer.save(str(tmp_path / "buf.pt"))
    loaded = RolloutBuffer.load(str(tmp_path / "buf.pt"), pad_token_id=0)
    assert torch.equal(loaded.data.input_ids, buffer.data.input_ids)
    assert loaded.data.prompts == buffer.data.prompts


def test_rollout_rejects_misshaped_fields():
    with pytest.raises(ValueError, match="Rollout.logprobs"):
        Rollout(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3),
                response_mask=torch.ones(2, 3), logprobs=torch.zeros(2, 4), prompt_length=1)


def _scored(scores, group_ids):
    """A rollout whose per-token rewards carry `scores` on the last response token."""
    r = _rollout(b=len(scores))
    r.rewards[:, -1] = torch.tensor(scores)
    r.group_ids = torch.tensor(group_ids)
    return r


@pytest.mark.parametrize("estimator", ["leave_one_out", "group_norm"])
def test_group_baselines_read_the_rollouts_group_ids(estimator):
    # Three prompts, two samples each, stored contiguously; then the same rows shuffled.
    scores, ids = [1.0, 3.0, 0.0, 4.0, 5.0, 5.0], [0, 0, 1, 1, 2, 2]
    contiguous = RolloutBuffer(pad_token_id=0)
    contiguous.add(_scored(scores, ids))
    expected = contiguous.compute_advantages(estimator, whiten=False).advantages[:, -1]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = RolloutBuffer(pad_token_id=0)
    shuffled.add(_scored(scores, ids).index(perm))
    got = shuffled.compute_advantages(estimator, whiten=False).advantages[:, -1]
    torch.testing.assert_close(got, expected[perm])
    if estimator == "leave_one_out":
        # G = 2: each sample minus the other one: [1 - 3, 3 - 1, 0 - 4, 4 - 0, 0, 0]
        torch.testing.assert_close(expected, torch.tensor([-2.0, 2.0, -4.0, 4.0, 0.0, 0.0]))


def test_group_baselines_need_group_ids():
    buffer = RolloutBuffer(pad_token_id=0)
    r = _rollout(b=4)
    r.group_ids = None
    buffer.add(r)
    with pytest.raises(ValueError, match="needs rollout.group_ids"):
        buffer.compute_advantages("leave_one_out")
    buffer.compute_advantages("gae")  # the critic does not group


def test_concat_keeps_groups_of_different_rollouts_apart():
    # Both rollouts number their prompts from 0 (as Policy.generate does); concatenated, the
    # second one's groups are shifted past the first one's, so no two prompts share a group.
    buffer = RolloutBuffer(pad_token_id=0)
    buffer.add(_rollout(b=4))  # group_ids [0, 0, 1, 1]
    buffer.add(_rollout(b=2))  # group_ids [0, 0]
    assert buffer.data.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    single = RolloutBuffer(pad_token_id=0)
    single.add(_scored([1.0, 2.0], [4, 4]))
    assert single.data.group_ids.tolist() == [4, 4]  # one rollout keeps its own ids


def test_returns_to_go_subtract_the_sequence_baseline_from_each_tokens_return():
    # REINFORCE++: per-token rewards (KL per token, the score on the last), responses in columns 2..4.
    buffer = RolloutBuffer(pad_token_id=0)
    r = _rollout(b=4)
    r.rewards[:, 2:] = torch.tensor([[-0.1, -0.1, 1.0], [0.0, -0.2, 0.0], [-0.1, 0.0, 3.0], [0.0, 0.0, 1.0]])
    r.group_ids = torch.tensor([0, 0, 1, 1])
    buffer.add(r)
    data = buffer.compute_advantages("none", whiten=False, returns="to_go")
    # Returns to go of row 0: (−0.1 − 0.1 + 1, −0.1 + 1, 1) = (0.8, 0.9, 1.0); no baseline.
    torch.testing.assert_close(data.advantages[0, 2:], torch.tensor([0.8, 0.9, 1.0]))
    torch.testing.assert_close(data.returns[1, 2:], torch.tensor([-0.2, -0.2, 0.0]))
    assert (data.advantages[:, :2] == 0).all()
    data = buffer.compute_advantages("group_mean", whiten=False, returns="to_go")
    # REINFORCE++-baseline: group 0's sequence returns 0.8 and −0.2 have mean 0.3, subtracted from
    # every return to go of the group: row 0 (0.5, 0.6, 0.7), row 1 (−0.5, −0.5, −0.3).
    torch.testing.assert_close(data.advantages[0, 2:], torch.tensor([0.5, 0.6, 0.7]))
    torch.testing.assert_close(data.advantages[1, 2:], torch.tensor([-0.5, -0.5, -0.3]))
    # Sequence returns instead: every token of row 0 gets 0.8 − 0.3 = 0.5.
    data = buffer.compute_advantages("group_mean", whiten=False)
    torch.testing.assert_close(data.advantages[0, 2:], torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="'group_norm' also divides"):
        buffer.compute_advantages("group_norm", returns="to_go")
