"""The trust-region update rule of TRPO: conjugate gradient, Fisher-vector products, the step."""


import pytest
import torch
from torch.autograd.functional import hessian

from rlhf_lab.losses import mean_kl
from rlhf_lab.optim import (
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    get_flat_params,
    set_flat_params,
    trpo_step,
)

F64 = torch.float64
S, A = 3, 4  # a tabular softmax policy: theta (S * A,) are the logits, reshaped (S, A)


# --- conjugate_gradient ------------------------------------------------------------------------


def test_conjugate_gradient_2x2_by_hand():
    # A = [[4, 1], [1, 3]], b = [1, 2]. det A = 12 - 1 = 11, A^-1 = 1/11 [[3, -1], [-1, 4]],
    # x = 1/11 [3 - 2, -1 + 8] = [1/11, 7/11].
    # CG: r0 = p0 = [1, 2], A p0 = [6, 7], alpha0 = r0.r0 / p0.A p0 = 5 / 20 = 1/4,
    #   x1 = [1/4, 1/2], r1 = [1, 2] - 1/4 [6, 7] = [-1/2, 1/4], beta0 = (5/16) / 5 = 1/16,
    #   p1 = [-1/2, 1/4] + 1/16 [1, 2] = [-7/16, 3/8], A p1 = [-11/8, 11/16],
    #   alpha1 = (5/16) / (7/16 * 11/8 + 3/8 * 11/16) = (5/16) / (55/64) = 4/11,
    #   x2 = [1/4 - 7/44, 1/2 + 6/44] = [1/11, 7/11]  (exact after n = 2 iterations).
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=F64)
    b = torch.tensor([1.0, 2.0], dtype=F64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=10)
    torch.testing.assert_close(x, torch.tensor([1 / 11, 7 / 11], dtype=F64))
    x1 = conjugate_gradient(lambda v: a @ v, b, iters=1)
    torch.testing.assert_close(x1, torch.tensor([0.25, 0.5], dtype=F64))
    # damping d = 1 solves (A + I) x = b: [[5, 1], [1, 4]], det 19, x = 1/19 [4 - 2, -1 + 10]
    xd = conjugate_gradient(lambda v: a @ v, b, iters=10, damping=1.0)
    torch.testing.assert_close(xd, torch.tensor([2 / 19, 9 / 19], dtype=F64))


def test_conjugate_gradient_random_spd():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(20, 20, generator=gen, dtype=F64)
    a = m @ m.T + 0.5 * torch.eye(20, dtype=F64)
    b = torch.randn(20, generator=gen, dtype=F64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=60)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-5, rtol=0)
    d = 0.3
    xd = conjugate_gradient(lambda v: a @ v, b, iters=60, damping=d)
    torch.testing.assert_close(xd, torch.linalg.solve(a + d * torch.eye(20, dtype=F64), b))
    assert not torch.allclose(xd, x, atol=1e-5)
    # b = 0: x = 0 without a single product.
    calls = []
    zero = conjugate_gradient(lambda v: calls.append(v) or a @ v, torch.zeros(20, dtype=F64))
    assert calls == [] and torch.equal(zero, torch.zeros(20, dtype=F64))


def test_conjugate_gradient_few_iterations_on_ill_conditioned_system():
    # cond(A) = 1e4: one iteration is a steepest-descent step, far from A^-1 b.
    a = torch.diag(torch.logspace(0, 4, 8, dtype=F64))
    b = torch.ones(8, dtype=F64)
    exact = torch.linalg.solve(a, b)
    err1 = (conjugate_gradient(lambda v: a @ v, b, iters=1) - exact).norm()
    err8 = (conjugate_gradient(lambda v: a @ v, b, iters=8) - exact).norm()
    assert err8 < 1e-4 < 0.1 < err1


# --- flat helpers ------------------------------------------------------------------------------


def test_flat_params_roundtrip_and_flat_grad_with_unused_param():
    w = torch.arange(6.0).view(2, 3).requires_grad_(True)
    b = torch.tensor([10.0, 20.0], requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    params = [w, b, unused]
    flat = get_flat_params(params)
    torch.testing.assert_close(flat, torch.tensor([0, 1, 2, 3, 4, 5, 10, 20, 0, 0, 0.0]))
    assert not flat.requires_grad
    set_flat_params(iter(params), flat * 2)  # any iterable, e.g. model.parameters()
    torch.testing.assert_close(b.detach(), torch.tensor([20.0, 40.0]))
    torch.testing.assert_close(w.detach(), torch.arange(6.0).view(2, 3) * 2)
    assert w.requires_grad and w.is_leaf
    # d/dw sum(w^2) = 2 w, d/db sum(b) = 1, unused -> 0
    grad = flat_grad((w**2).sum() + b.sum(), params)
    torch.testing.assert_close(
        grad, torch.cat([4 * torch.arange(6.0), torch.ones(2), torch.zeros(3)])
    )
    with pytest.raises(ValueError, match="flat"):
        set_flat_params(params, torch.zeros(10))


# --- fisher_vector_product ---------------------------------------------------------------------


@pytest.mark.parametrize("moved", [False, True])
def test_fisher_vector_product_equals_explicit_hessian(moved, trpo_problem):
    p = trpo_problem(seed=1)
    if moved:  # the Pearlmutter product is the exact KL Hessian anywhere, not only at theta_old
        with torch.no_grad():
            p.theta.add_(0.3 * torch.randn(S * A, generator=torch.Generator().manual_seed(2)))
    h = hessian(lambda th: mean_kl(p.logp(th), p.old, p.mask), p.theta.detach().clone())
    v = torch.randn(S * A, generator=torch.Generator().manual_seed(3), dtype=F64)
    fvp = fisher_vector_product(p.kl_fn, [p.theta], damping=0.0)
    torch.testing.assert_close(fvp(v), h @ v, atol=1e-5, rtol=0)
    fvp_damped = fisher_vector_product(p.kl_fn, [p.theta], damping=0.25)
    torch.testing.assert_close(fvp_damped(v), h @ v + 0.25 * v, atol=1e-5, rtol=0)


# --- trpo_step ---------------------------------------------------------------------------------


def test_trpo_step_respects_the_trust_region_and_improves(trpo_problem):
    kls = []
    for max_kl in (1e-3, 1e-2, 5e-2):
        p = trpo_problem()
        loss_before = p.loss_fn().item()
        m = p.step(max_kl=max_kl)
        assert set(m) == {
            "kl",
            "improvement",
            "expected_improvement",
            "step_fraction",
            "accepted",
            "cg_residual",
        }
        assert all(isinstance(value, float) for value in m.values())
        assert m["accepted"] == 1.0
        assert 0.0 < m["kl"] <= max_kl
        assert m["kl"] == pytest.approx(p.kl_fn().item())
        loss_after = p.loss_fn().item()
        assert loss_after < loss_before
        assert m["improvement"] == pytest.approx(loss_before - loss_after)
        assert m["improvement"] / m["expected_improvement"] >= 0.1
        kls.append(m["kl"])
    assert kls[0] < kls[1] < kls[2]


def test_trpo_step_full_step_matches_the_quadratic_kl_model(trpo_problem):
    # The full step is scaled so 1/2 s^T (F + d I) s = max_kl. For a small max_kl the quadratic
    # model of the KL is accurate, so the achieved KL is 1/2 s^T F s = max_kl - 1/2 d |s|^2.
    p = trpo_problem()
    max_kl, damping = 1e-4, 0.1
    m = p.step(max_kl=max_kl, damping=damping)
    assert m["step_fraction"] == 1.0
    step_sq = ((p.theta.detach() - p.theta0) ** 2).sum().item()
    assert m["kl"] == pytest.approx(max_kl - 0.5 * damping * step_sq, rel=0.02)


def test_trpo_step_restores_params_when_the_loss_never_decreases(trpo_problem):
    p = trpo_problem()
    calls = [0]

    def increasing_loss():
        calls[0] += 1  # every evaluation is worse than the one before: no step can improve
        return p.loss_fn() + 10.0 * calls[0]

    m = trpo_step([p.theta], increasing_loss, p.kl_fn, max_kl=1e-2)
    assert calls[0] == 1 + 11  # the gradient, then the full step and 10 backtracks
    assert m["accepted"] == 0.0 and m["step_fraction"] == 0.0
    assert m["kl"] == 0.0 and m["improvement"] == 0.0
    assert m["expected_improvement"] > 0.0
    assert torch.equal(p.theta.detach(), p.theta0)


def test_trpo_step_restores_params_when_the_kl_bound_always_fails(trpo_problem):
    # The constant offset leaves the Fisher-vector products unchanged but puts every trial
    # above max_kl: the KL check alone rejects.
    p = trpo_problem()
    m = trpo_step([p.theta], p.loss_fn, lambda: p.kl_fn() + 1.0, max_kl=1e-2)
    assert m["accepted"] == 0.0
    assert torch.equal(p.theta.detach(), p.theta0)


def test_trpo_step_without_backtracks_rejects_a_bad_full_step(trpo_problem):
    # On this ill-conditioned problem (no damping) the full step fails the checks and only the
    # first backtrack (half step) passes.
    m = trpo_problem(scale=3.0).step(damping=0.0)
    assert m["accepted"] == 1.0 and m["step_fraction"] == 0.5
    p = trpo_problem(scale=3.0)
    m0 = p.step(damping=0.0, max_backtracks=0)
    assert m0["accepted"] == 0.0
    assert torch.equal(p.theta.detach(), p.theta0)


def test_trpo_step_zero_gradient_is_a_no_op(trpo_problem):
    p = trpo_problem()
    m = trpo_step([p.theta], lambda: (p.theta * 0.0).sum(), p.kl_fn)
    assert m["accepted"] == 0.0 and m["expected_improvement"] == 0.0
    assert torch.equal(p.theta.detach(), p.theta0)


def _final_theta(problem, **kw) -> tuple[torch.Tensor, dict[str, float]]:
    p = problem(scale=kw.pop("scale", 2.0))
    m = p.step(**kw)
    assert m["accepted"] == 1.0
    return p.theta.detach().clone(), m


def test_each_option_changes_the_step(trpo_problem):
    # max_kl: a larger region, a larger KL (also covered above).
    t_small, m_small = _final_theta(trpo_problem, max_kl=1e-3)
    t_big, m_big = _final_theta(trpo_problem, max_kl=5e-2)
    assert m_small["kl"] < m_big["kl"] and not torch.allclose(t_small, t_big)
    # damping: a different linear system, so a different direction and length.
    t_d0, m_d0 = _final_theta(trpo_problem, damping=0.0, scale=3.0)
    t_d1, m_d1 = _final_theta(trpo_problem, damping=1.0, scale=3.0)
    assert not torch.allclose(t_d0, t_d1) and m_d0["kl"] != pytest.approx(m_d1["kl"])
    # cg_iters on the ill-conditioned problem: 1 iteration leaves a large residual (the
    # direction is the plain gradient), 10 iterations solve the system.
    t_cg1, m_cg1 = _final_theta(trpo_problem, cg_iters=1, damping=0.0, scale=3.0)
    assert m_cg1["cg_residual"] > 1e3 * m_d0["cg_residual"]
    assert not torch.allclose(t_cg1, t_d0)
    # backtrack_coef: where the full step is rejected, the accepted fraction is c^k.
    _, m_c5 = _final_theta(trpo_problem, damping=0.0, scale=3.0, backtrack_coef=0.5)
    t_c8, m_c8 = _final_theta(trpo_problem, damping=0.0, scale=3.0, backtrack_coef=0.8)
    assert m_c5["step_fraction"] == 0.5
    assert m_c8["step_fraction"] == pytest.approx(0.8**3)
    assert not torch.allclose(t_c8, t_d0)
    # accept_ratio: demanding more than the linear model promises rejects the step.
    _, m_lax = _final_theta(trpo_problem, accept_ratio=0.0)
    p = trpo_problem()
    m_strict = p.step(accept_ratio=1e3)
    assert m_lax["accepted"] == 1.0 and m_strict["accepted"] == 0.0
    assert torch.equal(p.theta.detach(), p.theta0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_kl": 0.0}, "max_kl"),
        ({"max_kl": -1e-2}, "max_kl"),
        ({"cg_iters": 0}, "cg_iters"),
        ({"damping": -0.1}, "damping"),
        ({"backtrack_coef": 0.0}, "backtrack_coef"),
        ({"backtrack_coef": 1.0}, "backtrack_coef"),
        ({"backtrack_coef": 1.5}, "backtrack_coef"),
        ({"max_backtracks": -1}, "max_backtracks"),
        ({"accept_ratio": -0.5}, "accept_ratio"),
    ],
)
def test_trpo_step_bad_options_raise(kwargs, name, trpo_problem):
    p = trpo_problem()
    with pytest.raises(ValueError, match=f"^{name}"):
        p.step(**kwargs)
    assert torch.equal(p.theta.detach(), p.theta0)


def test_bad_inputs_raise(trpo_problem):
    a = torch.eye(2)
    with pytest.raises(ValueError, match="^iters"):
        conjugate_gradient(lambda v: a @ v, torch.ones(2), iters=0)
    with pytest.raises(ValueError, match="^damping"):
        conjugate_gradient(lambda v: a @ v, torch.ones(2), damping=-1.0)
    with pytest.raises(ValueError, match="^b"):
        conjugate_gradient(lambda v: a @ v, torch.ones(2, 1))
    with pytest.raises(ValueError, match="^fvp"):
        conjugate_gradient(lambda v: torch.ones(3), torch.ones(2))
    p = trpo_problem()
    with pytest.raises(ValueError, match="^damping"):
        fisher_vector_product(p.kl_fn, [p.theta], damping=-1.0)
    with pytest.raises(ValueError, match="^params"):
        trpo_step([p.theta.detach()], p.loss_fn, p.kl_fn)
    with pytest.raises(ValueError, match="^params"):
        trpo_step([], p.loss_fn, p.kl_fn)
