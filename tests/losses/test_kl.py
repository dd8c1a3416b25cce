import pytest
import torch

from rlhf_lab.losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
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
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


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
    for name in ("k1", "k2", "k3"):
        assert name in str(err.value)
    for fn in (kl_k1, kl_k2, kl_k3):
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
