"""Pure tensor loss functions for RLHF: masked reductions, LM, reward, KL, advantages, PPO, DPO,
KTO, TRPO's objective, the online objective (reward shaping, overlong penalty, KL-in-loss term,
combined loss) and the rollout-training mismatch correction.

Nothing here touches models, Lightning or I/O; every loss returns ``(loss, metrics)`` with
``metrics`` a dict of detached scalar tensors (KL estimators, advantage functions and
``shape_rewards`` return tensors). Update rules that overwrite parameters (TRPO's step) live in
``rlhf_lab.optim``.
"""

from rlhf_lab.losses.advantages import (
    BASELINES,
    baseline_batch_mean,
    baseline_group_mean,
    baseline_group_norm,
    baseline_leave_one_out,
    baseline_none,
    contiguous_group_ids,
    gae,
    reinforce_advantages,
    returns_to_go,
    whiten_advantages,
)
from rlhf_lab.losses.correction import (
    CORRECTION_LEVELS,
    CORRECTION_MODES,
    rollout_correction_weights,
)
from rlhf_lab.losses.dpo import (
    DPO_LOSSES,
    chosen_nll,
    dpo_hinge,
    dpo_ipo,
    dpo_robust,
    dpo_robust_unbiased,
    dpo_sigmoid,
    orpo,
    preference_loss,
    simpo,
)
from rlhf_lab.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_plus,
    kl_penalty,
)
from rlhf_lab.losses.kto import kto_kl, kto_loss
from rlhf_lab.losses.lm import lm_loss
from rlhf_lab.losses.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_lab.losses.objective import kl_loss, online_objective, overlong_penalty, shape_rewards
from rlhf_lab.losses.ppo import (
    AGGREGATIONS,
    RATIO_LEVELS,
    SURROGATES,
    entropy_bonus,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_lab.losses.reward import bradley_terry_loss
from rlhf_lab.losses.trpo import mean_kl, surrogate_loss

__all__ = [
    # masked
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    # lm
    "lm_loss",
    # reward
    "bradley_terry_loss",
    # kl
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_plus",
    "KL_ESTIMATORS",
    "kl_penalty",
    "FixedKLController",
    "AdaptiveKLController",
    # advantages
    "gae",
    "returns_to_go",
    "baseline_none",
    "baseline_batch_mean",
    "baseline_leave_one_out",
    "baseline_group_norm",
    "baseline_group_mean",
    "BASELINES",
    "contiguous_group_ids",
    "reinforce_advantages",
    "whiten_advantages",
    # ppo
    "ppo_policy_loss",
    "ppo_value_loss",
    "entropy_bonus",
    "RATIO_LEVELS",
    "AGGREGATIONS",
    "SURROGATES",
    # rollout-training mismatch correction
    "rollout_correction_weights",
    "CORRECTION_MODES",
    "CORRECTION_LEVELS",
    # online objective
    "shape_rewards",
    "overlong_penalty",
    "kl_loss",
    "online_objective",
    # dpo
    "chosen_nll",
    "dpo_sigmoid",
    "dpo_ipo",
    "dpo_hinge",
    "dpo_robust",
    "dpo_robust_unbiased",
    "simpo",
    "orpo",
    "DPO_LOSSES",
    "preference_loss",
    # kto
    "kto_kl",
    "kto_loss",
    # trpo
    "surrogate_loss",
    "mean_kl",
]
