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
