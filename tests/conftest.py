"""Shared fixtures: a task tokenizer and tiny policies, built in milliseconds, nothing downloaded."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def task():
    from rlhf_lab.tasks import get_task

    return get_task("arithmetic")


@pytest.fixture(scope="session")
def tokenizer(task):
    from rlhf_lab.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(task.tokenizer_texts())


@pytest.fixture
def make_policy(tokenizer):
    """Factory for a 1-layer GPT-2 policy (random weights, seeded)."""
    from rlhf_lab.models.backbones import build_tiny_model
    from rlhf_lab.policy import Policy

    def make(seed: int = 0, **kw):
        torch.manual_seed(seed)
        model = build_tiny_model("gpt2-tiny", tokenizer, n_layer=1, n_embd=32, n_head=2)
        return Policy(model, tokenizer, **kw)

    return make


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails at once and is recorded; no offline variable announces it.

    huggingface_hub reads HF_HUB_OFFLINE at import (set above), so its constant is switched off
    too: a stray hub request would then really try to connect, and retry, which the returned list
    of attempted addresses shows. Tests assert on that list, not on wall time.
    """
    import socket

    import huggingface_hub

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[1] if len(args) > 1 and isinstance(args[0], socket.socket) else args[:1])
        raise OSError("network disabled by the test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# A tabular softmax policy for the TRPO tests (tests/losses/test_trpo.py, tests/optim/test_trpo.py):
# theta (S * A,) are the logits, reshaped (S, A).
S, A, F64 = 3, 4, torch.float64


def log_softmax_policy(theta: torch.Tensor) -> torch.Tensor:
    """log pi(a | s) of the tabular policy, (S, A)."""
    return torch.log_softmax(theta.view(S, A), dim=-1)


class TRPOProblem:
    """A fixed batch of "sampled" tokens from pi_old = softmax(theta_0) with advantages.

    theta is the live parameter (starts at theta_0); loss_fn and kl_fn recompute from it, as
    trpo_step requires. scale sets how peaked pi_old is (larger = more ill-conditioned Fisher).
    """

    def __init__(self, seed: int = 0, scale: float = 2.0, B: int = 6, T: int = 5) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.theta0 = torch.randn(S * A, generator=gen, dtype=F64) * scale
        self.states = torch.randint(0, S, (B, T), generator=gen)
        probs = log_softmax_policy(self.theta0).exp()
        self.actions = torch.multinomial(probs[self.states.view(-1)], 1, generator=gen).view(B, T)
        self.advantages = torch.randn(B, T, generator=gen, dtype=F64)
        self.mask = torch.ones(B, T, dtype=F64)
        self.mask[0, -2:] = 0  # a padded row end
        self.old = self.logp(self.theta0).detach()
        self.theta = self.theta0.clone().requires_grad_(True)

    log_softmax = staticmethod(log_softmax_policy)

    def logp(self, theta: torch.Tensor) -> torch.Tensor:
        return log_softmax_policy(theta)[self.states, self.actions]

    def loss_fn(self) -> torch.Tensor:
        from rlhf_lab.losses import surrogate_loss

        return surrogate_loss(self.logp(self.theta), self.old, self.advantages, self.mask)[0]

    def kl_fn(self) -> torch.Tensor:
        from rlhf_lab.losses import mean_kl

        return mean_kl(self.logp(self.theta), self.old, self.mask)

    def step(self, **kw) -> dict[str, float]:
        from rlhf_lab.optim import trpo_step

        return trpo_step([self.theta], self.loss_fn, self.kl_fn, **kw)


@pytest.fixture
def trpo_problem():
    """The `TRPOProblem` class: `trpo_problem(seed=1, scale=3.0)` builds one."""
    return TRPOProblem
