"""One LightningModule per stage: wiring, logging and optimisers (losses live in `losses/`)."""

from rlhf_lab.stages.lm import SFT, Pretrain, PretrainConfig, SFTConfig
from rlhf_lab.stages.ppo import PPO, PPOConfig
from rlhf_lab.stages.reward_model import RewardModel, RewardModelConfig

STAGES = {
    "pretrain": (Pretrain, PretrainConfig),
    "sft": (SFT, SFTConfig),
    "reward_model": (RewardModel, RewardModelConfig),
    "ppo": (PPO, PPOConfig),
}


def get_stage(name: str):
    """`(StageClass, ConfigClass)` for a stage name; unknown names fail with the valid ones."""
    if name not in STAGES:
        raise ValueError(f"unknown stage name '{name}'; choose from: {', '.join(STAGES)}")
    return STAGES[name]


__all__ = [
    "PPO", "PPOConfig", "Pretrain", "PretrainConfig", "RewardModel", "RewardModelConfig",
    "SFT", "SFTConfig", "STAGES", "get_stage",
]
