"""The online RL loop shared by PPO, REINFORCE, RLOO and GRPO (manual optimisation in Lightning).

The algorithms differ only in a few orthogonal knobs of `OnlineRLConfig`, so a researcher can
change one factor at a time; the algorithm registry (`rlhf_lab.algorithms`) names the usual
combinations as presets and nothing more. One
training step is one iteration (Ouyang et al. 2022; Ziegler et al. 2019; Huang et al. 2024
"The N+ implementation details of RLHF with PPO"; Ahmadian et al. 2024 "Back to Basics"):

1. sample `samples_per_prompt` responses per prompt from the current policy (KV cache);
2. score each (prompt, response) with the reward source (a reward model, usually);
3. compute reference log-probs (and the critic's values when `baseline="critic"`), no gradients;
4. per-token rewards (`losses.shape_rewards`): the score on the last response token, minus
   β·KL_t on every response token when `kl_in="reward"` (with `kl_in="loss"` the KL is a loss
   term instead, `losses.kl_loss`, as in GRPO);
5. advantages in the rollout buffer: GAE(γ, λ) from the critic, or a REINFORCE baseline on the
   sequence return (`none`, `batch_mean`, `leave_one_out` = RLOO, `group_norm` = GRPO), the
   group baselines grouping rows by the rollout's `group_ids`;
6. `ppo_epochs` passes of shuffled minibatches of the policy-gradient loss (clipped when
   `clip_ratio` is set), plus the clipped value loss when there is a critic, combined by
   `losses.online_objective`; or, with `update="trpo"`, one trust-region step
   (`rlhf_lab.optim.trpo_step`) on the same objective.

The stage gathers tensors and calls `rlhf_lab.losses`; it computes no loss itself, and it does
not evaluate itself (`val/` metrics come from `rlhf_lab.eval.EvalCallback`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf_lab.checks import check_choice, check_positive, check_unit_interval
from rlhf_lab.data.sampler import shard_bounds
from rlhf_lab.distributed import all_max, all_sum, broadcast, collective_device, rank, world_size
from rlhf_lab.losses import (
    AGGREGATIONS,
    BASELINES,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    SURROGATES,
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus,
    kl_k1,
    kl_loss,
    masked_mean,
    mean_kl,
    online_objective,
    overlong_penalty,
    ppo_policy_loss,
    ppo_value_loss,
    rollout_correction_weights,
    shape_rewards,
    surrogate_loss,
)
from rlhf_lab.optim import trpo_step
from rlhf_lab.policy import Policy, first_scored_column
from rlhf_lab.rewards.checks import check_scores
from rlhf_lab.rollout import Rollout, RolloutBuffer
from rlhf_lab.stages.common import (
    Budget,
    ResumableStage,
    ShardableStage,
    adamw_optimizer,
    global_means,
)

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


@dataclass
class OnlineRLConfig:
    """Hyperparameters of one online RL run; the defaults are PPO's. Field names are DESIGN.md's knobs.

    A knob that has no effect in the chosen mode (`update`, `baseline`, `kl_target`) must stay at
    its default: setting it is a ValueError that names the knob and the mode, never silently
    ignored (see `_reject_inert_knobs`).
    """

    algorithm: str = "ppo"  # a label for logs and summaries; set by `preset`, changes nothing else
    baseline: str = "critic"  # critic (GAE) | none | batch_mean | leave_one_out | group_norm
    kl_in: str = "reward"  # where the KL to the reference goes: "reward" (per token) or "loss"
    update: str = "gradient"  # "gradient": K epochs of minibatch AdamW; "trpo": one trust-region step
    max_kl: float = 0.01  # TRPO: bound on the mean KL(π_old ‖ π) of one step
    cg_iters: int = 10  # TRPO: conjugate-gradient iterations for the natural gradient
    cg_damping: float = 0.1  # TRPO: damping added to the Fisher matrix
    line_search_steps: int = 10  # TRPO: backtracking steps (step halves each time)
    lr: float = 1e-4  # AdamW learning rate of the policy (and of a value head on it)
    critic_lr: float | None = None  # learning rate of a separate critic (model, or LoRA adapter + head); None = lr
    prompts_per_step: int = 16  # prompts sampled per iteration
    samples_per_prompt: int = 1  # responses per prompt (G)
    max_new_tokens: int = 8  # response length limit
    temperature: float = 1.0  # sampling temperature; log-probs use the same temperature
    top_p: float = 1.0  # nucleus sampling mass
    ppo_epochs: int = 4  # passes over each batch of rollouts (K)
    minibatches: int = 2  # minibatches per pass
    clip_ratio: float | None = 0.2  # ε (ε_low) of the clipped surrogate; None = plain policy gradient
    clip_ratio_high: float | None = None  # ε_high of the clip range [1-ε, 1+ε_high] (DAPO clip-higher); None = ε
    dual_clip: float | None = None  # c > 1: the loss of a negative advantage is at most -c·A (dual-clip PPO)
    surrogate: str = "clip"  # "clip" (PPO's min of clipped and unclipped) or "cispo" (clipped, stopped IS weight)
    ratio_level: str = "token"  # "token" or "sequence" importance ratio
    aggregation: str = "token_mean"  # token_mean | seq_mean | seq_mean_token_sum_norm (÷ max_new_tokens)
    value_clip: float | None = 0.2  # clip range of the value update; None = unclipped
    vf_coef: float = 0.5  # weight of the value loss
    entropy_coef: float = 0.0  # weight of the entropy bonus
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE λ
    kl_coef: float = 0.05  # β, weight of the KL penalty (in the reward or the loss, see kl_in)
    kl_estimator: str = "k1"  # per-token KL estimator in the penalty: k1, k2 or k3
    kl_target: float | None = None  # adaptive KL controller target (per-sequence KL); None = fixed β
    kl_horizon: int = 10000  # adaptive controller horizon, in samples
    kl_ratio_weighted: bool = False  # kl_in="loss": weight each token's KL term by π/π_old (unbiased off-policy)
    returns: str = "sequence"  # REINFORCE baselines: "sequence" (summed reward, every token) or "to_go"
    whiten_advantages: bool = True  # normalise advantages over the (global) batch
    missing_eos_penalty: float = 0.0  # subtracted from the score of responses that hit the limit
    overlong_buffer: float | None = None  # DAPO: last fraction of max_new_tokens with a linear length penalty
    overlong_penalty: float = 1.0  # the length penalty at max_new_tokens (with overlong_buffer)
    dynamic_sampling: bool = False  # DAPO: drop groups whose scores are all equal, sample more prompts
    max_sampling_rounds: int = 3  # dynamic_sampling: sampling rounds per iteration at most
    rollout_correction: str | None = None  # "tis" | "mis": correct for sampling vs training log-probs
    rollout_correction_level: str = "token"  # "token" or "sequence" importance weight
    rollout_correction_cap: float = 2.0  # the weight's cap (tis: truncated at it; mis: above it masked)
    micro_batch_size: int | None = None  # rows per forward/backward pass (memory bound); None = a minibatch
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    weight_decay: float = 0.0  # AdamW decoupled weight decay

    def __post_init__(self):
        # Read the registries now, not at import, so an estimator or variant added to them is accepted.
        check_choice("baseline", self.baseline, ("critic", *BASELINES))
        check_choice("kl_in", self.kl_in, ("reward", "loss"))
        if self.baseline == "leave_one_out" and self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2 for baseline 'leave_one_out' (RLOO)")
        for grouped in ("group_norm", "group_mean"):
            if self.baseline == grouped and self.samples_per_prompt < 2:
                raise ValueError(f"samples_per_prompt must be >= 2 for baseline {grouped!r} (a group baseline)")
        check_choice("surrogate", self.surrogate, tuple(SURROGATES))
        check_choice("returns", self.returns, ("sequence", "to_go"))
        if self.returns == "to_go" and self.baseline in ("critic", "group_norm"):
            raise ValueError(f"returns='to_go' subtracts a baseline from each token's return-to-go; baseline "
                             f"{self.baseline!r} is not one (use none, batch_mean, leave_one_out or group_mean)")
        if self.clip_ratio_high is not None:
            check_positive("clip_ratio_high", self.clip_ratio_high)
        if self.surrogate == "cispo" and self.clip_ratio is None and self.clip_ratio_high is None:
            raise ValueError("surrogate 'cispo' clips its importance weight: set clip_ratio_high (and clip_ratio "
                             "for a lower bound)")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (the bound is dual_clip × |A|), got {self.dual_clip}")
        if self.overlong_buffer is not None and not 0 < self.overlong_buffer <= 1:
            raise ValueError(f"overlong_buffer must be a fraction of max_new_tokens in (0, 1], got {self.overlong_buffer}")
        check_positive("overlong_penalty", self.overlong_penalty, allow_zero=True)
        check_positive("max_sampling_rounds", self.max_sampling_rounds)
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError("dynamic_sampling keeps groups whose scores differ: it needs samples_per_prompt >= 2")
        if self.rollout_correction is not None:
            check_choice("rollout_correction", self.rollout_correction, ("tis", "mis"))
        check_choice("rollout_correction_level", self.rollout_correction_level, ("token", "sequence"))
        if not self.rollout_correction_cap > 1:
            raise ValueError(f"rollout_correction_cap must be > 1, got {self.rollout_correction_cap}")
        check_choice("update", self.update, ("gradient", "trpo"))
        check_positive("max_kl", self.max_kl)
        check_positive("cg_iters", self.cg_iters)
        check_positive("cg_damping", self.cg_damping, allow_zero=True)
        check_positive("line_search_steps", self.line_search_steps, allow_zero=True)
        if self.kl_in == "loss" and self.kl_target is not None:
            raise ValueError("kl_target (adaptive KL) applies to kl_in='reward' only")
        check_positive("lr", self.lr)
        if self.critic_lr is not None:
            check_positive("critic_lr", self.critic_lr)
        check_positive("prompts_per_step", self.prompts_per_step)
        check_positive("samples_per_prompt", self.samples_per_prompt)
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        check_positive("ppo_epochs", self.ppo_epochs)
        check_positive("minibatches", self.minibatches)
        if self.micro_batch_size is not None:
            check_positive("micro_batch_size", self.micro_batch_size)
        if self.minibatches > self.prompts_per_step * self.samples_per_prompt:
            raise ValueError(
                f"minibatches ({self.minibatches}) must not exceed prompts_per_step × "
                f"samples_per_prompt ({self.prompts_per_step * self.samples_per_prompt})"
            )
        if self.clip_ratio is not None:
            check_positive("clip_ratio", self.clip_ratio)
        if self.value_clip is not None:
            check_positive("value_clip", self.value_clip)
        check_choice("ratio_level", self.ratio_level, tuple(RATIO_LEVELS))
        check_choice("aggregation", self.aggregation, tuple(AGGREGATIONS))
        check_choice("kl_estimator", self.kl_estimator, tuple(KL_ESTIMATORS))
        check_positive("vf_coef", self.vf_coef, allow_zero=True)
        check_positive("entropy_coef", self.entropy_coef, allow_zero=True)
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("lam", self.lam)
        check_positive("kl_coef", self.kl_coef, allow_zero=True)
        if self.kl_target is not None:
            check_positive("kl_target", self.kl_target)
        check_positive("kl_horizon", self.kl_horizon)
        check_positive("missing_eos_penalty", self.missing_eos_penalty, allow_zero=True)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        self._reject_inert_knobs()

    def _reject_inert_knobs(self) -> None:
        """Refuse a knob set away from its default in a mode where the code never reads it.

        Each rule is what the loop does: the TRPO step optimises the unclipped token-level
        surrogate (`surrogate_loss`) with no entropy or value term, and moves the policy outside
        AdamW, so without a critic no optimiser setting reaches anything (with a separate critic
        AdamW fits the critic alone, at `critic_lr` when set). The gradient update never reads the
        trust-region settings. Only a critic reads GAE's `gamma`, `lam`, and the value loss's
        `vf_coef`, `value_clip`, `critic_lr`. `kl_horizon` is the adaptive controller's, and that
        controller scales β multiplicatively, so with `kl_coef=0` it stays 0 and `kl_target` acts
        on nothing. Not refused: `ratio_level` with `clip_ratio=None` (the token and sequence
        ratios give different gradients once the policy has moved from the sampling policy, i.e.
        after the first minibatch, or on replayed rollouts).
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}

        def inert(names: tuple[str, ...], mode: str) -> None:
            for name in names:
                value = getattr(self, name)
                if value != defaults[name]:
                    raise ValueError(f"{name} has no effect with {mode} (got {value!r}); "
                                     "leave it at its default")

        if self.update == "trpo":
            inert(("clip_ratio", "ratio_level", "aggregation", "entropy_coef", "vf_coef", "micro_batch_size",
                   "clip_ratio_high", "dual_clip", "surrogate", "kl_ratio_weighted", "rollout_correction"),
                  "update='trpo'")
            if self.baseline != "critic":
                inert(("lr", "weight_decay", "max_grad_norm", "ppo_epochs", "minibatches"),
                      f"update='trpo' and baseline={self.baseline!r} (no critic to fit)")
            elif self.critic_lr is not None:
                inert(("lr",), "update='trpo' and critic_lr set (AdamW fits only the critic)")
        else:
            inert(("max_kl", "cg_iters", "cg_damping", "line_search_steps"), f"update={self.update!r}")
        if self.baseline != "critic":
            inert(("gamma", "lam", "vf_coef", "value_clip", "critic_lr"), f"baseline={self.baseline!r}")
        if self.clip_ratio is None and self.surrogate == "clip":
            inert(("clip_ratio_high", "dual_clip"), "clip_ratio=None (an unclipped policy gradient)")
        if self.surrogate == "cispo":
            inert(("dual_clip",), "surrogate='cispo' (its weight is clipped, never its loss)")
        if self.kl_in != "loss":
            inert(("kl_ratio_weighted",), f"kl_in={self.kl_in!r} (the reward's KL has no gradient)")
        elif self.kl_ratio_weighted and self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_ratio_weighted makes the gradient of k1 or k3 unbiased; with kl_estimator "
                             f"{self.kl_estimator!r} it is biased (its unweighted gradient already is the KL's "
                             "on-policy): use k3 or k1")
        if self.overlong_buffer is None:
            inert(("overlong_penalty",), "overlong_buffer=None")
        if not self.dynamic_sampling:
            inert(("max_sampling_rounds",), "dynamic_sampling=False")
        if self.rollout_correction is None:
            inert(("rollout_correction_level", "rollout_correction_cap"), "rollout_correction=None")
        if self.kl_target is None:
            inert(("kl_horizon",), "kl_target=None (a fixed KL coefficient)")
        elif self.kl_coef == 0:
            raise ValueError(f"kl_target has no effect with kl_coef=0 (got {self.kl_target!r}): the adaptive "
                             "controller scales β multiplicatively, so it stays 0; leave it at its default")

    @property
    def steps_per_iteration(self) -> int:
        """Trainer (optimiser) steps one iteration takes: what `Trainer(max_steps=...)` counts.

        Gradient updates take ppo_epochs × minibatches steps. A TRPO step moves the policy
        outside the optimiser, so an iteration counts as one step, or as the critic's
        ppo_epochs × minibatches steps when it trains a critic.
        """
        if self.update == "trpo" and self.baseline != "critic":
            return 1
        return self.ppo_epochs * self.minibatches

    @classmethod
    def preset(cls, name: str, **overrides) -> OnlineRLConfig:
        """The config of online RL algorithm `name` of the registry (`rlhf_lab.algorithms`): its
        preset knobs, with `overrides` on top."""
        from rlhf_lab.algorithms import ALGORITHMS, get_algorithm

        online = [n for n, a in ALGORITHMS.items() if a.stage == "online_rl"]
        check_choice("preset", name, online)
        return get_algorithm(name).config(**overrides)


# The PPO preset is the config's default, so PPOConfig() is a PPO run.
PPOConfig = OnlineRLConfig


class OnlineRL(ResumableStage, ShardableStage, L.LightningModule):
    """The online loop: sample, score, compute advantages, update (see the module docstring).

    Args:
        policy: a `Policy` with a reference (`reference="copy"`, or "base" with a LoRA adapter),
            and a critic (`scalar_head=True`, a separate `critic`, or `critic="adapter"`) when
            `config.baseline == "critic"`.
        prompts: the RL prompt set; one epoch of the train loader is one pass over it.
        reward_fn: the proxy reward source, `(prompts, completions) -> Tensor (B,)`.
        gold_fn: optional gold judge logged beside the proxy (`train/gold_reward`).
        replay: a saved `RolloutBuffer` (with `scores`) to train on instead of sampling: every
            iteration re-reads the same rollouts, so one fixed set of samples can go through
            PPO, RLOO, GRPO and REINFORCE for a controlled ablation. The group baselines group
            its rows by their `group_ids`.

    The stage does not evaluate itself: `val/` metrics come from `rlhf_lab.eval.EvalCallback`.
    """

    config_class = OnlineRLConfig

    def __init__(
        self,
        policy: Policy,
        prompts: list[str],
        reward_fn: RewardFn,
        config: OnlineRLConfig | None = None,
        gold_fn: RewardFn | None = None,
        replay: RolloutBuffer | None = None,
    ):
        super().__init__()
        self.config = config or OnlineRLConfig()
        name = self.config.algorithm
        if self.config.baseline == "critic" and not policy.has_values:
            raise ValueError(f"{name} (baseline='critic') needs a critic: build the Policy with "
                             "scalar_head=True or a critic")
        if not policy.has_reference:
            raise ValueError(f"{name} needs a reference policy: build the Policy with reference='copy'")
        if self.config.update == "trpo" and self.config.baseline == "critic" and not policy.has_separate_critic:
            raise ValueError("update='trpo' with baseline='critic' needs a separate critic model: a value "
                             "head would share the trunk that the trust-region step moves")
        self.policy = policy.disable_dropout()
        self.prompts = list(prompts)
        self.replay = replay
        if replay is not None:
            data = replay.data
            if data.scores is None:
                raise ValueError("replay buffer has no scores: save rollouts after they were scored")
            if self.config.baseline != "critic":
                if data.group_ids is None:
                    raise ValueError("replay buffer has no group_ids: save rollouts from Policy.generate")
                # Fail now, not at the first step, if the baseline cannot use these groups
                # (e.g. leave_one_out with a group of one sample).
                BASELINES[self.config.baseline](data.scores.float(), data.group_ids)
        self.reward_fn, self.gold_fn = reward_fn, gold_fn
        c = self.config
        self.kl_ctl = (
            AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)
            if c.kl_target is not None
            else FixedKLController(c.kl_coef)
        )
        self.buffer = RolloutBuffer(policy.tokenizer.pad_token_id)
        self.budget = Budget()
        self.history: list[dict] = []  # one row of train metrics per iteration, for plots and summaries
        # Per iteration: (rows, tokens) sampled by dynamic sampling, its (kept, sampled) groups, and
        # the rollout correction's metrics; reset at each training step.
        self._sampled, self._kept_groups, self._correction = (0, 0), None, None
        self._init_resumable()
        self.automatic_optimization = False
        self.save_hyperparameters({"stage": "online_rl", **asdict(c)})

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def make_rollout(self, prompts: list[str]) -> Rollout:
        """Sample, score and annotate a rollout (steps 1–4 of the module docstring).

        With `dynamic_sampling` (DAPO), groups whose training scores (`_training_scores`) are all
        equal carry no signal under a group baseline and are dropped; more prompts (as many as
        `prompts` again, drawn at random from the stage's prompts) are sampled until `prompts`'
        number of groups is kept or `max_sampling_rounds` rounds are spent. Every sample counts in
        the budget. When no group of any round differs, the first round is kept (its advantages
        are 0). `train/kept_groups` logs the fraction of sampled groups kept.
        """
        rollout = self._sample_and_score(prompts)
        if self.config.dynamic_sampling:
            rollout = self._keep_informative_groups(rollout, prompts)
        return self.annotate(rollout)

    def _sample_and_score(self, prompts: list[str]) -> Rollout:
        c, policy = self.config, self.policy
        # micro_batch_size bounds the rows of one generate call (whole prompts: groups stay whole).
        per_call = len(prompts) if c.micro_batch_size is None else max(1, c.micro_batch_size // c.samples_per_prompt)
        parts = [policy.generate(prompts[i:i + per_call], max_new_tokens=c.max_new_tokens,
                                 temperature=c.temperature, top_p=c.top_p, samples_per_prompt=c.samples_per_prompt)
                 for i in range(0, len(prompts), per_call)]
        rollout = parts[0] if len(parts) == 1 else Rollout.concat(parts, policy.tokenizer.pad_token_id)
        device, n = rollout.input_ids.device, len(rollout)
        # Checked where they enter: one finite score per row, else a RewardError naming the row.
        rollout.scores = check_scores(self.reward_fn(rollout.prompts, rollout.completions), n, self.reward_fn,
                                      rollout.prompts, device=device)
        self.budget.count(reward_calls=n)
        if self.gold_fn is not None:
            rollout.gold_scores = check_scores(self.gold_fn(rollout.prompts, rollout.completions), n, self.gold_fn,
                                               rollout.prompts, device=device, what="gold reward")
        return rollout

    def _keep_informative_groups(self, rollout: Rollout, prompts: list[str]) -> Rollout:
        c = self.config
        wanted, first = len(prompts), rollout
        kept: list[Rollout] = []
        n_kept = sampled = 0
        for round_ in range(c.max_sampling_rounds):
            if round_ > 0:  # more prompts, drawn from the global stream (saved in checkpoints)
                draw = torch.randint(len(self.prompts), (wanted,)).tolist()
                rollout = self._sample_and_score([self.prompts[i] for i in draw])
            # Every sampled row and token counts in the budget (at the iteration's end), kept or not.
            self._sampled = (self._sampled[0] + len(rollout), self._sampled[1] + int(rollout.response_mask.sum()))
            scores = self._training_scores(rollout)
            _, index = torch.unique(rollout.group_ids, return_inverse=True)
            n_groups = int(index.max()) + 1
            high = torch.full((n_groups,), -torch.inf, device=scores.device).scatter_reduce(0, index, scores, "amax")
            low = torch.full((n_groups,), torch.inf, device=scores.device).scatter_reduce(0, index, scores, "amin")
            informative = (high > low).nonzero().flatten()[: wanted - n_kept]
            sampled += n_groups
            if len(informative):
                rows = torch.isin(index, informative).nonzero().flatten()
                kept.append(rollout.index(rows))
                n_kept += len(informative)
            if n_kept >= wanted:
                break
        self._kept_groups = (n_kept, sampled)
        if not kept:
            return first
        return kept[0] if len(kept) == 1 else Rollout.concat(kept, self.policy.tokenizer.pad_token_id)

    def _training_scores(self, rollout: Rollout) -> torch.Tensor:
        """The scores the update learns from: the reward's, minus DAPO's overlong penalty when
        `overlong_buffer` is set (`losses.overlong_penalty`; `train/reward` logs the reward's own)."""
        c = self.config
        if c.overlong_buffer is None:
            return rollout.scores
        buffer = max(1, round(c.overlong_buffer * c.max_new_tokens))
        penalty = overlong_penalty(rollout.response_lengths.to(rollout.scores.dtype), c.max_new_tokens, buffer,
                                   c.overlong_penalty)
        return rollout.scores + penalty

    @torch.no_grad()
    def annotate(self, rollout: Rollout) -> Rollout:
        """Reference log-probs (if missing), values, per-token rewards and, with
        `rollout_correction`, the trainer's own log-probs and the importance weights, under this config.

        Works on fresh rollouts and on replayed ones: a stored rollout keeps its tokens, its
        sampling log-probs and its scores, and each algorithm builds its own rewards and
        advantages from them.

        `rollout_correction` ("tis" / "mis"): the sampling log-probs (recorded by `generate`, in its
        precision, or stored with a replayed buffer) need not equal what the trainer computes. The
        trainer's log-probs before the update (`train_logprobs`) become π_old of the ratio, and each
        token's loss is weighted by π_old / π_sample, truncated or masked at
        `rollout_correction_cap` (`losses.rollout_correction_weights`); `train/sampling_logprob_diff`
        logs the mean |log π_old − log π_sample|.
        """
        c, policy = self.config, self.policy
        ids, attn = rollout.input_ids, rollout.attention_mask
        start = first_scored_column(rollout.response_mask)  # the prompt's positions need no LM head
        if rollout.ref_logprobs is None:
            rollout.ref_logprobs = self._in_chunks(lambda i, a: policy.ref_logprobs(i, a, c.temperature, start=start),
                                                   ids, attn)
        if c.baseline == "critic":
            rollout.values = self._in_chunks(lambda i, a: policy.values(i, a, start=start), ids,
                                             attn) * rollout.response_mask.float()
        if c.rollout_correction is not None:
            rollout.train_logprobs = self._in_chunks(lambda i, a: policy.logprobs(i, a, c.temperature, start=start),
                                                     ids, attn)
            rollout.is_weights, self._correction = rollout_correction_weights(
                rollout.train_logprobs, rollout.logprobs, rollout.response_mask, mode=c.rollout_correction,
                level=c.rollout_correction_level, cap=c.rollout_correction_cap)
        rollout.rewards = shape_rewards(
            self._training_scores(rollout), rollout.logprobs, rollout.ref_logprobs, rollout.response_mask,
            kl_coef=self.kl_ctl.value, kl_estimator=c.kl_estimator, kl_in_reward=c.kl_in == "reward",
            ended_with_eos=rollout.ended_with_eos, missing_eos_penalty=c.missing_eos_penalty)
        return rollout

    def setup(self, stage: str) -> None:
        if self.config.update == "trpo" and (self.trainer.world_size > 1 or self.policy.is_sharded):
            raise ValueError(f"update='trpo' trains on one process, not {self.trainer.world_size}: its "
                             "conjugate-gradient step and line search are not distributed")

    def _in_chunks(self, fn, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """`fn(ids, attn)` over row chunks of `micro_batch_size` (one call when None)."""
        size = self.config.micro_batch_size
        if size is None or size >= len(ids):
            return fn(ids, attn)
        return torch.cat([fn(ids[i:i + size], attn[i:i + size]) for i in range(0, len(ids), size)])

    # ------------------------------------------------------------------ update
    def training_step(self, prompts: list[str], batch_idx: int) -> None:
        c = self.config
        optimizer = self.optimizers()
        self._sampled, self._kept_groups, self._correction = (0, 0), None, None
        # A sharded policy is gathered once for the whole rollout: each rank then runs as many
        # generate calls and reference/value chunks as its own rows need.
        with self.policy.gathered():
            if self.replay is None:
                rollout = self.make_rollout(prompts)
            else:  # the same stored rollouts every iteration: no sampling, no reward calls
                rollout = self.annotate(self._replay_share().to(self.device))
        self.buffer.clear()
        self.buffer.add(rollout)
        estimator = "gae" if c.baseline == "critic" else c.baseline
        reduce = all_sum if world_size() > 1 else None  # whitening and batch_mean over the global batch
        rollout = self.buffer.compute_advantages(estimator, gamma=c.gamma, lam=c.lam, whiten=c.whiten_advantages,
                                                 reduce=reduce, returns=c.returns)
        if c.update == "trpo":
            self._log_iteration(rollout, self._trpo_update(rollout, optimizer), c.steps_per_iteration)
            return
        sums: dict[str, float] = defaultdict(float)
        n_updates = 0
        for mb in self.buffer.minibatches(c.minibatches, c.ppo_epochs, **self._layout(len(rollout))):
            for key, value in self._update(mb, optimizer).items():
                sums[key] += value
            n_updates += 1
        self._log_iteration(rollout, {k: v / n_updates for k, v in sums.items()}, n_updates)

    def _layout(self, n_local: int) -> dict:
        """Where this process's rows sit in the global batch, for `RolloutBuffer.minibatches`: on
        several processes every pass shuffles the global batch with rank 0's permutation."""
        world = world_size()
        if world == 1:
            return {}
        me = rank()
        sizes = all_sum(torch.nn.functional.one_hot(torch.tensor(me), world).double() * n_local)
        sizes = [int(x) for x in sizes.tolist()]

        def permutation(total: int) -> torch.Tensor:
            order = torch.randperm(total) if me == 0 else torch.empty(total, dtype=torch.long)
            return broadcast(order.to(collective_device()), src=0).cpu()

        return {"offset": sum(sizes[:me]), "total": sum(sizes), "permutation": permutation}

    def _update(self, mb: Rollout, optimizer) -> dict[str, float]:
        """One optimiser step on minibatch `mb` (this process's rows of it; maybe none).

        On one process without `micro_batch_size` this is one forward and backward on `mb`.
        Otherwise the rows go through in chunks of `micro_batch_size`, each chunk's loss being
        its share of the global minibatch's (sums divided by the global token and sequence
        counts, `counts=`), and the gradients add up before the step: the update is the same on
        1 process, N ranks, or N micro-batches. Every rank runs the same number of chunks (a rank
        with fewer rows runs a zero-weighted one), so DDP's gradient all-reduce stays in step.
        Returns the step's metrics (global).
        """
        c, world = self.config, world_size()
        if world == 1 and c.micro_batch_size is None:
            loss, metrics = self._minibatch_loss(mb, None)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return {k: float(v) for k, v in metrics.items()}
        mask = mb.response_mask
        local = torch.tensor([float(mask.sum()), float((mask != 0).any(dim=-1).sum())], dtype=torch.float64)
        tokens, sequences = (max(x, 1.0) for x in all_sum(local.to(collective_device())).cpu().tolist())
        size = c.micro_batch_size or max(len(mb), 1)
        n_chunks = -(-len(mb) // size)
        n_steps = int(all_max(torch.tensor(max(n_chunks, 1)).to(collective_device())))
        optimizer.zero_grad()
        sums: dict[str, float] = defaultdict(float)
        for i in range(n_steps):
            if i < n_chunks:
                part, weight = mb.index(torch.arange(i * size, min((i + 1) * size, len(mb)), device=mask.device)), 1.0
            else:  # no rows left here: a zero-weighted pass over one buffered row
                part, weight = self.buffer.data.index(torch.zeros(1, dtype=torch.long, device=mask.device)), 0.0
            loss, metrics = self._minibatch_loss(part, (tokens, sequences))
            # DDP averages gradients over the ranks; each rank's loss is its share of the sum.
            self.manual_backward(loss * (weight * world))
            for key, value in metrics.items():
                sums[key] += weight * float(value)
        optimizer.step()
        keys = sorted(sums)
        totals = all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64).to(collective_device()))
        return dict(zip(keys, totals.cpu().tolist(), strict=True))

    def _minibatch_loss(self, mb: Rollout, counts: tuple[float, float] | None) -> tuple[torch.Tensor, dict]:
        """The online objective on rows `mb`; with `counts` (tokens, sequences of the global
        minibatch) its share of the minibatch's loss (see `ppo_policy_loss`)."""
        c = self.config
        tokens = None if counts is None else counts[0]
        start = first_scored_column(mb.response_mask)
        if c.baseline == "critic":
            logprobs, entropy, values = self.policy.logprobs_and_values(mb.input_ids, mb.attention_mask, c.temperature,
                                                                        start=start)
        else:
            logprobs, entropy = self.policy.logprobs(mb.input_ids, mb.attention_mask, c.temperature,
                                                     return_entropy=True, start=start)
        # π_old: the trainer's own log-probs before the update when rollout_correction recorded
        # them, else the sampling log-probs.
        old = mb.logprobs if mb.train_logprobs is None else mb.train_logprobs
        norm = c.max_new_tokens if c.aggregation == "seq_mean_token_sum_norm" else None
        # CISPO without its own ε_high clips its weight in PPO's symmetric range.
        high = c.clip_ratio if c.surrogate == "cispo" and c.clip_ratio_high is None else c.clip_ratio_high
        policy_loss, pm = ppo_policy_loss(
            logprobs, old, mb.advantages, mb.response_mask, clip_ratio=c.clip_ratio,
            ratio_level=c.ratio_level, aggregation=c.aggregation, counts=counts, clip_ratio_high=high,
            dual_clip=c.dual_clip, surrogate=c.surrogate, is_weights=mb.is_weights, norm_length=norm)
        ent, _ = entropy_bonus(entropy, mb.response_mask, tokens=tokens)
        value_loss = kl_term = None
        if c.baseline == "critic":
            value_loss, _ = ppo_value_loss(values, mb.values, mb.returns, mb.response_mask, clip_value=c.value_clip,
                                           tokens=tokens)
        if c.kl_in == "loss":
            # GRPO puts the KL in the loss (Shao et al. 2024), with gradients through logprobs.
            kl_term, _ = kl_loss(logprobs, mb.ref_logprobs, mb.response_mask, c.kl_estimator, tokens=tokens,
                                 old_logprobs=old if c.kl_ratio_weighted else None)
        loss, terms = online_objective(
            policy_loss, ent, value_loss, kl_term, entropy_coef=c.entropy_coef,
            vf_coef=c.vf_coef if value_loss is not None else 0.0,
            kl_coef=self.kl_ctl.value if kl_term is not None else 0.0)
        extra = {"dual_clipfrac": pm["dual_clipfrac"]} if "dual_clipfrac" in pm else {}
        return loss, {**terms, "clipfrac": pm["clipfrac"], "approx_kl": pm["approx_kl"], **extra}

    def _replay_share(self) -> Rollout:
        """The replayed rollouts this process trains on: all of them on one process, else its
        contiguous share of their groups (a group never straddles processes)."""
        data = self.replay.data
        if world_size() == 1:
            return dataclasses.replace(data)
        groups = list(dict.fromkeys(data.group_ids.tolist()))  # in order of first appearance
        start, end = shard_bounds(len(groups), rank(), world_size())
        mine = torch.tensor([g in set(groups[start:end]) for g in data.group_ids.tolist()])
        return data.index(mine.nonzero().flatten())

    def _trpo_update(self, data: Rollout, optimizer) -> dict[str, float]:
        """One trust-region step of the policy on the whole batch (Schulman et al. 2015).

        The natural-gradient direction comes from conjugate gradient on the Fisher-vector product
        of the KL to the sampling policy, and the backtracking line search accepts a step only if
        the mean KL stays within `max_kl` and the surrogate improves. Practical for tiny models and
        adapters: it holds a few flat copies of the trainable policy weights. A separate critic,
        when there is one, is then fitted by AdamW on the value loss.
        """
        c = self.config
        ids, attn, mask = data.input_ids, data.attention_mask, data.response_mask
        start = first_scored_column(mask)
        critic_ids = {id(p) for p in self.policy.critic_parameters()}
        actor = [p for p in self.policy.trainable_parameters() if id(p) not in critic_ids]
        if self.policy.scalar_head is not None:
            head = {id(p) for p in self.policy.scalar_head.parameters()}
            actor = [p for p in actor if id(p) not in head]

        def loss_fn() -> torch.Tensor:
            logprobs = self.policy.logprobs(ids, attn, c.temperature, start=start)
            policy_loss, _ = surrogate_loss(logprobs, data.logprobs, data.advantages, mask)
            if c.kl_in != "loss":
                return online_objective(policy_loss)[0]
            kl_term, _ = kl_loss(logprobs, data.ref_logprobs, mask, c.kl_estimator)
            return online_objective(policy_loss, kl_term=kl_term, kl_coef=self.kl_ctl.value)[0]

        def kl_fn() -> torch.Tensor:
            return mean_kl(self.policy.logprobs(ids, attn, c.temperature, start=start), data.logprobs, mask)

        with torch.no_grad():
            before = float(loss_fn())
        with self.policy.eager_attention():
            stats = trpo_step(actor, loss_fn, kl_fn, max_kl=c.max_kl, cg_iters=c.cg_iters,
                              damping=c.cg_damping, max_backtracks=c.line_search_steps)
        with torch.no_grad():
            _, entropy = self.policy.logprobs(ids, attn, c.temperature, return_entropy=True, start=start)
        out = {"policy_loss": before, "loss": before, "approx_kl": stats["kl"], "clipfrac": 0.0,
               "entropy": float(masked_mean(entropy, mask)), "trpo_accepted": stats["accepted"],
               "trpo_step_fraction": stats["step_fraction"]}
        if c.baseline == "critic":
            values_loss = 0.0
            for mb in self.buffer.minibatches(c.minibatches, c.ppo_epochs):
                scored = first_scored_column(mb.response_mask)  # not `start`: loss_fn and kl_fn read that
                values = self.policy.values(mb.input_ids, mb.attention_mask, start=scored)
                value_loss, _ = ppo_value_loss(values, mb.values, mb.returns, mb.response_mask, clip_value=c.value_clip)
                optimizer.zero_grad()
                self.manual_backward(value_loss)
                optimizer.step()
                values_loss += float(value_loss.detach())
            out["value_loss"] = values_loss / c.steps_per_iteration
        else:
            # No optimiser moved the policy; one empty step keeps the Trainer's step count (and
            # with it max_steps and logging) in iterations.
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
        return out

    def _log_iteration(self, rollout: Rollout, update: dict, n_updates: int) -> None:
        mask = rollout.response_mask.float()
        n, tokens = len(rollout), float(mask.sum())
        # train/kl is always k1 on the sampled tokens, summed per sequence, so algorithms compare.
        seq_kl = (kl_k1(rollout.logprobs, rollout.ref_logprobs) * mask).sum(dim=1).mean()
        # Dynamic sampling may have sampled more rows than it kept: every sampled row counts.
        rows, generated = self._sampled if self._sampled[0] else (n, int(tokens))
        n_global = self.budget.count(samples=rows, generated_tokens=generated)["samples"]
        self.budget.optimizer_steps += n_updates
        # Means over the global batch: per row, and per response token.
        per_row = {"train/reward": rollout.scores.mean(), "train/kl": seq_kl,
                   "train/response_length": mask.sum(dim=1).mean()}
        if rollout.gold_scores is not None:
            per_row["train/gold_reward"] = rollout.gold_scores.mean()
        per_token = {"train/advantage_std": masked_mean(rollout.advantages ** 2, mask)}
        if rollout.values is not None:
            per_token["train/value_mean"] = masked_mean(rollout.values, mask)
        per_row, per_token = global_means(per_row, n), global_means(per_token, tokens)
        metrics = {f"train/{k}": v for k, v in update.items()}
        metrics.update({k: per_row[k] for k in ("train/reward", "train/kl", "train/response_length")})
        metrics["train/advantage_std"] = per_token["train/advantage_std"] ** 0.5
        metrics["train/kl_coef"] = float(self.kl_ctl.value)
        if "train/value_mean" in per_token:
            metrics["train/value_mean"] = per_token["train/value_mean"]
        if self._correction is not None:  # rollout_correction: the sampling/training mismatch
            corr = global_means({k: v for k, v in self._correction.items()}, tokens)
            metrics.update({f"train/{k}": v for k, v in corr.items()})
        if self._kept_groups is not None:  # dynamic sampling: kept / sampled groups, over every rank
            kept, total = all_sum(torch.tensor(self._kept_groups, dtype=torch.float64).to(collective_device())).tolist()
            metrics["train/kept_groups"] = kept / max(total, 1.0)
        # train/kl_coef is the β this iteration used; the controller then adapts it for the next.
        self.kl_ctl.update(per_row["train/kl"], n_global)
        if "train/gold_reward" in per_row:
            metrics["train/gold_reward"] = per_row["train/gold_reward"]
        metrics.update(self.budget.metrics())
        bar = {"train/reward", "train/gold_reward", "train/kl"}
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key in bar, batch_size=len(rollout))
        self.history.append({"iteration": len(self.history) + 1, **metrics})

    # ------------------------------------------------------------------ wiring
    def stage_state(self) -> dict:
        return {**super().stage_state(), "history": list(self.history), "kl_coef": float(self.kl_ctl.value)}

    def load_stage_state(self, state: dict) -> None:
        super().load_stage_state(state)
        self.history = list(state["history"])
        self.kl_ctl.value = state["kl_coef"]  # the adaptive controller's β (fixed: unchanged)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip each parameter group's gradient norm on its own.

        With a separate critic the groups are (actor, critic), so the critic's larger gradients
        never shrink the policy's step; one optimiser keeps one Trainer step per update. Lightning
        calls this inside `optimizer.step()`, after fp16 loss scaling has unscaled the gradients,
        so the true gradients are clipped.
        """
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], self.config.max_grad_norm)

    def configure_optimizers(self):
        c, policy = self.config, self.policy
        params = policy.trainable_parameters()
        if policy.has_separate_critic:  # a critic model, or a critic adapter and its value head
            critic = {id(p) for p in policy.critic_parameters()}
            params = [{"params": [p for p in params if id(p) not in critic]},
                      {"params": [p for p in params if id(p) in critic], "lr": c.critic_lr or c.lr}]
        return adamw_optimizer(params, lr=c.lr, weight_decay=c.weight_decay)

    def train_dataloader(self) -> DataLoader:
        c = self.config
        return self.make_loader(self.prompts, c.prompts_per_step, True, list,
                                drop_last=len(self.prompts) >= c.prompts_per_step)


# PPO is the online loop at its default (PPO) preset.
PPO = OnlineRL
