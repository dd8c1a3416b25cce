import pytest
import torch

from rlhf_lab.losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_plus,
    kl_loss,
    kl_penalty,
    ppo_policy_loss,
)

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-2.0, -1.0, -0.5]])


def test_estimators_by_hand():
    # token 0: logp=-1, ref=-2 -> log-ratio 1:  k1 = 1, k2 = 1/2 * 1^2 = 0.5,
    #          k3 = e^{-1} - (-1) - 1 = 0.367879
    # token 1: logp=-2, ref=-1 -> log-ratio -1: k1 = -1, k2 = 0.5, k3 = e^{1} - 1 - 1 = 0.718282
    # token 2: equal log-probs -> all three are 0
    torch.testing.assert_close(kl_k1(LOGP, REF), torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(kl_k2(LOGP, REF), torch.tensor([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(kl_k3(LOGP, REF), torch.tensor([[0.367879, 0.718282, 0.0]]))


def test_kl_penalty_dispatches_and_estimators_differ():
    outs = {name: kl_penalty(LOGP, REF, estimator=name) for name in KL_ESTIMATORS}
    for name, fn in KL_ESTIMATORS.items():
        torch.testing.assert_close(outs[name], fn(LOGP, REF))
    torch.testing.assert_close(kl_penalty(LOGP, REF), outs["k1"])  # default is k1
    names = [name for name in outs if name != "k3+"]  # k3+ has k3's value and k2's gradient
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_k3_plus_has_the_value_of_k3_and_the_gradient_of_k2():
    # value: exactly k3 = [0.367879, 0.718282, 0] (test_estimators_by_hand)
    # gradient: d k2 / d logp = logp - ref = [1, -1, 0], where d k3 / d logp = 1 - e^d = [1 - e^-1,
    # 1 - e^1, 0] = [0.632121, -1.718282, 0]
    logp = LOGP.clone().requires_grad_(True)
    plus = kl_k3_plus(logp, REF)
    assert torch.equal(plus.detach(), kl_k3(LOGP, REF))
    (grad,) = torch.autograd.grad(plus.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([[1.0, -1.0, 0.0]]))
    (grad_k3,) = torch.autograd.grad(kl_k3(logp, REF).sum(), logp)
    torch.testing.assert_close(grad_k3, torch.tensor([[0.632121, -1.718282, 0.0]]))
    assert KL_ESTIMATORS["k3+"] is kl_k3_plus


def test_k1_and_k3_are_unbiased_under_exact_expectation():
    # For a categorical pi, E_pi[k] = sum_x pi(x) k(x). pi = [0.5, 0.3, 0.2], ref = [0.2, 0.3, 0.5]
    # KL = 0.5 ln 2.5 + 0 + 0.2 ln 0.4 = 0.458145 - 0.183258 = 0.274887
    pi = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    ref = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    for name in ("k1", "k3"):
        est = kl_penalty(pi.log(), ref.log(), estimator=name)
        assert (pi * est).sum().item() == pytest.approx(0.274887, abs=1e-6), name
    # k2 is biased: sum pi * 1/2 ln^2(pi/ref) != KL
    k2 = (pi * kl_k2(pi.log(), ref.log())).sum().item()
    assert k2 != pytest.approx(0.274887, abs=1e-3)


# --- The k3 gradient bias, on a categorical policy where expectations are exact sums -----------
# pi_theta = softmax(theta) over 4 outcomes, pi_ref fixed. A KL term in the loss is differentiated
# with the samples held fixed, so its expected gradient is sum_x pi(x) grad k(x) with pi(x) a
# constant weight. kl_loss computes exactly that when the 4 outcomes are 4 "tokens" of one row
# and the mask holds pi(x).detach(): a float mask weights the masked mean, and the weights sum
# to 1, so kl_loss = sum_x pi(x) k(x).

THETA = torch.tensor([0.3, -0.2, 0.5, -1.0], dtype=torch.float64)
REF_LOGP = torch.log_softmax(torch.tensor([-0.5, 0.4, 0.1, 0.2], dtype=torch.float64), dim=0)


def _policy():
    theta = THETA.clone().requires_grad_(True)
    return theta, torch.log_softmax(theta, dim=0)


def _grad_of(value, theta):
    return torch.autograd.grad(value, theta)[0]


def _exact_kl_gradients():
    """grad KL(pi || pi_ref) and grad KL(pi_ref || pi), both by autograd of the exact sums."""
    theta, logp = _policy()
    reverse = _grad_of((logp.exp() * (logp - REF_LOGP)).sum(), theta)
    theta, logp = _policy()
    forward = _grad_of((REF_LOGP.exp() * (REF_LOGP - logp)).sum(), theta)
    return reverse, forward


def _expected_loss_gradient(estimator, weights=None, old_logprobs=None):
    """sum_x w(x) grad k(x) through kl_loss; w = pi(x).detach() (on-policy) unless given."""
    theta, logp = _policy()
    w = logp.exp().detach() if weights is None else weights
    old = None if old_logprobs is None else old_logprobs[None]
    value, _ = kl_loss(logp[None], REF_LOGP[None], w[None], estimator, old_logprobs=old)
    return value, _grad_of(value, theta)


def test_k3_in_the_loss_follows_the_forward_kl_not_the_reverse():
    reverse_grad, forward_grad = _exact_kl_gradients()
    value, grad = _expected_loss_gradient("k3")
    # The value is unbiased: sum_x pi k3 = KL(pi || pi_ref) (test_k1_and_k3_are_unbiased...).
    with torch.no_grad():
        _, logp = _policy()
        kl = (logp.exp() * (logp - REF_LOGP)).sum()
    assert value.item() == pytest.approx(kl.item(), abs=1e-12)
    # The gradient is not: grad k3 = (1 - pi_ref/pi) grad log pi, so
    # sum_x pi grad k3 = sum_x grad pi - sum_x pi_ref grad log pi = 0 + grad KL(pi_ref || pi).
    torch.testing.assert_close(grad, forward_grad, atol=1e-12, rtol=0)
    assert (grad - reverse_grad).abs().max() > 1e-2


def test_the_fixes_give_the_exact_kl_gradient():
    reverse_grad, _ = _exact_kl_gradients()
    _, logp = _policy()
    on_policy_old = logp.detach()
    fixes = {
        # k2: sum_x pi (log pi - log pi_ref) grad log pi = grad KL(pi || pi_ref)
        "k2 in the loss": _expected_loss_gradient("k2")[1],
        # k3+: k3's value, k2's gradient
        "k3+ in the loss": _expected_loss_gradient("k3+")[1],
        # rho k3 with rho = pi / sg(pi): sum_x pi grad(rho k3) = grad sum_x pi k3 = grad KL
        "k3 * pi/pi_old in the loss": _expected_loss_gradient("k3", old_logprobs=on_policy_old)[1],
        # rho k1 likewise (k1's value is unbiased too)
        "k1 * pi/pi_old in the loss": _expected_loss_gradient("k1", old_logprobs=on_policy_old)[1],
    }
    # k1 in the reward: the REINFORCE gradient of the reward -k1 is
    # sum_x pi(x) (-(log pi(x) - log pi_ref(x))) grad log pi(x) = -grad KL (an ascent direction).
    theta, logp = _policy()
    reward = -(logp - REF_LOGP).detach()
    reinforce = _grad_of((logp.exp().detach() * reward * logp).sum(), theta)
    torch.testing.assert_close(reinforce, -reverse_grad, atol=1e-6, rtol=0)
    # ... and ppo_policy_loss (unclipped, r = 1) with the advantage -k1 descends along +grad KL.
    theta, logp = _policy()
    loss, _ = ppo_policy_loss(logp[None], logp.detach()[None], reward[None], logp.exp().detach()[None],
                              clip_ratio=None)
    fixes["k1 in the reward"] = _grad_of(loss, theta)
    for name, grad in fixes.items():
        torch.testing.assert_close(grad, reverse_grad, atol=1e-6, rtol=0, msg=name)
    # k1 in the loss has no gradient in expectation: sum_x pi grad log pi = grad sum_x pi = 0.
    torch.testing.assert_close(_expected_loss_gradient("k1")[1], torch.zeros(4, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_importance_weighted_k3_is_unbiased_off_policy():
    # Samples from pi_old != pi (a later PPO epoch): weights pi_old(x), rho = pi / pi_old.
    # sum_x pi_old grad(pi/pi_old k3) = grad sum_x pi k3 = grad KL(pi || pi_ref); k3 alone is not,
    # and neither is k3+ (which is exact only on-policy).
    reverse_grad, _ = _exact_kl_gradients()
    old_logp = torch.log_softmax(torch.tensor([0.1, 0.3, -0.4, 0.0], dtype=torch.float64), dim=0)
    pi_old = old_logp.exp()
    value, grad = _expected_loss_gradient("k3", weights=pi_old, old_logprobs=old_logp)
    torch.testing.assert_close(grad, reverse_grad, atol=1e-6, rtol=0)
    with torch.no_grad():
        _, logp = _policy()
        kl = (logp.exp() * (logp - REF_LOGP)).sum()
    assert value.item() == pytest.approx(kl.item(), abs=1e-12)  # sum_x pi_old rho k3 = E_pi[k3] = KL
    for estimator in ("k3", "k3+"):
        _, biased = _expected_loss_gradient(estimator, weights=pi_old)
        assert (biased - reverse_grad).abs().max() > 1e-2, estimator


def test_k3_is_nonnegative_and_precise_near_zero():
    logp = torch.tensor([-1.0, -1.0, -3.0])
    ref = logp + torch.tensor([1e-4, -1e-4, 5.0])
    out = kl_k3(logp, ref)
    assert (out >= 0).all()
    # d = 1e-4: e^d - d - 1 ~= d^2 / 2 = 5e-9 (cancels to 0 without expm1)
    assert out[0].item() == pytest.approx(5e-9, rel=1e-3)


def test_kl_bad_inputs():
    with pytest.raises(ValueError, match="estimator") as err:
        kl_penalty(LOGP, REF, estimator="k4")
    for name in ("k1", "k2", "k3", "k3+"):
        assert name in str(err.value)
    for fn in (kl_k1, kl_k2, kl_k3, kl_k3_plus):
        with pytest.raises(ValueError, match="ref_logprobs"):
            fn(LOGP, REF[:, :2])


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    ctl.update(torch.tensor(0.0), n_steps=1000)
    assert ctl.value == 0.05


def test_adaptive_controller_by_hand():
    # init 0.1, target 6, horizon 10000, n_steps 256.
    # KL 6.6: error = 6.6/6 - 1 = 0.1; factor = 1 + 0.1 * 256 / 10000 = 1.00256 -> 0.100256
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.100256)
    # A tensor KL works too: KL 6 (on target) -> error 0, unchanged.
    ctl.update(torch.tensor(6.0), n_steps=256)
    assert ctl.value == pytest.approx(0.100256)


def test_adaptive_controller_clips_error_at_plus_minus_point_two():
    # KL 12: error 12/6 - 1 = 1 -> clipped to 0.2; factor 1 + 0.2 * 256/10000 = 1.00512
    # KL 7.2: error exactly 0.2 -> same factor, so anything above 7.2 moves no faster
    # KL 0: error -1 -> clipped to -0.2; factor 1 - 0.00512 = 0.99488
    values = {}
    for kl in (12.0, 7.2, 0.0):
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        ctl.update(kl, n_steps=256)
        values[kl] = ctl.value
    assert values[12.0] == pytest.approx(0.100512)
    assert values[7.2] == pytest.approx(0.100512)
    assert values[0.0] == pytest.approx(0.099488)
    # The adaptive controller differs from the fixed one under the same KL.
    fixed = FixedKLController(0.1)
    fixed.update(12.0, n_steps=256)
    assert fixed.value != values[12.0]


def test_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)
    other = AdaptiveKLController(1.0, target=1.0, horizon=1)
    other.load_state_dict(ctl.state_dict())
    assert (other.value, other.target, other.horizon) == (ctl.value, 6.0, 10000.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"init_kl_coef": -0.1, "target": 6.0, "horizon": 100}, "init_kl_coef"),
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 100}, "target"),
        ({"init_kl_coef": 0.1, "target": 6.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_controller_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveKLController(**kwargs)


def test_fixed_controller_validation():
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
