"""Language-modelling (next-token) loss for pretraining and SFT."""

from __future__ import annotations

import torch

from rlhf_lab.checks import check_ndim, check_same_shape
from rlhf_lab.losses.masked import masked_mean

__all__ = ["lm_loss"]


def lm_loss(
    logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood of the target tokens selected by ``mask``.

    Formula: loss = nll = -sum_{b,t} m_{b,t} log p(y_{b,t} | y_{b,<t}) / sum_{b,t} m_{b,t}
        (token-level mean over the whole batch, so long sequences weigh more than short ones);
        perplexity = exp(nll). An empty mask gives nll = 0, perplexity = 1.
    Reference: maximum-likelihood language modelling, Bengio et al. 2003, "A Neural
    Probabilistic Language Model" (JMLR 3); perplexity as in Jelinek et al. 1977,
    "Perplexity - a measure of the difficulty of speech recognition tasks".

    Shape: logprobs (B, T) log-probs of the target tokens (already gathered); mask (B, T).
    Returns (loss scalar, {"nll", "perplexity"} detached scalars).
    """
    check_ndim("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("logprobs", logprobs, mask=mask)
    nll = -masked_mean(logprobs, mask)
    metrics = {"nll": nll.detach(), "perplexity": torch.exp(nll.detach())}
    return nll, metrics
