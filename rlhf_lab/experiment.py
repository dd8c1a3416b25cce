"""One stage from one config: what `rlhf-lab fit STAGE --config FILE.yaml` runs.

A `FitConfig` holds everything a run needs: the stage and its hyperparameters (`config`, the
stage's own dataclass), the model (`model`), the data (`data`, or a built-in `task`), the reward
source of the online stages (`reward`), periodic evaluation (`eval`), the Trainer (`trainer`)
and the loggers (`logger`). `fit(config)` builds the policy, the data and the stage, trains,
and writes `<out>/<stage>/`: the policy as an HF folder (the next stage's `model.backbone`),
Lightning's `metrics.csv`, the resolved `config.yaml` and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from rlhf_lab.config import build, dump_yaml
from rlhf_lab.data import DataConfig, GSM8KJudge, check_stage_data, load_data, prompts_of
from rlhf_lab.models.lora import LoraSettings
from rlhf_lab.runs import LoggerConfig, finish_loggers, make_trainer, plain_config

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "FitConfig", "ModelConfig", "RewardConfig", "TrainerConfig", "build_fit_config",
           "config_from_files", "fit", "fit_from_files", "load_policy", "stage_config_class"]

ONLINE_STAGES = ("online_rl", "ppo", "online_dpo")


@dataclass
class ModelConfig:
    """The model a stage starts from."""

    backbone: str = "gpt2-tiny"  # a named tiny config or toy model, or a checkpoint / local HF model folder
    tokenizer: str | None = None  # a local tokenizer folder; None: the folder's own, or a BPE trained on the data
    vocab_size: int = 512  # size of the BPE tokenizer trained on the data (named backbones only)
    overrides: dict = field(default_factory=dict)  # config fields of a named backbone, e.g. {n_layer: 2}
    lora: LoraSettings | None = None  # train a LoRA adapter instead of all weights
    reference: str | None = None  # None: what the stage needs ("copy"; "base" with LoRA); or copy/base


@dataclass
class RewardConfig:
    """The reward of the online stages (online_rl, ppo, online_dpo)."""

    source: str = "gold"  # gold: the task's judge | gsm8k: GSM8K gold numbers of the data | reward_model
    path: str | None = None  # reward_model: the reward-model checkpoint folder
    normalize: bool = True  # reward_model: scale scores to mean 0, std 1 on the starting policy's samples


@dataclass
class EvalConfig:
    """Periodic evaluation (EvalCallback) on the first `prompts` validation prompts."""

    every_n_steps: int = 0  # optimiser steps between evaluations; 0 = only at the end
    prompts: int = 64  # how many validation prompts (0 = no evaluation)
    max_new_tokens: int | None = None  # None: the task's, else 32
    at_start: bool = True  # also evaluate before the first step


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; online stages count every optimiser step of an iteration."""

    max_steps: int = 100  # optimiser steps (online_rl: iterations x ppo_epochs x minibatches)
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: Any = 1  # number of devices, or "auto"
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    strategy: str = "auto"  # auto | ddp | ...
    val_check_interval: int | None = None  # optimiser steps between val passes; None = once per epoch
    log_every_n_steps: int = 1
    enable_progress_bar: bool = True


@dataclass
class FitConfig:
    """Everything one `fit` run needs; YAML files give any subset of these keys."""

    stage: str = "sft"  # pretrain | sft | reward_model | dpo | online_rl | ppo | online_dpo
    out: str = "runs/fit"  # run folder; the stage writes <out>/<stage>/
    seed: int = 0
    task: str | None = None  # a built-in task (arithmetic, alice) as the data and gold judge
    data: DataConfig | None = None  # data from files (overrides the task's data)
    model: ModelConfig = field(default_factory=ModelConfig)
    config: Any = None  # the stage's hyperparameters (PretrainConfig, SFTConfig, ...); null = defaults
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self):
        from rlhf_lab.stages import STAGES

        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.config is None:
            self.config = stage_config_class(self.stage)()
        if not isinstance(self.config, stage_config_class(self.stage)):
            raise ValueError(f"config must be a {stage_config_class(self.stage).__name__} for stage "
                             f"'{self.stage}', got {type(self.config).__name__}")
        if self.task is not None:
            from rlhf_lab.tasks import TASKS

            if self.task not in TASKS:
                raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task is None and self.data is None:
            raise ValueError("give data (format and path) or a built-in task")
        if self.data is not None:
            check_stage_data(self.stage, self.data)
        if self.reward.source not in ("gold", "gsm8k", "reward_model"):
            raise ValueError(f"reward.source must be gold, gsm8k or reward_model, got {self.reward.source!r}")


def stage_config_class(stage: str):
    """The hyperparameter dataclass of a stage name."""
    from rlhf_lab.stages import get_stage

    return get_stage(stage)[1]


# Algorithm names that are presets of the online loop: `fit grpo` = `fit online_rl` with
# `config.preset: grpo`.
PRESET_STAGES = ("reinforce", "rloo", "grpo", "trpo")


def build_fit_config(data: dict, stage: str | None = None, source: str | None = None) -> FitConfig:
    """A `FitConfig` from a YAML mapping; `stage` (from the command line) wins over the file's.

    Online RL configs may name a preset (`config: {preset: grpo, lr: 1e-4}`): the preset's knobs
    (`PRESETS`) are the defaults and the other keys override them. A preset name as the stage
    (`reinforce`, `rloo`, `grpo`, `trpo`) means stage `online_rl` with that preset.
    """
    from rlhf_lab.stages import PRESETS, STAGES

    data = dict(data)
    if stage is not None:
        data["stage"] = stage
    name = data.get("stage", "sft")
    where = f"{source}: " if source else ""
    stage_config = dict(data.get("config") or {})
    if name in PRESET_STAGES:
        stage_config.setdefault("preset", name)
        data["stage"] = name = "online_rl"
    if name not in STAGES:
        raise ValueError(f"{where}stage must be one of {', '.join([*STAGES, *PRESET_STAGES])}, got {name!r}")
    if "preset" in stage_config:
        preset = stage_config.pop("preset")
        if name not in ("online_rl", "ppo"):
            raise ValueError(f"{where}config.preset applies to the online RL stages, not to '{name}'")
        if preset not in PRESETS:
            raise ValueError(f"{where}config.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        stage_config = {"algorithm": preset, **PRESETS[preset], **stage_config}
    if stage_config or "config" in data:
        data["config"] = stage_config
    return build(FitConfig, data, hooks={"config": stage_config_class(name)}, source=source)


# --------------------------------------------------------------------------- building blocks


def _is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, "rlhf_lab_policy.json"))
                                    or os.path.exists(os.path.join(path, "config.json"))
                                    or os.path.exists(os.path.join(path, "adapter_config.json")))


def load_policy(model: ModelConfig, tokenizer_texts: list[str] | None = None, scalar_head: bool | None = None,
                reference: str | None = None, critic=None):
    """The Policy of `model`: a named backbone built fresh (tokenizer trained on `tokenizer_texts`
    unless `model.tokenizer` names one), or a checkpoint / local HF folder loaded as it is."""
    from rlhf_lab.models.backbones import backbone_names, build_tiny_model, load_backbone
    from rlhf_lab.models.tokenizer import load_tokenizer, train_bpe_tokenizer
    from rlhf_lab.policy import Policy

    if model.backbone in backbone_names():
        if model.tokenizer:
            tokenizer = load_tokenizer(model.tokenizer)
        else:
            if not tokenizer_texts:
                raise ValueError("model.backbone is a fresh model: give model.tokenizer, or data to train one on")
            tokenizer = train_bpe_tokenizer(tokenizer_texts, vocab_size=model.vocab_size)
        return Policy(build_tiny_model(model.backbone, tokenizer, **model.overrides), tokenizer,
                      scalar_head=bool(scalar_head), reference=reference, critic=critic, lora=model.lora)
    if model.overrides:
        raise ValueError("model.overrides apply to named backbones only, not to the folder "
                         f"{model.backbone!r}")
    if os.path.exists(os.path.join(model.backbone, "rlhf_lab_policy.json")):
        return Policy.load(model.backbone, scalar_head=scalar_head, reference=reference, critic=critic,
                           lora=model.lora)
    if not _is_checkpoint(model.backbone) and os.path.sep in model.backbone and not os.path.exists(model.backbone):
        raise FileNotFoundError(f"model.backbone: no such folder {model.backbone!r}")
    tokenizer = load_tokenizer(model.tokenizer or model.backbone)
    return Policy(load_backbone(model.backbone, tokenizer), tokenizer, scalar_head=bool(scalar_head),
                  reference=reference, critic=critic, lora=model.lora)


def _task_rows(stage: str, task, seed: int):
    if stage == "pretrain":
        corpus = task.pretrain_corpus(seed=seed)
        n_val = max(1, len(corpus) // 20)
        return corpus[n_val:], corpus[:n_val]
    if stage == "sft":
        return task.sft_pairs(seed=seed)
    if stage in ONLINE_STAGES:
        return task.rl_prompts(seed=seed), task.eval_prompts()
    raise ValueError(f"stage '{stage}' needs preference pairs: give data (format: preference, hh or "
                     f"gsm8k_pairs) — the built-in task '{task.name}' has none")


def _texts(rows: list) -> list[str]:
    out = []
    for r in rows:
        if isinstance(r, str):
            out.append(r)
        else:
            out.extend(v for k, v in r.items() if k in ("prompt", "completion", "chosen", "rejected"))
    return out


def _reference_mode(config: FitConfig) -> str | None:
    if config.model.reference is not None:
        return config.model.reference
    stage, c = config.stage, config.config
    needs = stage in ONLINE_STAGES or (stage == "dpo" and c.variant != "simpo")
    if not needs:
        return None
    return "base" if config.model.lora is not None else "copy"


# --------------------------------------------------------------------------- fit


def fit(config: FitConfig, echo=print) -> dict:
    """Train `config.stage` and write `<out>/<stage>/`; returns the summary (also in summary.json).

    The summary holds `metrics` (the last value of every logged scalar, then the last evaluation),
    `history` (one dict of val/ metrics per evaluation, with its `step`), `steps`, `seconds`, the
    row counts and the resolved `config`.
    """
    from rlhf_lab.eval import EvalCallback
    from rlhf_lab.rewards import CallableSource, RewardModelSource
    from rlhf_lab.stages import get_stage
    from rlhf_lab.tasks import get_task

    start = time.perf_counter()
    c, stage_name = config, config.stage
    L.seed_everything(c.seed, verbose=False)
    task = get_task(c.task) if c.task else None
    if c.data is not None:
        train, val = load_data(c.data)
    else:
        train, val = _task_rows(stage_name, task, c.seed)
    online = stage_name in ONLINE_STAGES
    prompts = prompts_of(train) if online else None
    # Evaluation prompts: the validation rows' prompts (for pretraining, text has none).
    val_prompts = prompts_of(val) if val and (online or not isinstance(val[0], str)) else []
    texts = _texts(train) + (task.tokenizer_texts() if task else [])

    # Reward and gold judges for the online stages and evaluation.
    gold = None
    if task is not None:
        gold = CallableSource(task.gold_reward)
    elif c.data is not None and c.data.format in ("gsm8k", "gsm8k_pairs"):
        gold = CallableSource(GSM8KJudge([*train, *val]))

    scalar_head = stage_name == "reward_model" or None
    reference = _reference_mode(c)
    critic = None
    reward_fn = None
    if online:
        if c.reward.source == "reward_model":
            from rlhf_lab.policy import Policy

            if not c.reward.path:
                raise ValueError("reward.source is reward_model: set reward.path to its checkpoint folder")
            reward_fn = RewardModelSource(Policy.load(c.reward.path, scalar_head=True))
        elif c.reward.source == "gsm8k":
            if c.data is None or c.data.format not in ("gsm8k", "gsm8k_pairs"):
                raise ValueError("reward.source gsm8k needs data.format gsm8k (the gold numbers)")
            reward_fn = gold
        else:
            if gold is None:
                raise ValueError("reward.source gold needs a task with a judge (or data.format gsm8k)")
            reward_fn = gold
        if stage_name != "online_dpo" and c.config.baseline == "critic":
            if c.model.lora is not None:
                critic = "adapter"
            else:
                scalar_head = True
    policy = load_policy(c.model, texts, scalar_head=scalar_head, reference=reference, critic=critic)
    if online and c.reward.source == "reward_model" and c.reward.normalize:
        samples = policy.generate(prompts[:256], max_new_tokens=c.config.max_new_tokens)
        reward_fn = reward_fn.normalize(samples.prompts, samples.completions)

    sc = c.config
    stage_class = get_stage(stage_name)[0]
    if online:  # evaluation goes through EvalCallback below, the same way for every stage
        stage = stage_class(policy, prompts, reward_fn, sc, gold_fn=gold)
    else:  # Pretrain, SFT, RewardModel, DPO: (policy, train rows, val rows, config)
        stage = stage_class(policy, list(train), list(val) or None, sc)

    callbacks = []
    eval_prompts = val_prompts[: c.eval.prompts] if c.eval.prompts else []
    if eval_prompts and stage_name != "reward_model":
        references = None
        if val and isinstance(val[0], dict) and "completion" in val[0]:
            references = [r["completion"] for r in val[: len(eval_prompts)]]
        max_new = c.eval.max_new_tokens or (task.max_new_tokens if task else 32)
        callbacks.append(EvalCallback(eval_prompts, every_n_steps=c.eval.every_n_steps, reward_fn=reward_fn,
                                      gold_fn=gold, references=references, max_new_tokens=max_new,
                                      at_start=c.eval.at_start))

    out_dir = os.path.join(c.out, stage_name)
    os.makedirs(out_dir, exist_ok=True)
    resolved = plain_config(c)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(dump_yaml(resolved))
    t = c.trainer
    val_kw = dict(val_check_interval=t.val_check_interval, check_val_every_n_epoch=None) \
        if t.val_check_interval else {}
    trainer = make_trainer(c.out, stage_name, t.max_steps, logger=c.logger, run_config=resolved,
                           callbacks=callbacks, accelerator=t.accelerator, devices=t.devices,
                           precision=t.precision, strategy=t.strategy, log_every_n_steps=t.log_every_n_steps,
                           enable_progress_bar=t.enable_progress_bar, **val_kw)
    try:
        trainer.fit(stage)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        if not online and val:  # a last validation pass, so val/ metrics describe the final weights
            metrics.update(trainer.validate(stage, verbose=False)[0])
        if callbacks and callbacks[0].history:
            metrics.update(callbacks[0].history[-1])
            metrics.pop("step", None)
    finally:
        finish_loggers(trainer)
    if trainer.is_global_zero:
        policy.save(out_dir, extra={"stage": stage_name, "config": dataclasses.asdict(sc)})
    summary = {"stage": stage_name, "out": out_dir, "steps": trainer.global_step,
               "seconds": time.perf_counter() - start, "metrics": metrics,
               "history": callbacks[0].history if callbacks else [],
               "train_rows": len(train), "val_rows": len(val), "config": resolved}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    shown = {k: v for k, v in sorted(metrics.items()) if not k.startswith("budget/")}
    echo(f"{stage_name}: {trainer.global_step} steps in {summary['seconds']:.0f} s -> {out_dir}/")
    for k, v in shown.items():
        echo(f"  {k:<24} {v:.4g}")
    return summary


# --------------------------------------------------------------------------- eval


def evaluate_checkpoint(checkpoint: str, task: str | None = None, data_format: str = "prompt_completion",
                        data_path: str | None = None, on_error: str = "raise", reward_model: str | None = None,
                        reference: str | None = None, n_prompts: int = 200, max_new_tokens: int | None = None,
                        greedy: bool = True, seed: int = 0, out: str | None = None, echo=print) -> dict:
    """The `val/` metrics of a checkpoint on a task's eval prompts or a data file; see `rlhf-lab eval`.

    Writes `<out>/metrics.json` (the metrics and what they were measured on) and
    `<out>/samples.csv`; returns the metrics dict.
    """
    import csv

    from rlhf_lab.eval.metrics import evaluate_policy, reward_model_accuracy, sequence_kl
    from rlhf_lab.policy import Policy
    from rlhf_lab.rewards import CallableSource, RewardModelSource
    from rlhf_lab.tasks import get_task

    if task is None and data_path is None:
        raise ValueError("give a task or a data file to evaluate on")
    torch.manual_seed(seed)
    policy = Policy.load(checkpoint).eval()
    the_task = get_task(task) if task else None
    references, gold, pairs = None, None, None
    if data_path is not None:
        rows, _ = load_data(DataConfig(format=data_format, path=data_path, on_error=on_error))
        rows = list(rows)[:n_prompts]
        if not rows or isinstance(rows[0], str) and data_format == "text":
            raise ValueError(f"{data_path}: data.format '{data_format}' has no prompts to evaluate on")
        prompts = prompts_of(rows)
        if isinstance(rows[0], dict) and "completion" in rows[0]:
            references = [r["completion"] for r in rows]
        if isinstance(rows[0], dict) and "chosen" in rows[0]:
            pairs = rows
        if data_format in ("gsm8k", "gsm8k_pairs"):
            gold = CallableSource(GSM8KJudge(rows))
    else:
        prompts = the_task.eval_prompts()[:n_prompts]
    if the_task is not None:
        gold = CallableSource(the_task.gold_reward)
    max_new = max_new_tokens or (the_task.max_new_tokens if the_task else 64)
    reward_fn = RewardModelSource(Policy.load(reward_model, scalar_head=True)) if reward_model else None
    ref_policy = Policy.load(reference).eval() if reference else None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # The win rate against the reference is judged by the reward model, else by the gold judge.
        judge = reward_fn or gold
        result = evaluate_policy(policy, prompts, reward_fn=reward_fn, gold_fn=gold, win_judge=judge,
                                 reference=ref_policy if judge is not None else None, references=references,
                                 max_new_tokens=max_new, greedy=greedy, generator=generator, max_rows=None)
        metrics = dict(result.metrics)
        if ref_policy is not None:
            # KL(policy ‖ reference) on the policy's own samples at temperature 1, per sequence (k1).
            rollout = policy.generate(prompts, max_new_tokens=max_new, generator=generator)
            ref_lp = ref_policy.logprobs(rollout.input_ids, rollout.attention_mask)
            metrics["val/kl"] = sequence_kl(rollout.logprobs, ref_lp, rollout.response_mask.float())
        if pairs is not None and reward_fn is not None:
            chosen = reward_fn([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
            rejected = reward_fn([r["prompt"] for r in pairs], [r["rejected"] for r in pairs])
            metrics["val/reward_model_accuracy"] = reward_model_accuracy(chosen, rejected)
    out = out or os.path.join(checkpoint, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"checkpoint": checkpoint, "task": task, "data": data_path, "prompts": len(prompts),
                   "greedy": greedy, "max_new_tokens": max_new, "metrics": metrics}, f, indent=2)
    columns, data = result.table()
    with open(os.path.join(out, "samples.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(data)
    echo(f"{checkpoint}: {len(prompts)} prompts ({'greedy' if greedy else 'sampled'}, {max_new} new tokens)")
    for k, v in sorted(metrics.items()):
        echo(f"  {k:<28} {v:.4g}")
    echo(f"wrote {out}/metrics.json and samples.csv")
    return metrics


def config_from_files(paths: list[str] | str, overrides: list[str] | None = None,
                      stage: str | None = None) -> FitConfig:
    """A `FitConfig` from YAML file(s) (later files win) plus `--key.sub value` overrides (which
    win over every file); `stage` wins over the files' `stage`."""
    from rlhf_lab.config import apply_overrides, load_yaml, parse_overrides

    paths = [paths] if isinstance(paths, str) else list(paths)
    data: dict = {}
    for path in paths:
        data = merge_dicts(data, load_yaml(path))
    data = apply_overrides(data, parse_overrides(list(overrides or [])))
    return build_fit_config(data, stage=stage, source=paths[-1] if paths else None)


def fit_from_files(paths: list[str] | str, overrides: list[str] | None = None, stage: str | None = None,
                   echo=print) -> dict:
    """`fit` the config of `config_from_files(paths, overrides, stage)`; returns its summary."""
    return fit(config_from_files(paths, overrides, stage), echo=echo)


def merge_dicts(base: dict, new: dict) -> dict:
    """`base` with `new` on top, nested mappings merged key by key."""
    out = dict(base)
    for k, v in new.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
