import math

import pytest
import torch

from rlhf_lab.losses import kl_loss, kl_penalty, online_objective, overlong_penalty, shape_rewards

# ------------------------------------------------------------------------------- shape_rewards

# Two rows, T = 4. Row 0: prompt at column 0, response at columns 1-3 (ended with EOS).
# Row 1: prompt at columns 0-1, response at column 2, then padding (hit the length limit).
MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
LOGP = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, 0.0, -1.0, -math.inf]])
REF = torch.tensor([[0.0, -1.5, -1.0, -0.5], [0.0, 0.0, -2.0, -3.0]])
SCORES = torch.tensor([2.0, 1.0])
EOS = torch.tensor([True, False])


def test_shape_rewards_by_hand():
    # k1 = logp - ref on the response tokens: row 0 [0.5, -1.0, 0.0], row 1 [1.0].
    # beta = 0.1: -beta * k1 = row 0 [-0.05, 0.1, 0.0], row 1 [-0.1].
    # The score goes on the last response token: row 0 column 3 (0 + 2), row 1 column 2 (-0.1 + 1).
    rewards = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1)
    expected = torch.tensor([[0.0, -0.05, 0.1, 2.0], [0.0, 0.0, 0.9, 0.0]])
    torch.testing.assert_close(rewards, expected)
    assert rewards.dtype == torch.float32
    # The -inf log-prob in row 1's padding does not leak.
    assert torch.isfinite(rewards).all()


def test_shape_rewards_missing_eos_penalty_and_kl_in_loss():
    # kl_in_reward False: only the scores, on the last token. Row 1 did not end with EOS, so a
    # penalty of 0.5 makes its score 1 - 0.5 = 0.5; row 0 keeps 2.
    rewards = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_in_reward=False, ended_with_eos=EOS,
                            missing_eos_penalty=0.5)
    expected = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.5, 0.0]])
    torch.testing.assert_close(rewards, expected)
    # Without the penalty, ended_with_eos is not needed.
    plain = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_in_reward=False)
    torch.testing.assert_close(plain, torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 0.0]]))


def test_shape_rewards_each_option_changes_the_result():
    base = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1)
    # k2 = 1/2 k1^2: row 0 [0.125, 0.5, 0], row 1 [0.5] -> -0.1 * k2 = [-0.0125, -0.05, 0], [-0.05]
    k2 = shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_estimator="k2")
    torch.testing.assert_close(k2, torch.tensor([[0.0, -0.0125, -0.05, 2.0], [0.0, 0.0, 0.95, 0.0]]))
    variants = [
        k2,
        shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.2),
        shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_in_reward=False),
        shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, ended_with_eos=EOS, missing_eos_penalty=1.0),
    ]
    for other in variants:
        assert not torch.allclose(other, base)
    # kl_coef = 0 is the same as leaving the KL out of the reward.
    torch.testing.assert_close(shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.0), variants[2])


def test_shape_rewards_bad_inputs():
    with pytest.raises(ValueError, match="^scores"):
        shape_rewards(SCORES[:1], LOGP, REF, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="^ref_logprobs"):
        shape_rewards(SCORES, LOGP, REF[:, :3], MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="ended_with_eos"):
        shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="at least one response token"):
        shape_rewards(SCORES, LOGP, REF, torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=-0.1)
    with pytest.raises(ValueError, match="estimator"):
        shape_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_estimator="k4")


# ------------------------------------------------------------------------------------- kl_loss


def test_kl_loss_by_hand_and_gradient():
    # k3 with d = ref - logp: row 0 d = [-0.5, 1.0, 0.0] -> e^d - d - 1 = [0.106531, 0.718282, 0]
    # row 1 d = [-1.0] -> e^-1 + 1 - 1 = 0.367879. Token mean over 4 tokens:
    # (0.106531 + 0.718282 + 0 + 0.367879) / 4 = 1.192692 / 4 = 0.298173
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = kl_loss(logp, REF, MASK, "k3")
    assert loss.item() == pytest.approx(0.298173, abs=1e-6)
    assert set(metrics) == {"kl_loss"} and not metrics["kl_loss"].requires_grad
    loss.backward()
    # d k3 / d logp = 1 - e^d, over 4 tokens: row 0 col 1 (1 - e^-0.5) / 4 = 0.098367
    assert logp.grad[0, 1].item() == pytest.approx(0.098367, abs=1e-6)
    assert torch.isfinite(logp.grad).all() and logp.grad[1, 3] == 0
    # k1: (0.5 - 1.0 + 0.0 + 1.0) / 4 = 0.125; the estimator matters.
    assert kl_loss(LOGP, REF, MASK, "k1")[0].item() == pytest.approx(0.125)


def test_kl_loss_is_the_masked_mean_of_kl_penalty():
    finite = torch.where(MASK != 0, LOGP, 0.0)
    expected = (kl_penalty(finite, REF, "k2") * MASK).sum() / MASK.sum()
    torch.testing.assert_close(kl_loss(finite, REF, MASK, "k2")[0], expected)


def test_kl_loss_importance_weighted_by_hand_and_gradient():
    # logp = [-1, -2], old = [-1.5, -2], ref = [-2, -1]; k1 = logp - ref = [1, -1]
    # rho = exp(logp - old) = [e^0.5, 1] = [1.648721, 1]; rho k1 = [1.648721, -1]
    # token mean = 0.648721 / 2 = 0.324361 (without old_logprobs: (1 - 1) / 2 = 0)
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -math.inf]])  # padding may hold -inf
    ref = torch.tensor([[-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = kl_loss(logp, ref, mask, "k1", old_logprobs=old)
    assert loss.item() == pytest.approx(0.324361, abs=1e-6)
    assert set(metrics) == {"kl_loss"} and not metrics["kl_loss"].requires_grad
    assert kl_loss(logp, ref, mask, "k1")[0].item() == pytest.approx(0.0)
    # d(rho k1)/d logp = rho k1 + rho * 1 = rho (k1 + 1): [1.648721 * 2, 1 * 0] = [3.297443, 0]; / 2 tokens
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[1.648721, 0.0, 0.0]]))
    # On-policy (old = logp) the value is the plain estimator's (rho = 1), the gradient is not:
    # k3 with d = ref - logp = [-1, 1]: k3 = [e^-1 + 1 - 1, e - 1 - 1] = [0.367879, 0.718282]
    # d(rho k3)/d logp = k3 + (1 - e^d) = [0.367879 + 0.632121, 0.718282 - 1.718282] = [1, -1]; / 2
    on = logp.detach()
    value, _ = kl_loss(logp, ref, mask, "k3", old_logprobs=on)
    assert value.item() == pytest.approx(kl_loss(logp, ref, mask, "k3")[0].item())
    assert value.item() == pytest.approx((0.367879 + 0.718282) / 2, abs=1e-6)
    (grad,) = torch.autograd.grad(value, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.5, -0.5, 0.0]]))
    # (plain k3: (1 - e^d) / 2 = [0.316060, -0.859141])
    (plain,) = torch.autograd.grad(kl_loss(logp, ref, mask, "k3")[0], logp)
    torch.testing.assert_close(plain, torch.tensor([[0.316060, -0.859141, 0.0]]))
    # tokens= still splits the batch: the parts add up.
    parts = [kl_loss(logp[:, :1], ref[:, :1], mask[:, :1], "k1", tokens=2.0, old_logprobs=old[:, :1])[0],
             kl_loss(logp[:, 1:], ref[:, 1:], mask[:, 1:], "k1", tokens=2.0, old_logprobs=old[:, 1:])[0]]
    assert sum(x.item() for x in parts) == pytest.approx(0.324361, abs=1e-6)
    with pytest.raises(ValueError, match="^old_logprobs"):
        kl_loss(logp, ref, mask, "k1", old_logprobs=old[:, :2])


# ---------------------------------------------------------------------------- overlong_penalty


def test_overlong_penalty_by_hand():
    # L = 20, buffer 4: no penalty up to 16, then -(|y| - 16) / 4, and -1 beyond 20
    # lengths 10 -> 0; 16 -> 0; 17 -> -0.25; 18 -> -0.5; 20 -> -1; 25 -> -1
    lengths = torch.tensor([10, 16, 17, 18, 20, 25])
    out = overlong_penalty(lengths, max_length=20, buffer=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert not torch.signbit(out[:2]).any()  # +0, not -0
    # penalty 0.5 halves it; float lengths work as well
    torch.testing.assert_close(overlong_penalty(lengths.double(), 20, 4, penalty=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5], dtype=torch.float64))
    # buffer = max_length: the ramp starts at 0 (|y| = 5 of 20 -> -0.25)
    torch.testing.assert_close(overlong_penalty(torch.tensor([5.0]), 20, 20), torch.tensor([-0.25]))
    # A longer buffer changes the result: buffer 8 -> ramp from 12: 17 -> -5/8 = -0.625
    assert overlong_penalty(torch.tensor([17]), 20, 8).item() == pytest.approx(-0.625)


def test_overlong_penalty_bad_inputs():
    lengths = torch.tensor([10, 20])
    with pytest.raises(ValueError, match="^lengths"):
        overlong_penalty(lengths[None], 20, 4)
    with pytest.raises(ValueError, match="^buffer must be > 0"):
        overlong_penalty(lengths, 20, 0)
    with pytest.raises(ValueError, match="^buffer must be <= max_length"):
        overlong_penalty(lengths, 20, 21)
    with pytest.raises(ValueError, match="^max_length"):
        overlong_penalty(lengths, 0, 4)
    with pytest.raises(ValueError, match="^penalty"):
        overlong_penalty(lengths, 20, 4, penalty=-1.0)


# ---------------------------------------------------------------------------- online_objective


def test_online_objective_by_hand():
    # L = 1.0 - 0.01 * 2.0 + 0.5 * 0.4 + 0.05 * 0.2 = 1.0 - 0.02 + 0.2 + 0.01 = 1.19
    p, h, v, kl = (torch.tensor(x) for x in (1.0, 2.0, 0.4, 0.2))
    loss, metrics = online_objective(p, h, v, kl, entropy_coef=0.01, vf_coef=0.5, kl_coef=0.05)
    assert loss.item() == pytest.approx(1.19)
    assert set(metrics) == {"loss", "policy_loss", "entropy", "value_loss", "kl_loss"}
    assert metrics["loss"].item() == pytest.approx(1.19) and metrics["entropy"].item() == 2.0
    # Only the policy loss: L = 1.0, and the metrics name only the terms given.
    alone, m = online_objective(p)
    assert alone.item() == 1.0 and set(m) == {"loss", "policy_loss"}
    # With the entropy but a zero coefficient, the entropy is reported and changes nothing.
    same, m = online_objective(p, h)
    assert same.item() == 1.0 and m["entropy"].item() == 2.0


def test_online_objective_each_coefficient_changes_the_loss_and_the_gradient():
    base = dict(entropy_coef=0.01, vf_coef=0.5, kl_coef=0.05)
    grads = {}
    for key, value in [("base", None), ("entropy_coef", 0.1), ("vf_coef", 1.0), ("kl_coef", 0.5)]:
        terms = [torch.tensor(x, requires_grad=True) for x in (1.0, 2.0, 0.4, 0.2)]
        coefs = base if value is None else {**base, key: value}
        loss, _ = online_objective(*terms, **coefs)
        loss.backward()
        grads[key] = torch.stack([t.grad for t in terms])
    # dL/d(terms) = [1, -c_H, c_V, beta]
    torch.testing.assert_close(grads["base"], torch.tensor([1.0, -0.01, 0.5, 0.05]))
    for key in ("entropy_coef", "vf_coef", "kl_coef"):
        assert not torch.allclose(grads[key], grads["base"]), key


def test_online_objective_refuses_a_coefficient_without_its_term():
    p = torch.tensor(1.0)
    for coef, name in [("entropy_coef", "entropy"), ("vf_coef", "value_loss"), ("kl_coef", "kl_loss")]:
        with pytest.raises(ValueError, match=f"^{coef} = 0.1 has no {name} term"):
            online_objective(p, **{coef: 0.1})
    with pytest.raises(ValueError, match="^value_loss must be a scalar"):
        online_objective(p, value_loss=torch.zeros(2), vf_coef=0.5)
    with pytest.raises(ValueError, match="^entropy_coef"):
        online_objective(p, torch.tensor(1.0), entropy_coef=-1.0)


def test_kl_loss_parts_with_the_batch_token_count_add_up():
    # k1 = logp - ref per token; row 0 has 2 tokens (0.5, 1.5), row 1 one token (-1.0):
    # token mean = (0.5 + 1.5 - 1.0) / 3 = 1/3; with tokens=3, row 0 gives 2/3 and row 1 gives -1/3.
    logp = torch.tensor([[0.5, 1.5], [-1.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    ref = torch.zeros(2, 2)
    assert kl_loss(logp, ref, mask, "k1")[0].item() == pytest.approx(1 / 3)
    parts = [kl_loss(logp[r], ref[r], mask[r], "k1", tokens=3.0)[0].item() for r in ([0], [1])]
    assert parts == pytest.approx([2 / 3, -1 / 3])
