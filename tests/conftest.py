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
