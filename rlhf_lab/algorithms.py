"""The algorithm registry: one table that names every algorithm a run can end with.

Each `Algorithm` says which stage trains it, its preset (the knob defaults that *are* the
algorithm, on top of the stage config's own defaults), the settings the demo tunes on top of the
preset, the demo's budget, and its docs page. The CLI's choices, `rlhf-lab fit NAME`,
`demo --algorithm`, `compare --algorithms` and the docs' tables all read this table, so adding an
algorithm is one `register(Algorithm(...))` plus its loss.

This module imports nothing (no torch, no Lightning, nothing of rlhf_lab): it is a table of names
at the bottom of the layers, so the CLI builds its `--help` from it and a stage config resolves a
preset from it (`OnlineRLConfig.preset`). Stage and config classes are resolved on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ALGORITHMS", "BASE_STAGES", "STAGE_NAMES", "Algorithm", "algorithm_names", "fit_names",
           "get_algorithm", "register", "stage_classes", "unregister"]

# The stages (LightningModules) by name, as "module:Class" of the stage and of its config dataclass.
_STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("rlhf_lab.stages.lm:Pretrain", "rlhf_lab.stages.lm:PretrainConfig"),
    "sft": ("rlhf_lab.stages.lm:SFT", "rlhf_lab.stages.lm:SFTConfig"),
    "reward_model": ("rlhf_lab.stages.reward_model:RewardModel", "rlhf_lab.stages.reward_model:RewardModelConfig"),
    "online_rl": ("rlhf_lab.stages.online:OnlineRL", "rlhf_lab.stages.online:OnlineRLConfig"),
    "dpo": ("rlhf_lab.stages.dpo:DPO", "rlhf_lab.stages.dpo:DPOConfig"),
    "online_dpo": ("rlhf_lab.stages.dpo:OnlineDPO", "rlhf_lab.stages.dpo:DPOConfig"),
}
STAGE_NAMES = tuple(_STAGES)
# The stages before the last one: they are runs of their own, not algorithms.
BASE_STAGES = ("pretrain", "sft", "reward_model")


def _resolve(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def stage_classes(stage: str) -> tuple[type, type]:
    """`(StageClass, ConfigClass)` of a stage name; an unknown name fails with the valid ones."""
    if stage not in _STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from: {', '.join(_STAGES)}")
    return tuple(_resolve(p) for p in _STAGES[stage])


@dataclass(frozen=True)
class Algorithm:
    """One entry of the registry.

    `stage` trains it: `online_rl` (sample → score → advantages → update), `dpo` (offline pairs)
    or `online_dpo` (pairs sampled from the current policy). `preset` holds the knobs that define
    the algorithm (the paper's settings); `demo` the settings the built-in demo tunes on top of the
    preset for a 2-core CPU; `demo_budget` the demo's length: iterations for the online stages,
    optimiser steps for `dpo`.
    """

    name: str
    stage: str
    summary: str  # one line for --help and the docs' tables
    preset: Mapping[str, Any] = field(default_factory=dict)
    demo: Mapping[str, Any] = field(default_factory=dict)
    demo_budget: int = 100
    paper: str = ""
    docs: str = ""  # its page under docs/

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"algorithm name must be an identifier, got {self.name!r}")
        if self.stage not in _STAGES or self.stage in BASE_STAGES:
            raise ValueError(f"algorithm {self.name!r}: stage must be one of online_rl, dpo, online_dpo; "
                             f"got {self.stage!r}")
        if self.demo_budget < 1:
            raise ValueError(f"algorithm {self.name!r}: demo_budget must be >= 1, got {self.demo_budget}")
        object.__setattr__(self, "preset", MappingProxyType(dict(self.preset)))
        object.__setattr__(self, "demo", MappingProxyType(dict(self.demo)))

    @property
    def online(self) -> bool:
        """Whether it samples from the policy while it trains (every stage but offline `dpo`)."""
        return self.stage != "dpo"

    @property
    def config_class(self) -> type:
        return stage_classes(self.stage)[1]

    @property
    def stage_class(self) -> type:
        return stage_classes(self.stage)[0]

    def config(self, **overrides):
        """The stage config of this algorithm: the preset with `overrides` on top.

        An online RL config also records the algorithm's name (`algorithm`), for logs and summaries.
        """
        kwargs = {**self.preset, **overrides}
        if self.stage == "online_rl":
            kwargs = {"algorithm": self.name, **kwargs}
        return self.config_class(**kwargs)

    def demo_config(self, **overrides):
        """The config the demo runs: preset, then the demo's settings, then `overrides`."""
        return self.config(**{**self.demo, **overrides})

    def preset_of(self, config) -> dict:
        """The fields of `config` where it differs from this algorithm's preset; returns a dict."""
        reference = self.config()
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if getattr(config, f.name) != getattr(reference, f.name)}


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm, replace: bool = False) -> Algorithm:
    """Add `algorithm` to the registry (every command offers it from then on); returns it."""
    if algorithm.name in ALGORITHMS and not replace:
        raise ValueError(f"algorithm {algorithm.name!r} is registered already (pass replace=True)")
    if algorithm.name in _STAGES and algorithm.name != algorithm.stage:
        raise ValueError(f"algorithm name {algorithm.name!r} is a stage name")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def unregister(name: str) -> None:
    """Remove an algorithm (tests that register one at run time clean up with this)."""
    ALGORITHMS.pop(name, None)


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm `name`; an unknown name fails with the valid ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose from: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm, in registration order; returns a tuple."""
    return tuple(ALGORITHMS)


def fit_names() -> tuple[str, ...]:
    """What `rlhf-lab fit NAME` takes: the base stages, `online_rl` (knobs set by hand) and every
    algorithm; returns a tuple."""
    return (*BASE_STAGES, "online_rl", *ALGORITHMS)


# Everything the demo's online algorithms share: an equal budget of 64 prompts × 4 responses per
# iteration, a penalty for answers cut at the length limit, and β = 0.05.
_DEMO_ONLINE = dict(prompts_per_step=64, samples_per_prompt=4, missing_eos_penalty=1.0, kl_coef=0.05)

# Demo budgets are set for roughly equal wall time on 2 CPU cores (45-65 s): a PPO iteration takes
# 8 optimiser steps with a critic, a REINFORCE/RLOO/GRPO one 4.
register(Algorithm(
    "ppo", "online_rl", "clipped surrogate with a critic and GAE, KL in the reward",
    preset=dict(baseline="critic", clip_ratio=0.2, ppo_epochs=4, minibatches=2, kl_in="reward"),
    demo=dict(_DEMO_ONLINE, lr=2e-4, critic_lr=1e-3, ppo_epochs=2, minibatches=4, vf_coef=0.1),
    demo_budget=60, paper="Schulman et al. 2017; Ouyang et al. 2022", docs="algorithms/ppo.md"))
register(Algorithm(
    "reinforce", "online_rl", "vanilla policy gradient, batch-mean baseline",
    preset=dict(baseline="batch_mean", clip_ratio=None, ppo_epochs=1, minibatches=1, kl_in="reward",
                whiten_advantages=False),
    demo=dict(_DEMO_ONLINE, lr=1e-4, minibatches=4),
    demo_budget=150, paper="Williams 1992; Ahmadian et al. 2024", docs="algorithms/reinforce.md"))
register(Algorithm(
    "rloo", "online_rl", "REINFORCE with the leave-one-out baseline over G samples",
    preset=dict(baseline="leave_one_out", samples_per_prompt=4, clip_ratio=None, ppo_epochs=1,
                minibatches=1, kl_in="reward", whiten_advantages=False),
    demo=dict(_DEMO_ONLINE, lr=2e-4, minibatches=4, kl_coef=0.1),
    demo_budget=150, paper="Kool et al. 2019; Ahmadian et al. 2024", docs="algorithms/rloo.md"))
# GRPO's KL in the loss: "k3+" (k3's value, k2's gradient), whose expected gradient is the KL's.
# The paper's k3 is `kl_estimator="k3"` (a biased gradient; see docs/algorithms/kl.md).
_GRPO = dict(baseline="group_norm", samples_per_prompt=4, clip_ratio=0.2, ppo_epochs=1, minibatches=1,
             kl_in="loss", kl_estimator="k3+", kl_coef=0.04, aggregation="seq_mean", whiten_advantages=False)
_DEMO_GROUP = dict(_DEMO_ONLINE, lr=2e-4, minibatches=4, kl_coef=0.1)
register(Algorithm(
    "grpo", "online_rl", "group-normalised advantages, clipped ratio, KL in the loss",
    preset=_GRPO, demo=_DEMO_GROUP,
    demo_budget=150, paper="Shao et al. 2024", docs="algorithms/grpo.md"))
register(Algorithm(
    "dr_grpo", "online_rl", "GRPO without the std division and with a constant length normaliser",
    preset=dict(_GRPO, baseline="group_mean", aggregation="seq_mean_token_sum_norm"), demo=_DEMO_GROUP,
    demo_budget=150, paper="Liu et al. 2025", docs="algorithms/dr_grpo.md"))
register(Algorithm(
    "dapo", "online_rl", "clip-higher, token mean, dynamic sampling, overlong penalty, no KL",
    preset=dict(_GRPO, clip_ratio_high=0.28, aggregation="token_mean", dynamic_sampling=True,
                overlong_buffer=0.2, kl_coef=0.0),
    demo=dict(_DEMO_GROUP, kl_coef=0.0),
    demo_budget=150, paper="Yu et al. 2025", docs="algorithms/dapo.md"))
register(Algorithm(
    "gspo", "online_rl", "sequence-level (geometric-mean) ratio, clipped per sequence",
    preset=dict(_GRPO, ratio_level="sequence", clip_ratio=3e-4, clip_ratio_high=4e-4),
    demo=_DEMO_GROUP, demo_budget=150, paper="Zheng et al. 2025", docs="algorithms/gspo.md"))
register(Algorithm(
    "cispo", "online_rl", "clipped, stopped importance weight on every token's log-prob gradient",
    preset=dict(_GRPO, surrogate="cispo", clip_ratio=None, clip_ratio_high=0.28, aggregation="token_mean",
                kl_coef=0.0),
    demo=dict(_DEMO_GROUP, kl_coef=0.0),
    demo_budget=150, paper="MiniMax 2025", docs="algorithms/cispo.md"))
# REINFORCE++: k1 KL in each token's reward, returns to go, advantages whitened over the global
# batch, PPO's clipped ratio; -baseline subtracts the group mean first.
_REINFORCE_PP = dict(baseline="none", returns="to_go", samples_per_prompt=1, clip_ratio=0.2, ppo_epochs=1,
                     minibatches=1, kl_in="reward", kl_estimator="k1", whiten_advantages=True)
register(Algorithm(
    "reinforce_pp", "online_rl", "REINFORCE++: k1 KL per token, returns to go, global whitening",
    preset=_REINFORCE_PP, demo=dict(_DEMO_ONLINE, lr=1e-4, minibatches=4),
    demo_budget=150, paper="Hu et al. 2025", docs="algorithms/reinforce_pp.md"))
register(Algorithm(
    "reinforce_pp_baseline", "online_rl", "REINFORCE++ with the group mean subtracted first",
    preset=dict(_REINFORCE_PP, baseline="group_mean", samples_per_prompt=4),
    demo=dict(_DEMO_ONLINE, lr=1e-4, minibatches=4),
    demo_budget=150, paper="Hu et al. 2025", docs="algorithms/reinforce_pp.md"))
register(Algorithm(
    "trpo", "online_rl", "natural-gradient step inside a KL trust region",
    preset=dict(baseline="leave_one_out", samples_per_prompt=4, update="trpo", kl_in="reward",
                whiten_advantages=True),
    # Each Fisher-vector product is a double backward over the batch (~1 s for 256 samples here),
    # so TRPO takes a quarter of the batch and 5 CG iterations.
    demo=dict(_DEMO_ONLINE, max_kl=0.01, prompts_per_step=16, cg_iters=5),
    demo_budget=120, paper="Schulman et al. 2015", docs="algorithms/trpo.md"))
register(Algorithm(
    "dpo", "dpo", "direct preference optimisation on fixed pairs (and its variants)",
    preset=dict(variant="sigmoid", beta=0.1),
    # α = 1 NLL on the chosen answer (RPO): plain DPO pushed the chosen answers down with the
    # rejected ones here and lowered greedy gold accuracy (see docs/algorithms/dpo.md).
    demo=dict(lr=2e-4, batch_size=32, nll_coef=1.0),
    demo_budget=300, paper="Rafailov et al. 2023", docs="algorithms/dpo.md"))
register(Algorithm(
    "online_dpo", "online_dpo", "DPO on pairs sampled from the current policy, ranked by the reward",
    preset=dict(variant="sigmoid", beta=0.1),
    demo=dict(lr=2e-4, batch_size=64),
    demo_budget=60, paper="Guo et al. 2024", docs="algorithms/online_dpo.md"))
register(Algorithm(
    "orpo", "dpo", "odds-ratio preference term plus SFT on the chosen answers, no reference model",
    # ORPO's L = L_SFT + λ L_OR: the SFT term is the stage's chosen-answer NLL (nll_coef = 1), λ is β.
    preset=dict(variant="orpo", beta=0.1, nll_coef=1.0),
    demo=dict(lr=2e-4, batch_size=32),
    demo_budget=300, paper="Hong et al. 2024", docs="algorithms/orpo.md"))
register(Algorithm(
    "kto", "dpo", "prospect-theoretic loss on unpaired desirable / undesirable answers",
    preset=dict(variant="kto", beta=0.1),
    # Pairs split into two rows each: 64 rows a step see the answers of DPO's 32 pairs.
    demo=dict(lr=2e-4, batch_size=64),
    demo_budget=300, paper="Ethayarajh et al. 2024", docs="algorithms/kto.md"))
