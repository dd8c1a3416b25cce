"""The demo: the whole pipeline (pretrain → SFT → reward model → RL) on a built-in task.

A tiny GPT-2 (or any named tiny config, toy model, or local HF folder) is trained on CPU in a few
minutes on the arithmetic task (default) or the alice task. Preference pairs for the reward
model come from sampling the SFT policy and ranking its samples with the task's gold judge; the
last stage (any registered algorithm, PPO by default) then optimises the *learned* reward model
while the gold judge measures what really happened.

The demo is a list of run configs handed to the one builder (`rlhf_lab.runs.builder.build_run`):
pretrain, SFT, reward model, and the algorithm with the registry's demo settings. Everything a
run produces lands in one folder (see `run_demo`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rlhf_lab.algorithms import algorithm_names, get_algorithm
from rlhf_lab.eval import greedy_completions
from rlhf_lab.models.lora import LoraSettings
from rlhf_lab.policy import Policy
from rlhf_lab.rewards import RewardModelSource, check_scores
from rlhf_lab.runs.builder import (
    CheckpointConfig,
    EvalConfig,
    FitConfig,
    ModelConfig,
    RewardConfig,
    TrainerConfig,
    build_run,
    iteration_size,
)
from rlhf_lab.runs.loggers import LoggerConfig
from rlhf_lab.stages.lm import PretrainConfig, SFTConfig
from rlhf_lab.stages.reward_model import RewardModelConfig
from rlhf_lab.tasks import get_task


@dataclass
class DemoConfig:
    """The demo's stages. The defaults are tuned to finish in minutes on 2 CPU cores."""

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
    # Length of the last stage: iterations (online) or optimiser steps (dpo); None = the registry's
    # `demo_budget` of the algorithm (equal wall time, not equal iterations).
    final_budget: int | None = None
    # The last stage's config; None = the registry's demo config of the algorithm.
    final: Any = None
    # Prompts per iteration of the online algorithms (online_dpo: its batch); None = the registry's.
    prompts_per_step: int | None = None
    eval_every: int = 10  # iterations (dpo: a fifth of its steps) between evaluations of the last stage
    max_new_tokens: int | None = None  # generation length everywhere; None = the task's own
    vocab_size: int | None = None  # BPE size of the trained tokenizer; None = the task's own
    checkpoint_every: int = 100  # optimiser steps between each stage's checkpoints (0 = none: no resume)

    def budget(self, algorithm: str) -> int:
        """Iterations (online) or optimiser steps (dpo) of the last stage."""
        return self.final_budget if self.final_budget is not None else get_algorithm(algorithm).demo_budget

    def new_tokens(self) -> int:
        """The generation length of every stage: `max_new_tokens`, else the task's own."""
        return self.max_new_tokens or get_task(self.task).max_new_tokens

    def final_config(self, algorithm: str):
        """The last stage's config: `final`, else the registry's demo config for this task."""
        if self.final is not None:
            return self.final
        entry = get_algorithm(algorithm)
        overrides: dict = {}
        if entry.online:
            overrides["max_new_tokens"] = self.new_tokens()
        if self.prompts_per_step is not None and entry.online:
            overrides["batch_size" if entry.stage == "online_dpo" else "prompts_per_step"] = self.prompts_per_step
        return entry.demo_config(**overrides)


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
    scores = check_scores(judge(rollout.prompts, rollout.completions), len(rollout), judge, rollout.prompts,
                          what="judge")
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


def _plot(history: list[dict], evals: list[dict], path: str, algorithm: str, task: str = "arithmetic") -> None:
    """Proxy reward per iteration and the evaluations' greedy gold score; offline DPO: gold before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    gold = [(e["step"], e["val/greedy_gold_reward"]) for e in evals]
    if not history:  # offline DPO has no iterations: its evaluations along its optimiser steps
        ax.plot(*zip(*gold, strict=True), "o-", color="C3")
        ax.set_xlabel(f"{algorithm.upper()} optimiser step")
        ax.set_ylabel(GOLD_AXIS)
        ax.set_ylim(0, 1)
        ax.set_title(f"{task} task: gold score during preference optimisation")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    per_iteration = evals[-1]["samples"] / len(history)  # every iteration samples the same number
    it = [h["iteration"] for h in history]
    ax.plot(it, [h["train/reward"] for h in history], label="proxy reward (reward model, sampled)", color="C0")
    ax.axhline(0.0, color="C0", lw=0.5, ls=":")
    ax.set_xlabel(f"{algorithm.upper()} iteration")
    ax.set_ylabel("proxy reward (normalised reward-model score)", color="C0")
    ax2 = ax.twinx()
    if "train/gold_reward" in history[0]:
        ax2.plot(it, [h["train/gold_reward"] for h in history], label="gold score (sampled)",
                 color="C1", alpha=0.5)
    ev = [(e["samples"] / per_iteration, e["val/greedy_gold_reward"]) for e in evals]
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
    """What `build_base` leaves: the shared start of every last stage.

    The same objects are also on disk under the base folder (`pretrain/`, `sft/`, `reward_model/`).
    """

    task: object  # the task (rlhf_lab.tasks)
    sft: Policy  # the SFT policy, as trained (the start of every last stage)
    reward_fn: RewardModelSource  # the reward model as a reward source, normalised on SFT samples
    pairs: list[dict]  # the gold-ranked preference pairs, shuffled; the first `n_val` are held out
    n_val: int
    sft_before: list[str]  # greedy SFT completions of the task's eval prompts
    summary: dict  # the `pretrain`, `sft` and `reward_model` entries of the demo's summary.json


def _stage(c: DemoConfig, out: str, name: str, backbone: str, config, steps: int, logger, progress: bool,
           **kwargs) -> FitConfig:
    """The FitConfig of one demo stage."""
    vocab = c.vocab_size or get_task(c.task).vocab_size
    return FitConfig(stage=name, out=out, seed=c.seed, task=c.task,
                     checkpoint=CheckpointConfig(every_n_steps=c.checkpoint_every),
                     model=ModelConfig(backbone=backbone, vocab_size=vocab, **kwargs.pop("model", {})),
                     config=config, trainer=TrainerConfig(max_steps=steps, enable_progress_bar=progress),
                     logger=logger, **kwargs)


STATE_FILE = "demo_state.pt"


class _Progress:
    """The demo's own checkpoint between stages: `<out>/demo_state.pt`.

    After each stage (and after the reward normalisation) it records the random states and what
    the next stages take from memory (the SFT completions before RL, the preference pairs, the
    normalisation), written atomically. A resumed pipeline skips every step recorded here, puts
    the random states back, and goes on exactly as the uninterrupted run did; an unfinished stage
    resumes from its own Lightning checkpoint (`build_run(resume=True)`).
    """

    def __init__(self, out: str, resume: bool):
        from rlhf_lab.runs.checkpoint import is_complete

        self.path = os.path.join(out, STATE_FILE)
        self.state: dict = {}
        if resume and os.path.exists(self.path):
            self.state = torch.load(self.path, weights_only=True)
            # A step counts only when its stage folder is complete too.
            self.state = {k: v for k, v in self.state.items()
                          if k == "normalized" or is_complete(os.path.join(out, k))}

    def done(self, step: str) -> dict | None:
        """The record of a finished step, with the random states after it put back; else None."""
        from rlhf_lab.runs.checkpoint import set_rng_state

        record = self.state.get(step)
        if record is not None:
            set_rng_state(record["rng"])
        return record

    def record(self, step: str, **values) -> None:
        from rlhf_lab.runs.checkpoint import rng_state

        self.state[step] = {"rng": rng_state(), **values}
        tmp = f"{self.path}.tmp-{os.getpid()}"
        torch.save(self.state, tmp)
        os.replace(tmp, self.path)


def _summary_metrics(folder: str) -> dict:
    with open(os.path.join(folder, "summary.json")) as f:
        return json.load(f)["metrics"]


def build_base(out: str, config: DemoConfig | None = None, logger: str | LoggerConfig = "csv",
               run_config=None, progress: bool = True, echo=print, resume: bool = False) -> Base:
    """Stages 1-3 of the demo: pretrain → SFT → preference pairs → reward model → normalised reward.

    Writes `pretrain/`, `sft/` and `reward_model/` (HF folders beside each stage's Lightning logs)
    into `out` and prints a table per stage through `echo`; each stage is one `build_run`. The
    pipeline is seeded once with `config.seed`, before pretraining, and each later stage goes on
    from the random stream the one before left (so a seed gives the numbers it always gave). The
    reward model is normalised (mean 0, std 1) on one sample per RL prompt of the SFT policy at
    temperature 1. `resume` goes on from `out/demo_state.pt` and the stages' checkpoints (see
    `_Progress`), with the same numbers as an uninterrupted run. Returns a `Base`.
    """
    c = config or DemoConfig()
    task = get_task(c.task)
    max_new_tokens = c.new_tokens()
    logger = logger if isinstance(logger, LoggerConfig) else LoggerConfig(kind=logger)
    os.makedirs(out, exist_ok=True)
    progress_file = _Progress(out, resume)
    eval_prompts = task.eval_prompts()
    summary: dict = {}
    common = dict(logger=logger, progress=progress)
    no_eval = EvalConfig(prompts=0)

    # 1. Pretraining: a named backbone starts from scratch with a tokenizer trained on the task's
    # own text; a local HF folder brings its weights and tokenizer and is trained further.
    if progress_file.done("pretrain") is not None:
        val = _summary_metrics(os.path.join(out, "pretrain"))
    else:
        run = build_run(_stage(c, out, "pretrain", c.backbone, c.pretrain, c.pretrain_steps, eval=no_eval,
                               **common), task=task, run_config=run_config, resume=resume)
        val = run.fit()["metrics"]
        progress_file.record("pretrain")
    summary["pretrain"] = {"val_loss": val["val/loss"], "val_perplexity": val["val/perplexity"]}
    echo(_table("pretrain", [("steps", str(c.pretrain_steps)), ("val loss", f"{val['val/loss']:.3f}"),
                             ("val perplexity", f"{val['val/perplexity']:.2f}")]))

    # 2. SFT on the task's question → answer pairs (loss on the answer only), evaluated greedily
    # on the eval prompts by the gold judge.
    record = progress_file.done("sft")
    if record is not None:
        val, before = _summary_metrics(os.path.join(out, "sft")), list(record["before"])
        policy = Policy.load(os.path.join(out, "sft"))
    else:
        sft_eval = EvalConfig(prompts=len(eval_prompts), at_start=False, max_new_tokens=max_new_tokens)
        run = build_run(_stage(c, out, "sft", os.path.join(out, "pretrain"), c.sft, c.sft_steps, eval=sft_eval,
                               **common), task=task, eval_prompts=eval_prompts, references=[],
                        run_config=run_config, reseed=False, resume=resume)
        val = run.fit()["metrics"]
        policy = run.policy
        before = greedy_completions(policy, eval_prompts, max_new_tokens)
        progress_file.record("sft", before=before)
    sft_acc = val["val/gold_reward"]
    summary["sft"] = {"val_loss": val["val/loss"], "gold_accuracy": sft_acc}
    echo(_table("sft", [("steps", str(c.sft_steps)), ("val loss", f"{val['val/loss']:.3f}"),
                        ("greedy gold score", f"{sft_acc:.1%} on {len(eval_prompts)} eval prompts")]))

    # 3. Reward model on SFT samples ranked by the gold judge.
    rm_prompts = task.rl_prompts(seed=c.seed)
    record = progress_file.done("reward_model")
    if record is not None:
        pairs = [dict(p) for p in record["pairs"]]
        val = _summary_metrics(os.path.join(out, "reward_model"))
        reward_policy = Policy.load(os.path.join(out, "reward_model"), scalar_head=True)
    else:
        pairs = build_preference_pairs(policy, rm_prompts, task.gold_reward, c.pair_samples, c.pair_temperature,
                                       max_new_tokens, c.seed)
        random.Random(c.seed).shuffle(pairs)
        n_val = max(1, len(pairs) // 10)
        run = build_run(_stage(c, out, "reward_model", os.path.join(out, "sft"), c.reward, c.reward_steps,
                               eval=no_eval, **common), task=task, rows=(pairs[n_val:], pairs[:n_val]),
                        run_config=run_config, reseed=False, resume=resume)
        val = run.fit()["metrics"]
        reward_policy = run.policy
        progress_file.record("reward_model", pairs=pairs)
    n_val = max(1, len(pairs) // 10)
    summary["reward_model"] = {"pairs": len(pairs), "val_accuracy": val["val/accuracy"], "val_loss": val["val/loss"]}
    echo(_table("reward model", [("preference pairs", f"{len(pairs)} ({n_val} held out)"),
                                 ("val accuracy", f"{val['val/accuracy']:.1%}")]))

    # The reward model is normalised on SFT samples, so a score reads in standard deviations of
    # the SFT policy's rewards (Stiennon et al. 2020; Ouyang et al. 2022).
    record = progress_file.done("normalized")
    if record is not None:
        reward_fn = RewardModelSource(reward_policy, shift=record["shift"], scale=record["scale"])
    else:
        samples = policy.generate(rm_prompts, max_new_tokens=max_new_tokens, temperature=1.0)
        reward_fn = RewardModelSource(reward_policy).normalize(samples.prompts, samples.completions)
        progress_file.record("normalized", shift=reward_fn.shift, scale=reward_fn.scale)
    return Base(task=task, sft=policy, reward_fn=reward_fn, pairs=pairs, n_val=n_val, sft_before=before,
                summary=summary)


def final_run_config(c: DemoConfig, algorithm: str, out: str, base_dir: str, logger, progress: bool = True,
                     budget=None, evaluation: EvalConfig | None = None) -> FitConfig:
    """The FitConfig of the last stage: the registry's demo config of `algorithm` from `base_dir/sft`.

    With LoRA the stage trains a fresh adapter on the SFT weights and the reference is the same
    model with the adapter disabled. PPO's critic starts as a copy of the reward model (Ouyang et
    al. 2022). `budget` (a BudgetConfig) stops an online run at an equal budget (compare); else the
    run lasts `c.budget(algorithm)` iterations (dpo: optimiser steps).
    """
    task = get_task(c.task)
    max_new_tokens = c.new_tokens()
    entry = get_algorithm(algorithm)
    config = c.final_config(algorithm)
    per_iteration, steps = None, c.budget(algorithm)
    if entry.online:
        per_iteration, steps_per_iteration = iteration_size(entry.stage, config, len(task.rl_prompts()))
        steps *= steps_per_iteration
    if evaluation is None:  # proxy reward and KL on samples, greedy gold: the same for every algorithm
        every, axis = (c.eval_every * per_iteration, "samples") if per_iteration else (max(1, steps // 5), "step")
        evaluation = EvalConfig(every=every, axis=axis, prompts=len(task.eval_prompts()), greedy=False,
                                greedy_gold=True, max_new_tokens=max_new_tokens)
    critic = "reward_model" if entry.stage == "online_rl" and config.baseline == "critic" else None
    model = dict(lora=c.lora, reference="base" if c.lora is not None else "copy", critic=critic)
    return _stage(c, out, algorithm, os.path.join(base_dir, "sft"), config, steps, logger, progress,
                  model=model, reward=RewardConfig(source="reward_model", path=os.path.join(base_dir, "reward_model")),
                  eval=evaluation, budget=budget)


def run_demo(out: str | None = None, config: DemoConfig | None = None, logger: str | LoggerConfig = "csv",
             algorithm: str = "ppo", progress: bool = True, echo=print, resume: bool = False,
             overwrite: bool = False) -> dict:
    """Run the four stages and write everything to `out` (default `runs/demo-<time>/`).

    The folder holds `pretrain/`, `sft/`, `reward_model/`, `<algorithm>/` — each an HF checkpoint
    folder (model, tokenizer, `rlhf_lab_policy.json`) beside the stage's Lightning CSV `metrics.csv`
    and `summary.json` — plus the demo's `summary.json` and `rl_curve.png`. Stages 1-3 are
    `build_base`; the last stage is `final_run_config` through the same builder. Returns the summary.

    A folder that holds anything is refused unless `resume` (go on from the last finished step
    and the unfinished stage's checkpoint, with the numbers of an uninterrupted run; a finished
    demo only prints its summary) or `overwrite` (delete it first).
    """
    from rlhf_lab.runs.checkpoint import prepare_run_folder, write_complete, write_json

    if algorithm not in algorithm_names():
        raise ValueError(f"algorithm must be one of {', '.join(algorithm_names())}; got {algorithm!r}")
    c = config or DemoConfig()
    task = get_task(c.task)
    max_new_tokens = c.new_tokens()
    out = out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    if prepare_run_folder(out, resume=resume, overwrite=overwrite, pipeline=True)[0] == "finished":
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        echo(f"{out}: the demo finished already ({summary['rl']['algorithm']}: greedy gold score "
             f"{summary['sft']['gold_accuracy']:.1%} → {summary['rl']['gold_accuracy']:.1%})")
        return summary
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
    summary: dict = {"task": task.name, "backbone": c.backbone, "lora": c.lora is not None, "seed": c.seed,
                     "config": asdict(c)}

    # 1-3. Pretrain, SFT, reward model (and its normalisation on SFT samples).
    base = build_base(out, c, logger=log_config, run_config=run_config, progress=progress, echo=echo,
                      resume=resume)
    summary.update(base.summary)
    sft_acc, before = summary["sft"]["gold_accuracy"], base.sft_before

    # 4. The algorithm against the learned reward model; the gold judge only watches. Offline DPO
    # trains on the gold-ranked pairs the reward model was trained on.
    fit_config = final_run_config(c, algorithm, out, out, log_config, progress)
    rows = (base.pairs[base.n_val:], base.pairs[:base.n_val]) if fit_config.stage_name == "dpo" else None
    run = build_run(fit_config, task=task, rows=rows, reward_fn=base.reward_fn, run_config=run_config, reseed=False,
                    resume=resume)
    result = run.fit()
    policy, last = run.policy, result["history"][-1]
    after = greedy_completions(policy, eval_prompts, max_new_tokens)
    rl_acc = last["val/greedy_gold_reward"]
    summary["rl"] = {"algorithm": algorithm, "lora": c.lora is not None, "gold_accuracy": rl_acc,
                     "reward": last["val/reward"], "kl": last["val/kl"], "steps": result["steps"]}
    echo(_table(algorithm, [("optimiser steps", str(result["steps"])),
                            ("proxy reward (sampled, eval set)", f"{last['val/reward']:.3f}"),
                            ("KL to SFT policy (sampled)", f"{last['val/kl']:.3f} nats"),
                            ("greedy gold score", f"{sft_acc:.1%} → {rl_acc:.1%}")]))
    echo(_samples_table(eval_prompts, before, after, judge))

    _plot(result["train_history"], result["history"], os.path.join(out, "rl_curve.png"), algorithm, task.name)
    summary["seconds"] = time.perf_counter() - start
    write_json(os.path.join(out, "summary.json"), summary)
    write_complete(out, {"demo": algorithm, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    echo(f"\nwrote {out}/ (summary.json, rl_curve.png, one checkpoint folder per stage) "
         f"in {summary['seconds']:.0f} s")
    return summary
