"""TRPO's objective: the surrogate loss and the KL constraint (the step is tests/optim/test_trpo.py)."""

import math

import pytest
import torch
from torch.autograd.functional import hessian

from rlhf_lab.losses import mean_kl, surrogate_loss
from rlhf_lab.losses.ppo import ppo_policy_loss

F64 = torch.float64
S, A = 3, 4  # a tabular softmax policy: theta (S * A,) are the logits, reshaped (S, A)


# --- surrogate_loss ----------------------------------------------------------------------------


def test_surrogate_loss_by_hand():
    # old_logprobs = 0, so r = exp(logprobs) = [[1.5, 0.5], [1.1, 0.7]]; A = [[1, 1], [-1, -1]].
    # Last token masked out. L = -(1.5 + 0.5 - 1.1) / 3 = -0.9 / 3 = -0.3;
    # ratio = (1.5 + 0.5 + 1.1) / 3 = 3.1 / 3 = 1.033333
    ratios = torch.tensor([[1.5, 0.5], [1.1, 0.7]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = surrogate_loss(ratios.log(), torch.zeros(2, 2), adv, mask)
    assert loss.item() == pytest.approx(-0.3, abs=1e-6)
    assert set(metrics) == {"policy_loss", "ratio"}
    assert metrics["policy_loss"].item() == pytest.approx(-0.3, abs=1e-6)
    assert metrics["ratio"].item() == pytest.approx(1.033333, abs=1e-6)
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad
    # Same objective as unclipped PPO; per-sequence advantages (B,) broadcast over T.
    ppo_loss, _ = ppo_policy_loss(ratios.log(), torch.zeros(2, 2), adv, mask, clip_ratio=None)
    torch.testing.assert_close(loss, ppo_loss)
    loss_seq, _ = surrogate_loss(ratios.log(), torch.zeros(2, 2), adv[:, 0], mask)
    torch.testing.assert_close(loss_seq, loss)


def test_surrogate_gradient_at_old_policy_is_the_policy_gradient(trpo_problem):
    # At theta_old r = 1 and grad r = grad log pi, so grad L = -masked_mean(A grad log pi).
    p = trpo_problem()
    (grad,) = torch.autograd.grad(p.loss_fn(), p.theta)
    (pg,) = torch.autograd.grad(-(p.advantages * p.logp(p.theta) * p.mask).sum() / p.mask.sum(), p.theta)
    torch.testing.assert_close(grad, pg)


# --- mean_kl -----------------------------------------------------------------------------------


def test_mean_kl_by_hand_and_padding():
    # u = logp - old: token 0 u = 1: e - 1 - 1 = 0.718282; token 1 u = -1: e^-1 + 1 - 1 = 0.367879;
    # token 2 masked out (it holds -inf, which must not leak). mean = 1.086161 / 2 = 0.543081
    logp = torch.tensor([[-1.0, -2.0, -math.inf]])
    old = torch.tensor([[-2.0, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = mean_kl(logp, old, mask)
    assert kl.ndim == 0
    assert kl.item() == pytest.approx(0.543081, abs=1e-6)
    assert mean_kl(old, old, mask).item() == 0.0
    theta = logp.clone().requires_grad_(True)
    mean_kl(theta, old, mask).backward()
    assert torch.isfinite(theta.grad).all()


def test_mean_kl_is_unbiased_for_kl_old_to_new():
    # Weighting every action by its old probability (a float mask acts as weights) makes the
    # masked mean the exact expectation over a ~ pi_old: the result is KL(pi_old || pi).
    p_old = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    p_new = torch.tensor([[0.2, 0.3, 0.5]], dtype=F64)
    kl_old_new = (p_old * (p_old / p_new).log()).sum()
    # 0.5 ln 2.5 + 0 + 0.2 ln 0.4 = 0.458145 - 0.183258 = 0.274887
    assert kl_old_new.item() == pytest.approx(0.274887, abs=1e-6)
    est = mean_kl(p_new.log(), p_old.log(), p_old)
    assert est.item() == pytest.approx(kl_old_new.item(), abs=1e-12)


# --- the KL Hessian is the Fisher -------------------------------------------------------------


def test_kl_hessian_at_old_policy_is_the_fisher(trpo_problem):
    # On sampled tokens: the mean of score outer products grad l grad l^T (empirical Fisher).
    p = trpo_problem(seed=1)
    h = hessian(lambda th: mean_kl(p.logp(th), p.old, p.mask), p.theta0.clone())
    jac = torch.autograd.functional.jacobian(lambda th: p.logp(th), p.theta0.clone())
    scores = jac.reshape(-1, S * A)[p.mask.reshape(-1) != 0]
    torch.testing.assert_close(h, scores.T @ scores / scores.shape[0], atol=1e-10, rtol=0)
    # In expectation (every action weighted by pi_old through the float mask): the exact
    # Fisher of a softmax, block-diagonal with blocks diag(pi) - pi pi^T (one state each here).
    probs = trpo_problem.log_softmax(p.theta0).exp()
    states = torch.arange(S).repeat_interleave(A).view(S, A)
    actions = torch.arange(A).repeat(S).view(S, A)

    def exact_kl(th):
        return mean_kl(trpo_problem.log_softmax(th)[states, actions], probs.log(), probs)

    h_exact = hessian(exact_kl, p.theta0.clone())
    fisher = torch.block_diag(*[(torch.diag(q) - torch.outer(q, q)) / S for q in probs])
    torch.testing.assert_close(h_exact, fisher, atol=1e-10, rtol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="^old_logprobs"):
        mean_kl(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="^logprobs"):
        mean_kl(torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="^advantages"):
        surrogate_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


def test_the_update_rule_is_not_a_loss():
    # The trust-region step overwrites parameters, so it lives in rlhf_lab.optim, not here.
    import rlhf_lab.losses as losses

    for name in ("trpo_step", "conjugate_gradient", "fisher_vector_product"):
        assert not hasattr(losses, name)
