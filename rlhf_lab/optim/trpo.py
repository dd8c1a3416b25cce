"""Trust Region Policy Optimization: a natural-gradient update with a KL trust region.

TRPO uses the same rollouts as PPO (tokens sampled from pi_old, their log-probs and advantages)
but replaces the clipped surrogate and SGD with one constrained step per batch:

    minimise L(theta)  subject to  KL(pi_old || pi_theta) <= delta

solved approximately by (1) a conjugate-gradient solve of F x = -g for the natural-gradient
direction, with F the Fisher matrix (the Hessian of the KL at theta_old) only ever touched
through Fisher-vector products, (2) scaling x so the quadratic model of the KL equals delta,
and (3) a backtracking line search that enforces the exact KL bound and a real decrease of L.

This is an update rule, not a loss: `trpo_step` overwrites the parameters it is given, which is
why it lives in `rlhf_lab.optim` and the objective it optimises (`surrogate_loss`, `mean_kl`)
stays in `rlhf_lab.losses.trpo`. Everything here is model-agnostic: the parameters are a list
of tensors handled as one flat vector, and the model enters only through closures ``loss_fn()``
and ``kl_fn()`` that recompute the surrogate and the KL from the current parameter values.
Reference: Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv:1502.05477).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from rlhf_lab.checks import check_ndim, check_positive, check_tensor

__all__ = [
    "conjugate_gradient",
    "flat_grad",
    "get_flat_params",
    "set_flat_params",
    "fisher_vector_product",
    "trpo_step",
]


def _check_open_unit_interval(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    # bool is an int subclass; True as an iteration count is almost surely a slip.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _as_param_list(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    # A generator (e.g. model.parameters()) can be read once only; every helper here walks the
    # parameters several times, always in the same order.
    params = list(params)
    if not params:
        raise ValueError("params must contain at least one tensor, got none")
    for i, p in enumerate(params):
        check_tensor(f"params[{i}]", p)
    return params


def conjugate_gradient(
    fvp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int = 10,
    residual_tol: float = 1e-10,
    damping: float = 0.0,
) -> torch.Tensor:
    """Solve (F + damping I) x = b by conjugate gradient, with F known only through fvp(v) = F v.

    Formula: x_0 = 0, r_0 = p_0 = b; for k = 0 .. iters-1:
        alpha_k = r_k^T r_k / p_k^T A p_k              (A = F + damping I)
        x_{k+1} = x_k + alpha_k p_k,  r_{k+1} = r_k - alpha_k A p_k
        stop if r_{k+1}^T r_{k+1} < residual_tol
        p_{k+1} = r_{k+1} + (r_{k+1}^T r_{k+1} / r_k^T r_k) p_k
    Exact after n iterations for a symmetric positive definite n x n A (in exact arithmetic);
    fewer iterations give the minimiser of the quadratic 1/2 x^T A x - b^T x over the Krylov
    space span{b, A b, ..., A^{k-1} b}, which is what TRPO uses (10 iterations). If A is not
    positive definite along a search direction (p^T A p <= 0) the iteration stops and returns
    the current x rather than divide by a non-positive curvature.
    Reference: Hestenes & Stiefel 1952, "Methods of Conjugate Gradients for Solving Linear
    Systems" (J. Res. Nat. Bur. Standards 49); Schulman et al. 2015, "Trust Region Policy
    Optimization" (arXiv:1502.05477), Appendix C.

    Shape: b (N,); fvp maps (N,) -> (N,). Returns x (N,), detached, dtype of b.
    """
    check_ndim("b", b, 1, "(N,)")
    _check_count("iters", iters, 1)
    check_positive("residual_tol", residual_tol, allow_zero=True)
    check_positive("damping", damping, allow_zero=True)

    b = b.detach()
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = torch.dot(r, r)
    for _ in range(iters):
        if rdotr.item() < residual_tol:
            break
        Ap = fvp(p).detach()
        if Ap.shape != p.shape:
            raise ValueError(f"fvp must return shape {tuple(p.shape)}, got {tuple(Ap.shape)}")
        if damping:
            Ap = Ap + damping * p
        pAp = torch.dot(p, Ap)
        if not pAp.item() > 0:
            break
        alpha = rdotr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        new_rdotr = torch.dot(r, r)
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x


def flat_grad(
    outputs: torch.Tensor,
    params: Iterable[torch.Tensor],
    retain_graph: bool = False,
    create_graph: bool = False,
) -> torch.Tensor:
    """Gradient of a scalar ``outputs`` w.r.t. ``params``, concatenated into one flat vector.

    Formula: [vec(d outputs / d p_1); ...; vec(d outputs / d p_k)], with zeros for a parameter
    that ``outputs`` does not depend on.
    Reference: none (standard flattening of torch.autograd.grad).

    Shape: outputs scalar; params k tensors with n_1 .. n_k elements. Returns (sum_i n_i,).
    With create_graph=True the result carries a graph (for a second backward), otherwise it
    has none; create_graph=True also retains the graph of ``outputs``, as in torch.autograd.grad,
    because that second backward runs through it.
    """
    check_tensor("outputs", outputs)
    if outputs.numel() != 1:
        raise ValueError(f"outputs must be a scalar, got shape {tuple(outputs.shape)}")
    params = _as_param_list(params)
    # allow_unused: a policy can have parameters a given batch never reaches (an unvisited
    # state, an unused embedding row); their gradient is 0, not an error.
    grads = torch.autograd.grad(
        outputs.reshape(()),
        params,
        retain_graph=retain_graph or create_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def get_flat_params(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """All parameter values concatenated into one detached flat vector (a copy).

    Reference: none (standard flattening).

    Shape: params k tensors with n_1 .. n_k elements. Returns (sum_i n_i,).
    """
    params = _as_param_list(params)
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def set_flat_params(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat vector back into the parameters, in place, in the order of ``params``.

    Inverse of get_flat_params: set_flat_params(ps, get_flat_params(ps)) leaves ps unchanged.
    Reference: none (standard unflattening).

    Shape: params k tensors with n_1 .. n_k elements; flat (sum_i n_i,).
    """
    params = _as_param_list(params)
    check_ndim("flat", flat, 1, "(N,)")
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat must have {total} elements (all params), got {flat.numel()}")
    offset = 0
    # No grad: this is an optimiser write to leaf tensors, not part of any graph.
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def fisher_vector_product(
    kl_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], damping: float = 0.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Closure v -> (H + damping I) v, H the Hessian of kl_fn() w.r.t. params (double backward).

    Formula: H v = grad_theta( grad_theta KL(theta)^T v ) with v held constant (Pearlmutter
    1994), so F is never formed. The first call runs kl_fn() and keeps the graph of its
    gradient; every product is then one more backward pass through it, so the closure is valid
    while the parameters do not change (as during conjugate gradient). At
    theta = theta_old, with kl_fn built on rlhf_lab.losses.mean_kl, H is the Fisher matrix on the
    sampled tokens (see mean_kl). damping adds a multiple of the identity, which keeps the CG
    system well posed where F is singular (e.g. softmax logits are invariant to a shift) and
    shortens steps along poorly estimated directions.
    ``kl_fn()`` must compute the KL from the current parameter values, with a graph.
    Reference: Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv:1502.05477),
    Appendix C; Pearlmutter 1994, "Fast Exact Multiplication by the Hessian" (Neural
    Computation 6).

    Shape: params k tensors with N elements in all; the closure maps v (N,) -> (N,) (detached).
    """
    params = _as_param_list(params)
    check_positive("damping", damping, allow_zero=True)
    n_params = sum(p.numel() for p in params)

    cache: list[torch.Tensor] = []

    def fvp(v: torch.Tensor) -> torch.Tensor:
        check_ndim("v", v, 1, "(N,)")
        if v.numel() != n_params:
            raise ValueError(f"v must have {n_params} elements (all params), got {v.numel()}")
        v = v.detach()
        if not cache:
            cache.append(flat_grad(kl_fn(), params, create_graph=True))
        grad_kl = cache[0]
        grad_kl_v = torch.dot(grad_kl, v.to(grad_kl.dtype))
        if not grad_kl_v.requires_grad:
            # The KL gradient does not depend on params (e.g. KL linear or constant in them):
            # the Hessian is 0.
            hv = torch.zeros_like(grad_kl)
        else:
            hv = flat_grad(grad_kl_v, params, retain_graph=True)
        return hv.detach() + damping * v

    return fvp


def trpo_step(
    params: Iterable[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    kl_fn: Callable[[], torch.Tensor],
    max_kl: float = 0.01,
    cg_iters: int = 10,
    damping: float = 0.1,
    backtrack_coef: float = 0.5,
    max_backtracks: int = 10,
    accept_ratio: float = 0.1,
) -> dict[str, float]:
    """One TRPO update of ``params`` in place: natural-gradient step, then a KL-safe line search.

    Formula: with theta_0 the current parameters, g = grad L(theta_0), and
        A = F + damping I (F from fisher_vector_product of kl_fn at theta_0),
        x ~= -A^{-1} g                      (cg_iters steps of conjugate_gradient)
        beta = sqrt(2 delta / x^T A x)      (delta = max_kl: the quadratic model
                                             1/2 s^T A s of the KL equals delta at s = beta x)
        s = beta x                          (full step; first-order gain -g^T s > 0)
    then for k = 0, 1, ..., max_backtracks, theta = theta_0 + c^k s (c = backtrack_coef) is
    accepted at the first k with
        kl_fn() <= delta,
        improvement = L(theta_0) - L(theta) > 0,
        improvement / expected >= accept_ratio,   expected = -g^T (c^k s).
    The quadratic model can under-estimate the KL and the linear model over-estimate the gain,
    hence the checks on the exact values. Because the step is sized with the damped A, a small
    full step reaches KL ~= 1/2 s^T F s = delta - 1/2 damping |s|^2, a little inside the region;
    without damping, near-singular directions of the sampled Fisher can make s long and the
    quadratic model poor (the line search then backtracks). If no k passes, theta_0 is restored exactly.
    loss_fn() and kl_fn() must recompute their value from the current parameters; kl_fn's
    old log-probs must be those of theta_0 (so it is 0 there). The line-search evaluations run
    under torch.no_grad.
    Metrics (floats): kl (kl_fn() at the accepted parameters, 0.0 if rejected); improvement
    (L(theta_0) - L(theta), 0.0 if rejected); expected_improvement (-g^T of the accepted step,
    of the full step if rejected); step_fraction (c^k, 0.0 if rejected); accepted (1.0 / 0.0);
    cg_residual (||A x + g||, the Euclidean norm of the CG residual).
    Reference: Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv:1502.05477),
    Section 6 and Appendix C; line search acceptance ratio as in Schulman's modular_rl.

    Shape: params k tensors with N elements in all; loss_fn() and kl_fn() return scalars.
    Returns {"kl", "improvement", "expected_improvement", "step_fraction", "accepted",
    "cg_residual"}.
    """
    params = _as_param_list(params)
    check_positive("max_kl", max_kl)
    _check_count("cg_iters", cg_iters, 1)
    check_positive("damping", damping, allow_zero=True)
    _check_open_unit_interval("backtrack_coef", backtrack_coef)
    _check_count("max_backtracks", max_backtracks, 0)
    check_positive("accept_ratio", accept_ratio, allow_zero=True)
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] must require grad (TRPO differentiates through it)")

    theta_0 = get_flat_params(params)
    loss_0 = loss_fn()
    g = flat_grad(loss_0, params).detach()
    loss_0 = float(loss_0.detach())

    fvp = fisher_vector_product(kl_fn, params, damping)
    # Minimising L: the natural-gradient descent direction solves A x = -g.
    x = conjugate_gradient(fvp, -g, iters=cg_iters)
    Ax = fvp(x)
    cg_residual = float(torch.linalg.vector_norm(Ax + g))
    xAx = float(torch.dot(x, Ax))

    metrics = {
        "kl": 0.0,
        "improvement": 0.0,
        "expected_improvement": 0.0,
        "step_fraction": 0.0,
        "accepted": 0.0,
        "cg_residual": cg_residual,
    }
    # A zero gradient (x = 0) or a Fisher that is not positive along x leaves no step to scale.
    if not (math.isfinite(xAx) and xAx > 0):
        return metrics
    full_step = math.sqrt(2.0 * max_kl / xAx) * x
    expected_full = float(-torch.dot(g, full_step))
    metrics["expected_improvement"] = expected_full

    for k in range(max_backtracks + 1):
        fraction = backtrack_coef**k
        set_flat_params(params, theta_0 + fraction * full_step)
        with torch.no_grad():
            loss = float(loss_fn())
            kl = float(kl_fn())
        improvement = loss_0 - loss
        expected = expected_full * fraction
        # NaN fails every comparison below, so a step into a non-finite region is rejected.
        if (
            kl <= max_kl
            and improvement > 0
            and expected > 0
            and improvement / expected >= accept_ratio
        ):
            metrics.update(
                kl=kl,
                improvement=improvement,
                expected_improvement=expected,
                step_fraction=fraction,
                accepted=1.0,
            )
            return metrics

    set_flat_params(params, theta_0)
    return metrics
