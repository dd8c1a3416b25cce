"""Reductions over the positions selected by a mask.

Padding positions may hold anything (including ``inf``/``nan`` from ``-inf`` log-probs), so the
masked-out entries are removed with ``torch.where`` rather than by multiplying with 0
(``0 * inf`` is ``nan``).

The mask is 0/1 (float or bool) with the same shape as ``x``. A float mask with other
non-negative values acts as per-element weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_lab.checks import check_same_shape

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _weights(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask.to(x.dtype)


def _zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask != 0, x * _weights(x, mask), 0.0)


def masked_sum(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of ``x`` over the masked positions.

    Formula: sum_i m_i * x_i  (over all elements, or along ``dim``).
    Reference: none (standard masked reduction).

    Shape: x (B, T) or any shape; mask same shape as x. Returns a scalar when ``dim`` is None,
    otherwise x's shape with ``dim`` removed.
    """
    check_same_shape("x", x, mask=mask)
    masked = _zero_outside(x, mask)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the masked positions; 0 (not NaN) where the mask is empty.

    Formula: sum_i m_i * x_i / sum_i m_i, and 0 when sum_i m_i = 0.
    Reference: none (standard masked reduction).

    Shape: x (B, T) or any shape; mask same shape as x. Returns a scalar when ``dim`` is None,
    otherwise x's shape with ``dim`` removed.
    """
    check_same_shape("x", x, mask=mask)
    weights = _weights(x, mask)
    total = masked_sum(x, mask, dim=dim)
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    # An empty mask has total == 0, so dividing by 1 there gives the promised 0.
    return total / torch.where(count == 0, torch.ones_like(count), count)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked positions (a scalar).

    Formula: mu = masked_mean(x), n = sum_i m_i,
        var = sum_i m_i (x_i - mu)^2 / n            (unbiased=False)
        var = sum_i m_i (x_i - mu)^2 / (n - 1)      (unbiased=True, Bessel's correction)
    With n <= 1 the unbiased estimate is undefined; the biased value (0) is returned instead of
    NaN so whitening a one-token batch stays finite.
    Reference: none (standard statistic).

    Shape: x (B, T) or any shape; mask same shape as x. Returns a scalar.
    """
    check_same_shape("x", x, mask=mask)
    # Padding may hold inf; zero it first so backward does not produce 0 * inf = NaN.
    x = torch.where(mask != 0, x, 0.0)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _weights(x, mask).sum()
        # Bessel's factor n / (n - 1), replaced by 1 where n <= 1.
        correction = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
        var = var * correction
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) using statistics of the masked positions.

    Formula: mu = masked_mean(x), var = masked_var(x, unbiased=True),
        y = (x - mu) / sqrt(var + eps)          (shift_mean=True)
        y = (x - mu) / sqrt(var + eps) + mu     (shift_mean=False: rescale only, keep the mean)
    and y = 0 outside the mask.
    reduce: when `x` is one process's part of a batch spread over several, a function that sums
        a tensor over the processes; mu and var are then the whole batch's (n, the sum and the
        squared deviations are each summed over the processes). None: this `x` is the batch.
    Reference: advantage whitening as used by Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences" (arXiv:1909.08593) and most PPO implementations.

    Shape: x (B, T) or any shape; mask same shape as x; returns x's shape.
    """
    check_same_shape("x", x, mask=mask)
    # Padding may hold inf; zero it first so neither forward nor backward sees it.
    x = torch.where(mask != 0, x, 0.0)
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        n = reduce(_weights(x, mask).sum())
        mean = reduce(masked_sum(x, mask)) / n.clamp_min(1)
        squares = reduce(masked_sum((x - mean) ** 2, mask))
        var = squares / torch.where(n > 1, n - 1, n.clamp_min(1))  # Bessel's correction, as masked_var
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, 0.0)
