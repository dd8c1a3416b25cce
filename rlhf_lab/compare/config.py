"""What a comparison runs: `CompareConfig` (light: no torch import, so `--help` stays fast)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rlhf_lab.algorithms import algorithm_names
from rlhf_lab.checks import check_choice, check_positive

__all__ = ["BUDGET_UNITS", "CompareConfig", "DEFAULT_ALGORITHMS", "DEFAULT_BUDGET", "QUICK_BUDGET"]

# Every registered algorithm can be compared (rlhf_lab.algorithms). The online ones stop when
# their budget counter reaches the budget; offline DPO samples its budget from the SFT policy
# first (see runner.py).
DEFAULT_ALGORITHMS = ("ppo", "rloo", "grpo", "dpo")
BUDGET_UNITS = ("samples", "tokens")
# 15,360 samples = 60 iterations of the demo's 64 prompts × 4 responses: the demo's PPO budget.
# 4 algorithms × 3 seeds at this budget, plus the shared base, took 12 minutes with
# OMP_NUM_THREADS=1 on a 2-core machine shared with other jobs (base 4 min, PPO 65 s a run,
# RLOO/GRPO 27 s, DPO 33 s). The token default is the same budget at the 3.2 tokens per response
# (answer + EOS) that the arithmetic SFT policy samples: 49,152 = 15,360 × 3.2.
DEFAULT_BUDGET = {"samples": 15360, "tokens": 49152}
# --quick: two iterations of 16 prompts × 4 responses (the tests' tiny setting).
QUICK_BUDGET = {"samples": 128, "tokens": 320}


@dataclass
class CompareConfig:
    """One comparison: algorithms × seeds from one SFT checkpoint and reward model, at one budget.

    Every field except `algorithms` and `seeds` decides what a single run produces, so a folder
    refuses a re-run that changes one of them (`identity`); adding algorithms or seeds to a
    folder is allowed, since the new runs start from the same base at the same budget.
    """

    task: str = "arithmetic"  # a name in rlhf_lab.tasks.TASKS
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS  # any of ALGORITHMS, in table order
    seeds: int = 3  # runs per algorithm, with seeds 0 … seeds−1 (the RL / DPO seed, not the base's)
    budget: int | None = None  # budget per run in `budget_unit`; None = DEFAULT_BUDGET (QUICK_BUDGET with quick)
    budget_unit: str = "samples"  # "samples" (responses sampled) or "tokens" (response tokens generated)
    evals: int = 6  # measurements along the budget (at k/evals of it, k = 1 … evals), plus one at 0
    base_seed: int = 0  # seed of the shared base: pretraining, SFT, reward model, prompt split
    backbone: str = "gpt2-tiny"  # a named tiny config or toy model, or a local HF model folder
    quick: bool = False  # tiny base and budgets: checks the wiring in seconds, learns little
    eval_samples_per_prompt: int = 2  # sampled responses per eval prompt in each measurement
    eval_seed: int = 1234  # seed of the measurement's sampling: the same random numbers for every run
    dpo_max_pairs_per_prompt: int = 16  # DPO: preference pairs kept per prompt (drawn at random)
    checkpoint_every: int = 100  # optimiser steps between checkpoints of each stage and run (not in identity)

    def __post_init__(self):
        if isinstance(self.algorithms, str):
            self.algorithms = tuple(a.strip() for a in self.algorithms.split(",") if a.strip())
        self.algorithms = tuple(self.algorithms)
        if not self.algorithms:
            raise ValueError("algorithms must name at least one algorithm")
        for name in self.algorithms:
            check_choice("algorithms", name, algorithm_names())
        if len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError(f"algorithms lists one twice: {','.join(self.algorithms)}")
        check_positive("seeds", self.seeds)
        check_choice("budget_unit", self.budget_unit, BUDGET_UNITS)
        if self.budget is None:
            self.budget = (QUICK_BUDGET if self.quick else DEFAULT_BUDGET)[self.budget_unit]
        check_positive("budget", self.budget)
        check_positive("evals", self.evals)
        check_positive("eval_samples_per_prompt", self.eval_samples_per_prompt)
        check_positive("dpo_max_pairs_per_prompt", self.dpo_max_pairs_per_prompt)
        check_positive("checkpoint_every", self.checkpoint_every, allow_zero=True)

    @property
    def seed_list(self) -> list[int]:
        """The run seeds, 0 … seeds−1; returns a list."""
        return list(range(self.seeds))

    @property
    def checkpoints(self) -> list[float]:
        """Budgets at which a run is measured (after the one at 0): k/evals · budget; returns a list."""
        return [self.budget * k / self.evals for k in range(1, self.evals + 1)]

    def demo_config(self):
        """The `DemoConfig` of the base and of each algorithm's settings; returns a DemoConfig.

        The base pipeline and every algorithm's hyperparameters are the demo's (seed `base_seed`);
        `quick` shrinks the base as `rlhf-lab demo --quick` does and samples 16 prompts × 4
        responses per iteration.
        """
        from rlhf_lab.demo import DemoConfig

        c = DemoConfig(seed=self.base_seed, task=self.task, backbone=self.backbone,
                       checkpoint_every=self.checkpoint_every)
        if self.quick:
            c.pretrain_steps, c.sft_steps, c.reward_steps, c.pair_samples = 40, 20, 20, 4
            c.prompts_per_step = 16
            c.final_budget = 4  # offline DPO's optimiser steps (the online ones stop at the budget)
        return c

    def identity(self) -> dict:
        """Everything that decides a single run's result, as plain JSON values; returns a dict.

        That is every field but `algorithms` and `seeds`, plus the resolved demo settings (base
        budgets) and every registered algorithm's resolved config, so a change of defaults between
        versions is caught too.
        """
        from rlhf_lab.runs import plain_config

        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("algorithms", "seeds", "checkpoint_every")}
        # How often runs checkpoint changes no number (resumes are exact), so it is not identity.
        demo = dataclasses.replace(self.demo_config(), checkpoint_every=100)
        # Every registered algorithm's resolved config (the registry's preset and demo settings).
        settings = {name: demo.final_config(name) for name in algorithm_names()}
        return plain_config({**own, "demo": demo, "settings": settings})
