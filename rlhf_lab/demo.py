"""The demo: the whole pipeline (pretrain → SFT → reward model → RL) on a built-in task.

A tiny GPT-2 (or any named tiny config, toy model, or local HF folder) is trained on CPU in a few
minutes on the arithmetic task (default) or the alice task. Preference pairs for the reward
model come from sampling the SFT policy and ranking its samples with the task's gold judge; the RL
algorithm (PPO by default) then optimises the *learned* reward model while the gold judge measures what really happened.
Everything a run produces lands in one folder (see `run_demo`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import lightning as L
import torch

from rlhf_lab.eval import greedy_completions
from rlhf_lab.losses import kl_k1
from rlhf_lab.models.backbones import backbone_names, build_tiny_model, load_backbone
from rlhf_lab.models.lora import LoraSettings
from rlhf_lab.models.tokenizer import load_tokenizer, train_bpe_tokenizer
from rlhf_lab.policy import Policy
from rlhf_lab.rewards import CallableSource, RewardModelSource
from rlhf_lab.runs import LoggerConfig, finish_loggers, make_trainer
from rlhf_lab.stages import (
    DPO,
    SFT,
    DPOConfig,
    OnlineDPO,
    OnlineRL,
    OnlineRLConfig,
    Pretrain,
    PretrainConfig,
    RewardModel,
    RewardModelConfig,
    SFTConfig,
)
from rlhf_lab.tasks import get_task


@dataclass
class DemoConfig:
    """Budgets of the demo's stages. The defaults are tuned to finish in minutes on 2 CPU cores."""

    seed: int = 0
    task: str = "arithmetic"  # a name in rlhf_lab.tasks.TASKS
    backbone: str = "gpt2-tiny"  # a named tiny config or toy model, or a local HF model folder
    lora: LoraSettings | None = None  # LoRA on the policy's last stage (reference = adapter off)
    pretrain_steps: int = 1000
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(lr=3e-3, batch_size=32, block_size=64))
    sft_steps: int = 60
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(lr=1e-3, batch_size=32))
    pair_samples: int = 32  # SFT samples per prompt ranked by the gold judge into preference pairs
    pair_temperature: float = 1.5  # hot sampling gives the reward model varied wrong answers
    reward_steps: int = 1500
    reward: RewardModelConfig = field(default_factory=lambda: RewardModelConfig(lr=3e-4, batch_size=32))
    # RL iterations; None = each algorithm's default in RL_ITERATIONS (equal wall time, not equal
    # iterations: a REINFORCE-family iteration costs about a third of a PPO one).
    rl_iterations: int | None = None
    dpo_steps: int = 300  # offline DPO optimiser steps on the gold-ranked pairs
    # α = 1 NLL on the chosen answer (RPO): plain DPO pushed the chosen answers down with the
    # rejected ones here and lowered greedy gold accuracy (see docs/algorithms.md).
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(
        variant="sigmoid", beta=0.1, lr=2e-4, batch_size=32, nll_coef=1.0))
    online_dpo: DPOConfig = field(default_factory=lambda: DPOConfig(
        variant="sigmoid", beta=0.1, lr=2e-4, batch_size=64))
    # Knobs every algorithm shares in the demo (an equal budget of 256 samples per iteration) ...
    rl_shared: dict = field(default_factory=lambda: dict(
        prompts_per_step=64, samples_per_prompt=4, missing_eos_penalty=1.0, kl_coef=0.05))
    # ... and each one's own settings on top of its preset.
    rl_overrides: dict = field(default_factory=lambda: {
        "ppo": dict(lr=2e-4, critic_lr=1e-3, ppo_epochs=2, minibatches=4, vf_coef=0.1),
        "reinforce": dict(lr=1e-4, minibatches=4),
        "rloo": dict(lr=2e-4, minibatches=4, kl_coef=0.1),
        "grpo": dict(lr=2e-4, minibatches=4, kl_coef=0.1),
        # Each Fisher-vector product is a double backward over the batch (~1 s for 256 samples
        # here), so TRPO takes a quarter of the batch and 5 CG iterations.
        "trpo": dict(max_kl=0.01, prompts_per_step=16, cg_iters=5),
    })
    eval_every: int = 10  # RL iterations between greedy evaluations on the eval prompts
    max_new_tokens: int | None = None  # generation length everywhere; None = the task's own
    vocab_size: int | None = None  # BPE size of the trained tokenizer; None = the task's own


    def iterations(self, algorithm: str) -> int:
        """RL iterations of `algorithm` (online ones): `rl_iterations`, else its RL_ITERATIONS entry."""
        return self.rl_iterations if self.rl_iterations is not None else RL_ITERATIONS[algorithm]

    def rl_config(self, algorithm: str, max_new_tokens: int = 6) -> OnlineRLConfig:
        """The algorithm's preset with the demo's shared and per-algorithm settings on top."""
        return OnlineRLConfig.preset(algorithm, max_new_tokens=max_new_tokens,
                                     **{**self.rl_shared, **self.rl_overrides.get(algorithm, {})})


RL_ALGORITHMS = ("ppo", "reinforce", "rloo", "grpo", "trpo")
# Default iterations per online algorithm, set for roughly equal wall time on 2 CPU cores
# (45-65 s): a PPO iteration takes 8 optimiser steps with a critic, a REINFORCE/RLOO/GRPO one 4.
RL_ITERATIONS = {"ppo": 60, "reinforce": 150, "rloo": 150, "grpo": 150, "trpo": 120, "online_dpo": 60}
ALGORITHMS = (*RL_ALGORITHMS, "dpo", "online_dpo")


def build_preference_pairs(policy: Policy, prompts: list[str], judge, samples: int, temperature: float,
                           max_new_tokens: int, seed: int, max_pairs_per_prompt: int = 16) -> list[dict]:
    """Sample `samples` completions per prompt and pair gold-better ones with worse ones.

    For every prompt whose samples disagree, each distinct completion is paired with each distinct
    completion the judge scores lower (at most `max_pairs_per_prompt` pairs, drawn at random), so
    the reward model learns from real policy outputs ranked by the judge. Returns the pairs as
    `{"prompt", "chosen", "rejected"}` rows (`rank_into_pairs`).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    rollout = policy.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                              samples_per_prompt=samples, generator=gen)
    scores = judge(rollout.prompts, rollout.completions)
    return rank_into_pairs(rollout.prompts, rollout.completions, scores, rng, max_pairs_per_prompt)


def rank_into_pairs(prompts: list[str], completions: list[str], scores, rng: random.Random,
                    max_pairs_per_prompt: int = 16) -> list[dict]:
    """Preference pairs from scored samples: per prompt, each distinct completion against each lower one.

    `prompts[i]`, `completions[i]`, `scores[i]` describe sample i (any order; a prompt may recur).
    Samples are grouped by prompt (in order of first appearance); a completion seen twice keeps
    its first score. Within a prompt, every distinct completion is paired with every distinct
    completion that scored strictly lower; a prompt with more than `max_pairs_per_prompt` such
    pairs keeps a random subset drawn with `rng`. Returns `{"prompt", "chosen", "rejected"}` rows.
    """
    groups: dict[str, dict[str, float]] = {}
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        groups.setdefault(prompt, {}).setdefault(completion, float(score))
    pairs = []
    for prompt, scored_map in groups.items():
        scored = sorted(scored_map.items())
        combos = [(a, b) for a, sa in scored for b, sb in scored if sa > sb]
        if len(combos) > max_pairs_per_prompt:
            combos = rng.sample(combos, max_pairs_per_prompt)
        pairs.extend({"prompt": prompt, "chosen": a, "rejected": b} for a, b in combos)
    return pairs


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"== {title} ", *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
    return "\n".join(lines)


def _mark(score: float) -> str:
    """✓ for a full gold score, ✗ for zero, the score itself for partial credit (graded judges)."""
    return "✓" if score >= 1 else "✗" if score <= 0 else f"{score:.2f}"


def _samples_table(prompts: list[str], before: list[str], after: list[str], judge, n: int = 8) -> str:
    """Greedy answers before and after RL: some it fixed, some it broke, some unchanged."""
    ok_before, ok_after = judge(prompts, before), judge(prompts, after)
    fixed = [i for i in range(len(prompts)) if ok_after[i] > ok_before[i]]
    broke = [i for i in range(len(prompts)) if ok_after[i] < ok_before[i]]
    same = [i for i in range(len(prompts)) if ok_after[i] == ok_before[i]]
    rows = fixed[: n // 2] + broke[: n // 4]
    rows += same[: n - len(rows)]
    lines = [f"== generations before and after RL (greedy; RL fixed {len(fixed)} answers and broke "
             f"{len(broke)} of {len(prompts)})"]
    for i in rows:
        q = prompts[i].replace("\n", " ")
        lines.append(f"  {q:<14} sft: {before[i]!r:<8} {_mark(ok_before[i])}   "
                     f"rl: {after[i]!r:<8} {_mark(ok_after[i])}")
    return "\n".join(lines)


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


# The gold judge's mean score: the fraction correct on arithmetic (0/1 judge), a graded 0-1 score
# on alice.
GOLD_AXIS = "gold score (mean judge score; arithmetic: fraction correct)"


def _plot(history: list[dict], path: str, algorithm: str, start_accuracy: float, end_accuracy: float,
          task: str = "arithmetic") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if not history:  # offline DPO has no iterations: show gold accuracy before and after
        ax.bar(["SFT", algorithm.upper()], [start_accuracy, end_accuracy], color=["C7", "C3"])
        ax.set_ylabel(GOLD_AXIS)
        ax.set_ylim(0, 1)
        ax.set_title(f"{task} task: gold score before and after preference optimisation")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    it = [h["iteration"] for h in history]
    ax.plot(it, [h["train/reward"] for h in history], label="proxy reward (reward model, sampled)", color="C0")
    ax.axhline(0.0, color="C0", lw=0.5, ls=":")
    ax.set_xlabel(f"{algorithm.upper()} iteration")
    ax.set_ylabel("proxy reward (normalised reward-model score)", color="C0")
    ax2 = ax.twinx()
    if history and "train/gold_reward" in history[0]:
        ax2.plot(it, [h["train/gold_reward"] for h in history], label="gold score (sampled)",
                 color="C1", alpha=0.5)
    ev = [(0, start_accuracy)] + [(h["iteration"], h["val/gold_reward"]) for h in history if "val/gold_reward" in h]
    if ev:
        ax2.plot(*zip(*ev, strict=True), "o-", label="gold score (greedy, eval set)", color="C3")
    ax2.set_ylabel(GOLD_AXIS)
    ax2.set_ylim(0, 1)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(f"{task} task: proxy reward and gold score during RL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Base:
    """What `build_base` leaves: the shared start of every RL / preference stage.

    The same objects are also on disk under the base folder (`pretrain/`, `sft/`, `reward_model/`).
    """

    task: object  # the task (rlhf_lab.tasks)
    sft: Policy  # the SFT policy, as trained (the start of every last stage)
    reward_policy: Policy  # the reward model (a Policy with a scalar head)
    reward_fn: RewardModelSource  # the reward model as a reward source, normalised on SFT samples
    pairs: list[dict]  # the gold-ranked preference pairs, shuffled; the first `n_val` are held out
    n_val: int
    sft_before: list[str]  # greedy SFT completions of the task's eval prompts
    summary: dict  # the `pretrain`, `sft` and `reward_model` entries of the demo's summary.json


def build_base(out: str, config: DemoConfig | None = None, logger: str | LoggerConfig = "csv",
               run_config=None, progress: bool = True, echo=print, normalize_temperature: float = 1.0) -> Base:
    """Stages 1-3 of the demo: pretrain → SFT → preference pairs → reward model → normalised reward.

    Writes `pretrain/`, `sft/` and `reward_model/` (HF folders beside each stage's Lightning logs)
    into `out`, prints a table per stage through `echo`, and seeds everything with `config.seed`
    first. The reward model is normalised (mean 0, std 1) on one sample per RL prompt from the SFT
    policy at `normalize_temperature`. `logger` and `run_config` go to every stage's Trainer
    (`rlhf_lab.runs.make_trainer`). Returns a `Base`.
    """
    c = config or DemoConfig()
    task = get_task(c.task)
    max_new_tokens = c.max_new_tokens or task.max_new_tokens
    os.makedirs(out, exist_ok=True)
    L.seed_everything(c.seed, verbose=False)
    judge = task.gold_reward
    eval_prompts = task.eval_prompts()
    trainer_kw = dict(logger=logger, run_config=run_config, enable_progress_bar=progress)
    summary: dict = {}

    # 1. Pretraining: a named backbone starts from scratch with a tokenizer trained on the task's
    # own text; a local HF folder brings its weights and tokenizer and is trained further.
    if c.backbone in backbone_names():
        tokenizer = train_bpe_tokenizer(task.tokenizer_texts(), vocab_size=c.vocab_size or task.vocab_size)
        policy = Policy(build_tiny_model(c.backbone, tokenizer), tokenizer)
    else:
        tokenizer = load_tokenizer(c.backbone)
        policy = Policy(load_backbone(c.backbone), tokenizer)
    corpus = task.pretrain_corpus(seed=c.seed)
    n_val = max(1, len(corpus) // 20)
    stage = Pretrain(policy, corpus[n_val:], corpus[:n_val], c.pretrain)
    trainer = make_trainer(out, "pretrain", c.pretrain_steps, val_check_interval=None,
                           check_val_every_n_epoch=None, **trainer_kw)
    trainer.fit(stage)
    val = trainer.validate(stage, verbose=False)[0]
    finish_loggers(trainer)
    policy.save(os.path.join(out, "pretrain"), extra={"stage": "pretrain", "config": asdict(c.pretrain)})
    summary["pretrain"] = {"val_loss": val["val/loss"], "val_perplexity": float(torch.exp(torch.tensor(val["val/loss"])))}
    echo(_table("pretrain", [("steps", str(c.pretrain_steps)), ("val loss", f"{val['val/loss']:.3f}"),
                             ("val perplexity", f"{summary['pretrain']['val_perplexity']:.2f}")]))

    # 2. SFT on the task's question → answer pairs (loss on the answer only).
    train_rows, val_rows = task.sft_pairs(seed=c.seed)
    policy = Policy.load(os.path.join(out, "pretrain"))
    stage = SFT(policy, train_rows, val_rows, c.sft)
    trainer = make_trainer(out, "sft", c.sft_steps, **trainer_kw)
    trainer.fit(stage)
    val = trainer.validate(stage, verbose=False)[0]
    finish_loggers(trainer)
    policy.save(os.path.join(out, "sft"), extra={"stage": "sft", "config": asdict(c.sft)})
    before = greedy_completions(policy, eval_prompts, max_new_tokens)
    sft_acc = _mean(judge(eval_prompts, before))
    summary["sft"] = {"val_loss": val["val/loss"], "gold_accuracy": sft_acc}
    echo(_table("sft", [("steps", str(c.sft_steps)), ("val loss", f"{val['val/loss']:.3f}"),
                        ("greedy gold score", f"{sft_acc:.1%} on {len(eval_prompts)} eval prompts")]))

    # 3. Reward model on SFT samples ranked by the gold judge.
    rm_prompts = task.rl_prompts(seed=c.seed)
    pairs = build_preference_pairs(policy, rm_prompts, judge, c.pair_samples, c.pair_temperature,
                                   max_new_tokens, c.seed)
    random.Random(c.seed).shuffle(pairs)
    n_val = max(1, len(pairs) // 10)
    reward_policy = Policy.load(os.path.join(out, "sft"), scalar_head=True)
    stage = RewardModel(reward_policy, pairs[n_val:], pairs[:n_val], c.reward)
    trainer = make_trainer(out, "reward_model", c.reward_steps, **trainer_kw)
    trainer.fit(stage)
    val = trainer.validate(stage, verbose=False)[0]
    finish_loggers(trainer)
    reward_policy.save(os.path.join(out, "reward_model"), extra={"stage": "reward_model", "config": asdict(c.reward)})
    summary["reward_model"] = {"pairs": len(pairs), "val_accuracy": val["val/accuracy"], "val_loss": val["val/loss"]}
    echo(_table("reward model", [("preference pairs", f"{len(pairs)} ({n_val} held out)"),
                                 ("val accuracy", f"{val['val/accuracy']:.1%}")]))

    # The reward model is normalised on SFT samples, so a score reads in standard deviations of
    # the SFT policy's rewards (Stiennon et al. 2020; Ouyang et al. 2022).
    samples = policy.generate(rm_prompts, max_new_tokens=max_new_tokens, temperature=normalize_temperature)
    reward_fn = RewardModelSource(reward_policy).normalize(samples.prompts, samples.completions)
    return Base(task=task, sft=policy, reward_policy=reward_policy, reward_fn=reward_fn, pairs=pairs,
                n_val=n_val, sft_before=before, summary=summary)


def run_demo(out: str | None = None, config: DemoConfig | None = None, logger: str | LoggerConfig = "csv",
             algorithm: str = "ppo", progress: bool = True, echo=print) -> dict:
    """Run the four stages and write everything to `out` (default `runs/demo-<time>/`).

    The folder holds `pretrain/`, `sft/`, `reward_model/`, `ppo/` — each an HF checkpoint folder
    (model, tokenizer, `rlhf_lab_policy.json`) beside the stage's Lightning CSV `metrics.csv` —
    plus `summary.json` and `rl_curve.png`. Stages 1-3 are `build_base`. Returns the summary dict.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    c = config or DemoConfig()
    task = get_task(c.task)
    max_new_tokens = c.max_new_tokens or task.max_new_tokens
    rl_config = c.rl_config(algorithm if algorithm in RL_ALGORITHMS else "ppo", max_new_tokens)
    out = out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    run_name = os.path.basename(os.path.normpath(out))
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    judge = task.gold_reward
    eval_prompts = task.eval_prompts()
    # One wandb group per demo run, one wandb run per stage; every stage records the whole config.
    log_config = logger if isinstance(logger, LoggerConfig) else LoggerConfig(kind=logger)
    log_config = dataclasses.replace(
        log_config, group=log_config.group or run_name,
        tags=[*log_config.tags, f"task:{task.name}", f"backbone:{c.backbone}", f"algorithm:{algorithm}"])
    run_config = {"demo": asdict(c), "algorithm": algorithm}
    trainer_kw = dict(logger=log_config, run_config=run_config, enable_progress_bar=progress)
    summary: dict = {"task": task.name, "backbone": c.backbone, "lora": c.lora is not None, "seed": c.seed,
                     "config": asdict(c)}

    # 1-3. Pretrain, SFT, reward model (and its normalisation on SFT samples).
    base = build_base(out, c, logger=log_config, run_config=run_config, progress=progress, echo=echo,
                      normalize_temperature=rl_config.temperature)
    summary.update(base.summary)
    sft_acc, before = summary["sft"]["gold_accuracy"], base.sft_before
    pairs, n_val, reward_fn = base.pairs, base.n_val, base.reward_fn

    # 4. RL against the learned reward model; the gold judge only watches. A critic (PPO's)
    # starts as a copy of the reward model (Ouyang et al. 2022).
    # With LoRA the last stage trains a fresh adapter on the SFT weights and the reference is the
    # same model with the adapter disabled: no second copy in memory.
    reference = "base" if c.lora is not None else "copy"
    if algorithm in RL_ALGORITHMS:
        critic = reward_fn.as_critic() if rl_config.baseline == "critic" else None
        policy = Policy.load(os.path.join(out, "sft"), reference=reference, critic=critic, lora=c.lora)
        stage = OnlineRL(policy, task.rl_prompts(seed=c.seed), reward_fn, rl_config,
                         gold_fn=CallableSource(judge), val_prompts=eval_prompts)
        # Manual optimisation counts every optimiser step as a Trainer step.
        steps, stage_config = c.iterations(algorithm) * rl_config.steps_per_iteration, rl_config
        fit_kw = dict(val_check_interval=c.eval_every, check_val_every_n_epoch=None)
    elif algorithm == "dpo":  # offline, on the gold-ranked pairs the reward model was trained on
        policy = Policy.load(os.path.join(out, "sft"), reference=reference, lora=c.lora)
        stage = DPO(policy, pairs[n_val:], pairs[:n_val], c.dpo)
        steps, stage_config = c.dpo_steps, c.dpo
        fit_kw = dict(val_check_interval=max(1, steps // 5), check_val_every_n_epoch=None)
    else:  # online_dpo: fresh pairs from the current policy, ranked by the reward model
        policy = Policy.load(os.path.join(out, "sft"), reference=reference, lora=c.lora)
        online_dpo = dataclasses.replace(c.online_dpo, max_new_tokens=max_new_tokens)
        stage = OnlineDPO(policy, task.rl_prompts(seed=c.seed), reward_fn, online_dpo,
                          gold_fn=CallableSource(judge))
        steps, stage_config, fit_kw = c.iterations(algorithm), online_dpo, {}
    trainer = make_trainer(out, algorithm, steps, **fit_kw, **trainer_kw)
    trainer.fit(stage)
    finish_loggers(trainer)
    policy.save(os.path.join(out, algorithm), extra={"stage": algorithm, "config": asdict(stage_config)})
    after = greedy_completions(policy, eval_prompts, max_new_tokens)
    rl_acc = _mean(judge(eval_prompts, after))
    # The same end-of-run measurement for every algorithm: proxy reward and KL to the SFT policy
    # of samples on the eval prompts.
    final = policy.generate(eval_prompts, max_new_tokens=max_new_tokens, temperature=1.0)
    mask = final.response_mask.float()
    reward = float(reward_fn(final.prompts, final.completions).mean())
    kl = float((kl_k1(final.logprobs, policy.ref_logprobs(final.input_ids, final.attention_mask)) * mask)
               .sum(1).mean())
    summary["rl"] = {"algorithm": algorithm, "lora": c.lora is not None, "gold_accuracy": rl_acc, "reward": reward, "kl": kl,
                     "steps": steps}
    echo(_table(algorithm, [("optimiser steps", str(steps)),
                            ("proxy reward (sampled, eval set)", f"{reward:.3f}"),
                            ("KL to SFT policy (sampled)", f"{kl:.3f} nats"),
                            ("greedy gold score", f"{sft_acc:.1%} → {rl_acc:.1%}")]))
    echo(_samples_table(eval_prompts, before, after, judge))

    _plot(getattr(stage, "history", []), os.path.join(out, "rl_curve.png"), algorithm, sft_acc, rl_acc, task.name)
    summary["seconds"] = time.perf_counter() - start
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    echo(f"\nwrote {out}/ (summary.json, rl_curve.png, one checkpoint folder per stage) "
         f"in {summary['seconds']:.0f} s")
    return summary
