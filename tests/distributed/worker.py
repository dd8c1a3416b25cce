"""Train the cases of tests/distributed/test_ddp.py for a few steps, on one process or as DDP ranks.

    python worker.py OUT DEVICES CASES_JSON [STRATEGY]

With DEVICES > 1 Lightning's launcher (gloo on CPU) starts this script again for the other
ranks. STRATEGY is `ddp` (the default) or `fsdp2` (every weight sharded over the ranks, as
`trainer.strategy: fsdp2` runs it). Every case builds its tiny policy, data and stage from fixed seeds, trains, and rank 0
writes `OUT/<case>.pt`: the trained weights, the budget counters, the last logged metrics and
the stage's per-iteration history. Cases: see `build`.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch

from rlhf_lab.distributed import full_state_dict, sharded_units
from rlhf_lab.models.backbones import build_tiny_model
from rlhf_lab.models.tokenizer import train_bpe_tokenizer
from rlhf_lab.policy import Policy
from rlhf_lab.rewards import CallableSource
from rlhf_lab.rollout import Rollout, RolloutBuffer
from rlhf_lab.runs.builder import TrainerConfig
from rlhf_lab.stages import (
    DPO,
    SFT,
    DPOConfig,
    OnlineDPO,
    OnlineRL,
    OnlineRLConfig,
    RewardModel,
    SFTConfig,
)
from rlhf_lab.stages.reward_model import RewardModelConfig
from rlhf_lab.tasks import get_task

TASK = get_task("arithmetic")
TOKENIZER = train_bpe_tokenizer(TASK.tokenizer_texts())
PROMPTS = [f"Q: {a}+{b}=\nA:" for a in range(4) for b in range(4)]


def chars(prompts, completions):
    """A reward of each (prompt, completion) alone, wherever its row sits: longer is better."""
    return [len(c) / 10 + 0.01 * (sum(map(ord, p + c)) % 3) for p, c in zip(prompts, completions, strict=True)]


def policy(**kw) -> Policy:
    torch.manual_seed(0)
    return Policy(build_tiny_model("gpt2-tiny", TOKENIZER, n_layer=1, n_embd=32, n_head=2), TOKENIZER, **kw)


def pairs(n: int = 16) -> list[dict]:
    return [{"prompt": p, "chosen": f" {i % 7}", "rejected": f" {(i + 3) % 7}{i % 2}"} for i, p in enumerate(PROMPTS[:n])]


def per_prompt_sampling(p: Policy) -> Policy:
    """Sample each prompt from its own seed, so the samples of a prompt do not depend on which
    process draws them or what it drew before (one-process and DDP runs see the same rollouts)."""
    generate = p.generate

    def sample(prompts, **kwargs):
        parts = []
        for prompt in prompts:
            torch.manual_seed(sum(map(ord, prompt)))
            parts.append(generate([prompt], **kwargs))
        return Rollout.concat(parts, p.tokenizer.pad_token_id)

    p.generate = sample
    return p


def build(case: dict, replay_path: str) -> tuple[L.LightningModule, int]:
    """The stage of `case` and the optimiser steps to train it for."""
    kind, knobs = case["stage"], case.get("config", {})
    if kind == "sft":
        rows = [{"prompt": p, "completion": f" {i % 7}"} for i, p in enumerate(PROMPTS)]
        return SFT(policy(), rows, None, SFTConfig(**{"batch_size": 8, **knobs})), 2
    if kind == "reward_model":
        return RewardModel(policy(scalar_head=True), pairs(), None, RewardModelConfig(**{"batch_size": 8, **knobs})), 2
    if kind == "dpo":
        return DPO(policy(reference="copy"), pairs(), None, DPOConfig(**{"batch_size": 8, **knobs})), 2
    if kind == "online_dpo":
        p = per_prompt_sampling(policy(reference="copy"))
        return OnlineDPO(p, PROMPTS, CallableSource(chars), DPOConfig(batch_size=8, max_new_tokens=4, **knobs)), 2
    config = OnlineRLConfig.preset(kind, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=4, lr=3e-3,
                                   **knobs)
    p = policy(reference="copy", scalar_head=config.baseline == "critic")
    replay = RolloutBuffer.load(replay_path, p.tokenizer.pad_token_id)
    stage = OnlineRL(p, PROMPTS, CallableSource(chars), config, replay=replay)
    return stage, 2 * config.steps_per_iteration


def run(out: str, devices: int, cases: dict[str, dict], strategy: str = "ddp") -> None:
    for name, case in cases.items():
        L.seed_everything(0, verbose=False)
        stage, steps = build(case, os.path.join(out, "replay.pt"))
        start = _weights(stage)
        trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=devices,
                            strategy=TrainerConfig(devices=devices, strategy=strategy)._strategy() if devices > 1
                            else "auto", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            use_distributed_sampler=False, **case.get("trainer", {}))
        # Lightning's DDP re-seeds every rank from the global seed as it sets up (`reset_seed`), so
        # the one-process run starts fit from the same random state.
        L.seed_everything(0, verbose=False)
        trainer.fit(stage)
        weights = _weights(stage)  # every rank: a sharded policy is gathered whole
        if trainer.is_global_zero:
            budget = {k: v for k, v in stage.budget.state_dict().items() if k != "seconds"}
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "budget/seconds"}
            history = [{k: v for k, v in row.items() if k != "budget/seconds"}
                       for row in getattr(stage, "history", [])]
            torch.save({"weights": weights, "start": start, "budget": budget, "metrics": metrics,
                        "history": history, "world_size": trainer.world_size}, os.path.join(out, f"{name}.pt"))


def _weights(stage) -> dict[str, torch.Tensor]:
    def state(module) -> dict:
        return full_state_dict(module) if sharded_units(module) else module.state_dict()

    weights = {k: v.detach().clone() for k, v in state(stage.policy.model).items()}
    if stage.policy.scalar_head is not None:
        weights.update({f"head.{k}": v.detach().clone() for k, v in state(stage.policy.scalar_head).items()})
    return weights


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), *sys.argv[4:])
