"""One LightningModule per stage: wiring, logging and optimisers (losses live in `losses/`)."""

from rlhf_lab.stages.dpo import DPO, DPOConfig, OnlineDPO
from rlhf_lab.stages.guards import NonFiniteGuard
from rlhf_lab.stages.lm import SFT, Pretrain, PretrainConfig, SFTConfig
from rlhf_lab.stages.online import PPO, OnlineRL, OnlineRLConfig, PPOConfig
from rlhf_lab.stages.reward_model import RewardModel, RewardModelConfig

# The stages by name (rlhf_lab.algorithms.STAGE_NAMES, the light table the CLI reads, is tested to
# match). Algorithms (ppo, grpo, dpo, ...) are entries of that registry, each trained by one of these.
STAGES = {
    "pretrain": (Pretrain, PretrainConfig),
    "sft": (SFT, SFTConfig),
    "reward_model": (RewardModel, RewardModelConfig),
    "online_rl": (OnlineRL, OnlineRLConfig),
    "dpo": (DPO, DPOConfig),
    "online_dpo": (OnlineDPO, DPOConfig),
}


def get_stage(name: str):
    """`(StageClass, ConfigClass)` for a stage name; unknown names fail with the valid ones."""
    if name not in STAGES:
        raise ValueError(f"unknown stage name '{name}'; choose from: {', '.join(STAGES)}")
    return STAGES[name]


__all__ = [
    "DPO", "DPOConfig", "NonFiniteGuard", "OnlineDPO",
    "OnlineRL", "OnlineRLConfig", "PPO", "PPOConfig", "Pretrain", "PretrainConfig", "RewardModel", "RewardModelConfig",
    "SFT", "SFTConfig", "STAGES", "get_stage",
]
