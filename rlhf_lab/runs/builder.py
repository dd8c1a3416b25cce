"""The one builder: typed configs in, a ready run out.

`build_run(FitConfig)` resolves the name being trained (a base stage, `online_rl`, or an algorithm of
the registry), loads its data (a built-in task, files, or rows handed in), builds the policy
(`ModelConfig`: backbone, tokenizer, LoRA, reference, critic), the reward source
(`RewardConfig`), the stage, the evaluation (`EvalConfig` → the one `EvalCallback`), the loggers
and the Trainer, and returns a `Run` whose `fit()` trains and writes `<out>/<name>/`.

`rlhf-lab fit` is `build_run(config).fit()`; the demo is a list of such configs (pretrain, SFT,
reward model, the algorithm); compare is algorithms × seeds of the same call. None of them builds a
policy, a stage or an evaluation any other way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rlhf_lab.algorithms import BASE_STAGES, fit_names, get_algorithm, stage_classes
from rlhf_lab.checks import check_choice, check_positive
from rlhf_lab.data.spec import DataConfig
from rlhf_lab.models.lora import LoraSettings
from rlhf_lab.runs.checkpoint import (
    CheckpointConfig,
    check_finished,
    checkpoint_callbacks,
    find_checkpoint,
    prepare_run_folder,
    read_complete,
    rng_state,
    set_rng_state,
    write_complete,
    write_json,
)
from rlhf_lab.runs.loggers import (
    LoggerConfig,
    finish_loggers,
    make_trainer,
    new_trainer,
    plain_config,
)

log = logging.getLogger(__name__)

__all__ = ["BudgetConfig", "CheckpointConfig", "EvalConfig", "FitConfig", "ModelConfig", "RewardConfig", "Run", "TrainerConfig",
           "build_fit_config", "build_policy", "build_reward", "build_run", "iteration_size", "stage_of"]

EVAL_AXES = ("step", "samples", "generated_tokens")
REWARD_SOURCES = ("gold", "gsm8k", "reward_model")
CRITICS = ("head", "adapter", "reward_model")


@dataclass
class ModelConfig:
    """The model a stage starts from."""

    backbone: str = "gpt2-tiny"  # a named tiny config or toy model, or a checkpoint / local HF model folder
    tokenizer: str | None = None  # a local tokenizer folder; None: the folder's own, or a BPE trained on the data
    vocab_size: int = 512  # size of the BPE tokenizer trained on the data (named backbones only)
    overrides: dict = field(default_factory=dict)  # config fields of a named backbone, e.g. {n_layer: 2}
    lora: LoraSettings | None = None  # train a LoRA adapter instead of all weights
    reference: str | None = None  # None: what the stage needs ("copy"; "base" with LoRA); or copy/base
    critic: str | None = None  # None: what the stage needs (head; adapter with LoRA) | reward_model: a copy of it

    def __post_init__(self):
        if self.critic is not None:
            check_choice("critic", self.critic, CRITICS)


@dataclass
class RewardConfig:
    """The reward of the online stages."""

    source: str = "gold"  # gold: the task's judge | gsm8k: GSM8K gold numbers of the data | reward_model
    path: str | None = None  # reward_model: the reward-model checkpoint folder
    normalize: bool = True  # reward_model: scale scores to mean 0, std 1 on the starting policy's samples
    normalize_prompts: int = 256  # how many training prompts (one sample each) the normalisation uses

    def __post_init__(self):
        check_choice("source", self.source, REWARD_SOURCES)
        check_positive("normalize_prompts", self.normalize_prompts)


@dataclass
class EvalConfig:
    """The run's evaluation (`EvalCallback`) on the first `prompts` validation prompts."""

    every: float = 0  # evaluate each time `axis` crosses a multiple of this; 0 = only at the start and end
    axis: str = "step"  # step (optimiser steps) | samples | generated_tokens
    prompts: int = 64  # how many validation prompts (0 = no evaluation)
    max_new_tokens: int | None = None  # None: the task's, else 32
    at_start: bool = True  # also evaluate before the first step
    greedy: bool = True  # greedy responses; false: sampled at temperature 1
    samples_per_prompt: int = 1  # sampled responses per prompt (greedy: false only)
    greedy_gold: bool = False  # with sampled responses, also the greedy gold score (val/greedy_gold_reward)
    seed: int = 1234  # seed of the evaluation's sampling: every evaluation draws the same numbers

    def __post_init__(self):
        check_positive("every", self.every, allow_zero=True)
        check_choice("axis", self.axis, EVAL_AXES)
        check_positive("prompts", self.prompts, allow_zero=True)
        check_positive("samples_per_prompt", self.samples_per_prompt)
        if self.greedy and self.samples_per_prompt != 1:
            raise ValueError("samples_per_prompt has no effect with greedy: true (greedy responses are "
                             f"one per prompt; got {self.samples_per_prompt}); set greedy: false")
        if self.greedy and self.greedy_gold:
            raise ValueError("greedy_gold has no effect with greedy: true (val/gold_reward is greedy already)")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; online stages count every optimiser step of an iteration.

    Besides these fields the section takes any other argument of `lightning.Trainer`
    (`accumulate_grad_batches`, `gradient_clip_val`, `num_nodes`, `profiler`, ...): in YAML and on
    the command line as `trainer.KEY`, in Python as `options={KEY: value}`. They are checked
    against the installed Lightning's Trainer (an unknown key is refused, naming the closest ones)
    and passed to it as they are; the arguments the builder sets itself (`TRAINER_OWNED`) are refused.
    """

    max_steps: int = 100  # optimiser steps (online_rl: iterations x ppo_epochs x minibatches)
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: Any = 1  # number of devices, or "auto"
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    strategy: str = "auto"  # auto | ddp | fsdp2 (rlhf_lab's: FSDP2, CPU too) | fsdp | deepspeed_stage_2 | ...
    val_check_interval: int | None = None  # optimiser steps between val passes; None = once per epoch
    log_every_n_steps: int = 1
    enable_progress_bar: bool = True
    on_nonfinite: str = "skip"  # skip the update and count it in train/skipped_steps | stop: fail naming the step
    # any other lightning.Trainer argument, e.g. {accumulate_grad_batches: 2} (YAML: trainer.KEY)
    options: dict = field(default_factory=dict, metadata={"flatten": True})

    def __post_init__(self):
        check_choice("on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        if self.options:
            check_trainer_options(self.options)
        if self.strategy == FSDP2 and not fsdp2_available():
            import torch

            raise ValueError(f"trainer.strategy {FSDP2} needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); "
                             f"this is torch {torch.__version__}: use ddp, or a newer torch")
        if self.strategy == FSDP2 and self._processes_per_node() is None:
            raise ValueError(f"trainer.strategy {FSDP2} needs trainer.devices as a number or a list of devices, "
                             f"got {self.devices!r}")

    def _processes_per_node(self) -> int | None:
        if isinstance(self.devices, (list, tuple)):
            return len(self.devices)
        return self.devices if isinstance(self.devices, int) and self.devices > 0 else None

    def _strategy(self):
        """The `strategy` Trainer argument: Lightning's name, or rlhf_lab's `fsdp2`, which is
        Lightning's `ModelParallelStrategy` with every process in one data-parallel dimension
        (no tensor parallelism) and whole-model checkpoints (one file, written by rank 0)."""
        if self.strategy != FSDP2:
            return self.strategy
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = self._processes_per_node() * int(self.options.get("num_nodes", 1))
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)

    def trainer_kwargs(self) -> dict:
        """The `lightning.Trainer` arguments of this section (all but `on_nonfinite`); the builder
        turns `val_check_interval` from optimiser steps into batches (× accumulate_grad_batches)."""
        kwargs = dict(accelerator=self.accelerator, devices=self.devices, precision=self.precision,
                      strategy=self._strategy(), log_every_n_steps=self.log_every_n_steps,
                      enable_progress_bar=self.enable_progress_bar)
        if self.val_check_interval:
            accumulate = self.options.get("accumulate_grad_batches", 1)
            kwargs.update(val_check_interval=self.val_check_interval * accumulate, check_val_every_n_epoch=None)
        return {**kwargs, **self.options}


# rlhf_lab's name for FSDP2 (torch's `fully_shard`) through Lightning's ModelParallelStrategy.
FSDP2 = "fsdp2"


def fsdp2_available() -> bool:
    """Whether this torch has FSDP2 as `torch.distributed.fsdp.fully_shard` (torch >= 2.6)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return False
    return True

# Trainer arguments the builder sets itself, with the reason a config may not give them.
TRAINER_OWNED = {
    "logger": "the logger section chooses the loggers (logger.kind: csv, wandb, both, none)",
    "callbacks": "the builder adds the run's callbacks (checkpoints, evaluation, the non-finite guard); "
                 "a script passes more as build_run(callbacks=...)",
    "enable_checkpointing": "checkpoint.every_n_steps sets it (0 = no checkpoints)",
    "default_root_dir": "the run folder is <out>/<stage>: set out",
    "plugins": "the builder sets the checkpoint I/O plugin; precision comes from trainer.precision and "
               "the cluster environment (SLURM, torchrun) is detected by Lightning",
    "use_distributed_sampler": "the stages split one global batch order across ranks themselves",
}
# Stages whose LightningModule optimises manually (`automatic_optimization = False`): Lightning
# refuses its own gradient clipping and accumulation there. `build_run` also checks the module.
MANUAL_OPTIMIZATION_STAGES = ("online_rl",)
_MANUAL_INSTEAD = {
    "gradient_clip_val": "clip with config.max_grad_norm (the global gradient norm of every update)",
    "gradient_clip_algorithm": "config.max_grad_norm clips by the global norm",
    "accumulate_grad_batches": "bound memory with config.micro_batch_size (an iteration's batch in chunks, "
                               "gradients accumulated within each update)",
}


@functools.lru_cache(maxsize=1)
def _trainer_parameters() -> tuple[dict, dict]:
    """`({name: default}, {name: type hint})` of the installed `lightning.Trainer.__init__`."""
    import inspect
    import typing

    from lightning.pytorch import Trainer

    params = {n: p.default for n, p in inspect.signature(Trainer.__init__).parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        hints = typing.get_type_hints(Trainer.__init__)
    except Exception:  # an annotation this Python cannot evaluate: Lightning checks the values itself
        hints = {}
    return params, {n: h for n, h in hints.items() if n in params}


def _hint_accepts(value, hint) -> bool:
    """Whether `value` (a YAML value, or an object from Python) fits the Trainer's annotation `hint`."""
    import collections.abc
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_hint_accepts(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, collections.abc.Iterable, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a form of annotation not checked here: Lightning checks it


def _hint_text(hint) -> str:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_hint_text(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint))


def check_trainer_options(options: dict) -> None:
    """Refuse, in one line naming the key, an option of `TrainerConfig.options` that is one of our
    own fields, an argument the builder sets (`TRAINER_OWNED`), not an argument of the installed
    `lightning.Trainer` (with the closest names), or a value its annotation does not take."""
    import difflib

    from rlhf_lab.config import ConfigError

    ours = [f.name for f in dataclasses.fields(TrainerConfig) if f.name != "options"]
    params, hints = _trainer_parameters()
    for key, value in options.items():
        if key in ours:
            raise ConfigError(f"trainer.options: {key} is a field of the trainer section; set trainer.{key}")
        if key in TRAINER_OWNED:
            raise ConfigError(f"trainer.{key} cannot be set: {TRAINER_OWNED[key]}")
        if key not in params:
            close = difflib.get_close_matches(str(key), list(dict.fromkeys([*ours, *params])), n=3, cutoff=0.7)
            hint = f"; did you mean {' or '.join(close)}?" if close else " (see docs/cli.md, trainer section)"
            raise ConfigError(f"unknown key(s) trainer.{key}: neither a trainer setting of ours nor an argument of "
                              f"lightning.Trainer{hint}")
        if key in hints and not _hint_accepts(value, hints[key]):
            raise ConfigError(f"trainer.{key}: lightning.Trainer takes {_hint_text(hints[key])}, got {value!r}")
    accumulate = options.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be an integer >= 1, got {accumulate!r}")
    if options.get("gradient_clip_algorithm") is not None and not options.get("gradient_clip_val"):
        raise ConfigError("trainer.gradient_clip_algorithm has no effect without trainer.gradient_clip_val")


def check_manual_optimization(name: str, options: dict) -> None:
    """Refuse Trainer options that a manually optimising stage cannot use, saying what to use instead."""
    from rlhf_lab.config import ConfigError

    set_ = {"gradient_clip_val": bool(options.get("gradient_clip_val")),
            "gradient_clip_algorithm": options.get("gradient_clip_algorithm") is not None,
            "accumulate_grad_batches": options.get("accumulate_grad_batches", 1) != 1}
    for key, given in set_.items():
        if given:
            raise ConfigError(f"trainer.{key} does not apply to '{name}': its stage optimises manually "
                              f"(several updates per iteration); {_MANUAL_INSTEAD[key]}")


@dataclass
class BudgetConfig:
    """Stop an online run once it has spent `amount` of `unit` (compare's equal budgets)."""

    amount: float = 0  # the budget
    unit: str = "samples"  # samples (responses sampled) | generated_tokens (response tokens, EOS included)

    def __post_init__(self):
        check_positive("amount", self.amount)
        check_choice("unit", self.unit, ("samples", "generated_tokens"))


def stage_of(name: str) -> str:
    """The stage that trains `name` (a base stage, `online_rl`, or a registered algorithm)."""
    if name in BASE_STAGES or name == "online_rl":
        return name
    return get_algorithm(name).stage


@dataclass
class FitConfig:
    """Everything one run needs; YAML files give any subset of these keys."""

    stage: str = "sft"  # pretrain | sft | reward_model | online_rl | an algorithm (ppo, grpo, dpo, ...)
    out: str = "runs/fit"  # run folder; the run writes <out>/<stage>/
    seed: int = 0
    task: str | None = None  # a built-in task (arithmetic, alice) as the data and gold judge
    data: DataConfig | None = None  # data from files (overrides the task's data)
    model: ModelConfig = field(default_factory=ModelConfig)
    config: Any = None  # the stage's hyperparameters (PretrainConfig, SFTConfig, ...); null = the preset
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    budget: BudgetConfig | None = None  # online stages: stop at this budget (max_steps then only bounds)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.stage not in fit_names():
            raise ValueError(f"stage must be one of {', '.join(fit_names())}, got {self.stage!r}")
        config_class = stage_classes(self.stage_name)[1]
        if self.config is None:
            self.config = (get_algorithm(self.stage).config() if self.algorithm is not None else config_class())
        if not isinstance(self.config, config_class):
            raise ValueError(f"config must be a {config_class.__name__} for '{self.stage}', "
                             f"got {type(self.config).__name__}")
        if self.task is not None:
            from rlhf_lab.tasks import TASKS

            if self.task not in TASKS:
                raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task is None and self.data is None:
            raise ValueError("give data (format and path) or a built-in task")
        if self.data is not None:
            from rlhf_lab.data.spec import check_stage_data

            check_stage_data(self.stage_name, self.data)
            if self.data.kind == "unpaired" and self.stage_name == "dpo" and self.config.variant != "kto":
                raise ValueError(f"data.format '{self.data.format}' gives unpaired rows (prompt/completion/label), "
                                 f"which only variant 'kto' trains on (`fit kto`); variant '{self.config.variant}' "
                                 "needs pairs: formats preference, hh or gsm8k_pairs")
        if self.budget is not None and self.stage_name not in ("online_rl", "online_dpo"):
            raise ValueError(f"budget applies to the online stages, not to '{self.stage}' (use trainer.max_steps)")
        if self.stage_name in MANUAL_OPTIMIZATION_STAGES:
            check_manual_optimization(self.stage, self.trainer.options)
        if getattr(self.config, "update", None) == "trpo" and (
                self.trainer.strategy == FSDP2 or self.trainer.options.get("num_nodes", 1) != 1
                or isinstance(self.trainer.devices, int) and self.trainer.devices > 1):
            raise ValueError(f"update 'trpo' trains on one process (trainer.devices {self.trainer.devices}, "
                             f"num_nodes {self.trainer.options.get('num_nodes', 1)}): its conjugate-gradient step "
                             "and line search are not distributed")
        if self.trainer.strategy == FSDP2 and self.model.lora is not None:
            raise ValueError(f"trainer.strategy {FSDP2} does not shard a LoRA policy (model.lora is set): its "
                             "frozen base and adapters are switched in place; train it with strategy ddp")
        if getattr(self.config, "update", None) == "trpo" and self.trainer.precision.startswith("16"):
            raise ValueError(f"trainer.precision {self.trainer.precision} does not apply to update 'trpo': its "
                             "natural-gradient step runs outside fp16 loss scaling; use bf16-mixed or 32-true")

    @property
    def stage_name(self) -> str:
        """The stage (LightningModule) that trains this run."""
        return stage_of(self.stage)

    @property
    def algorithm(self):
        """The registry entry of an algorithm run, else None (base stages and `online_rl`)."""
        return None if self.stage in BASE_STAGES or self.stage == "online_rl" else get_algorithm(self.stage)


def build_fit_config(data: dict, stage: str | None = None, source: str | None = None) -> FitConfig:
    """A `FitConfig` from a YAML mapping; `stage` (from the command line) wins over the file's.

    For an algorithm the config's keys override its preset (`config: {lr: 1e-4}` on top of GRPO's
    knobs). `online_rl` takes `config.preset: NAME` for the same. A `config.preset` that names
    another algorithm than the stage is an error, and so is a stage on the command line that the
    file's `stage` contradicts when the file's stage is an algorithm.
    """
    from rlhf_lab.config import ConfigError, build

    data = dict(data)
    where = f"{source}: " if source else ""
    file_stage = data.get("stage")
    if stage is not None:
        if file_stage not in (None, stage, *BASE_STAGES, "online_rl"):
            raise ConfigError(f"{where}the file trains '{file_stage}' but the command line says '{stage}'; "
                              f"run `fit {file_stage}`, or remove `stage` from the file")
        data["stage"] = stage
    name = data.get("stage", "sft")
    if name not in fit_names():
        raise ConfigError(f"{where}stage must be one of {', '.join(fit_names())}, got {name!r}")
    stage_config = dict(data.get("config") or {})
    preset = stage_config.pop("preset", None)
    if preset is not None:
        if stage_of(name) != "online_rl" and name != preset:
            raise ConfigError(f"{where}config.preset applies to the online RL stages, not to '{name}'")
        if name != "online_rl" and preset != name:
            raise ConfigError(f"{where}config.preset is '{preset}' but the stage is '{name}': the file "
                              f"describes {preset}; run `fit {preset}`, or drop config.preset")
        try:
            algorithm = get_algorithm(preset)
        except ValueError as e:
            raise ConfigError(f"{where}config.preset: {e}") from None
        if algorithm.stage != "online_rl":
            raise ConfigError(f"{where}config.preset '{preset}' is not an online RL algorithm")
        if name == "online_rl":
            stage_config = {"algorithm": preset, **algorithm.preset, **stage_config}
    if name not in BASE_STAGES and name != "online_rl":
        algorithm = get_algorithm(name)
        stage_config = {**({"algorithm": name} if algorithm.stage == "online_rl" else {}),
                        **algorithm.preset, **stage_config}
    if stage_config or "config" in data:
        data["config"] = stage_config
    return build(FitConfig, data, hooks={"config": stage_classes(stage_of(name))[1]}, source=source)


# --------------------------------------------------------------------------- building blocks


def _is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                       ("rlhf_lab_policy.json", "config.json", "adapter_config.json"))


def build_policy(model: ModelConfig, tokenizer_texts: list[str] | None = None, scalar_head: bool | None = None,
                 reference: str | None = None, critic=None, expect: str | None = "policy"):
    """The Policy of `model`: a named backbone built fresh (tokenizer trained on `tokenizer_texts`
    unless `model.tokenizer` names one), or a checkpoint / local HF folder loaded as it is.

    `expect="policy"` refuses a reward model's checkpoint (None: the reward-model stage, which may
    start from either); a near miss of a named backbone ("gpt2-tiy") is refused with the closest names."""
    from rlhf_lab.models.backbones import (
        backbone_names,
        build_tiny_model,
        check_backbone_name,
        load_backbone,
    )
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
    check_backbone_name(model.backbone, "model.backbone")
    if model.overrides:
        raise ValueError("model.overrides apply to named backbones only, not to the folder "
                         f"{model.backbone!r}")
    if os.path.isdir(model.backbone):
        check_finished(model.backbone, "model.backbone")
    if os.path.exists(os.path.join(model.backbone, "rlhf_lab_policy.json")):
        return Policy.load(model.backbone, scalar_head=scalar_head, reference=reference, critic=critic,
                           lora=model.lora, expect=expect, field="model.backbone")
    if not _is_checkpoint(model.backbone) and os.path.sep in model.backbone and not os.path.exists(model.backbone):
        raise FileNotFoundError(f"model.backbone: no such folder {model.backbone!r}")
    tokenizer = load_tokenizer(model.tokenizer or model.backbone)
    return Policy(load_backbone(model.backbone, tokenizer), tokenizer, scalar_head=bool(scalar_head),
                  reference=reference, critic=critic, lora=model.lora)


def build_reward(reward: RewardConfig, gold=None, data: DataConfig | None = None):
    """The reward source of an online run: the gold judge, GSM8K's numbers, or a reward model
    (normalised later, on the starting policy's samples, by `build_run`)."""
    if reward.source == "reward_model":
        from rlhf_lab.policy import Policy
        from rlhf_lab.rewards import RewardModelSource

        if not reward.path:
            raise ValueError("reward.source is reward_model: set reward.path to its checkpoint folder")
        if not os.path.isdir(reward.path):
            raise FileNotFoundError(f"reward.path: no such folder {reward.path!r}")
        check_finished(reward.path, "reward.path")
        return RewardModelSource(Policy.load(reward.path, scalar_head=True, expect="reward_model",
                                             field="reward.path"))
    if reward.source == "gsm8k":
        if data is None or data.format not in ("gsm8k", "gsm8k_pairs"):
            raise ValueError("reward.source gsm8k needs data.format gsm8k (the gold numbers)")
        return gold
    if gold is None:
        raise ValueError("reward.source gold needs a task with a judge (or data.format gsm8k)")
    return gold


def _task_rows(stage: str, task, seed: int):
    if stage == "pretrain":
        corpus = task.pretrain_corpus(seed=seed)
        n_val = max(1, len(corpus) // 20)
        return corpus[n_val:], corpus[:n_val]
    if stage == "sft":
        return task.sft_pairs(seed=seed)
    if stage in ("online_rl", "online_dpo"):
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
    from rlhf_lab.stages.dpo import REFERENCE_FREE

    stage, c = config.stage_name, config.config
    needs = stage in ("online_rl", "online_dpo") or (stage == "dpo" and c.variant not in REFERENCE_FREE)
    if not needs:
        return None
    return "base" if config.model.lora is not None else "copy"


def iteration_size(stage: str, config, n_prompts: int) -> tuple[int, int]:
    """(responses sampled, optimiser steps) of one iteration of an online stage over `n_prompts` prompts."""
    if stage == "online_dpo":
        return 2 * min(config.batch_size, n_prompts), 1
    return min(config.prompts_per_step, n_prompts) * config.samples_per_prompt, config.steps_per_iteration


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """A built run: call `fit()` to train it and write `<out>/<name>/`.

    `ckpt_path` is the checkpoint a resumed run continues from (None: from the start);
    `finished` is a resumed run whose folder is complete (fit() only reads its summary).
    """

    config: FitConfig
    policy: Any
    stage: Any  # the LightningModule
    trainer: Any
    evaluator: Any  # the EvalCallback, or None
    reward_fn: Any
    gold_fn: Any
    train_rows: list
    val_rows: list
    out_dir: str
    resolved: dict  # the config as plain values (config.yaml, the loggers' hyperparameters)
    start: float = field(default_factory=time.perf_counter)
    ckpt_path: str | None = None
    finished: bool = False

    @property
    def name(self) -> str:
        return self.config.stage

    def fit(self, save: bool = True, echo=None) -> dict:
        """Train, save the policy to `out_dir` (rank 0), write summary.json and the completion
        marker (COMPLETE.json, last); returns the summary.

        The summary holds `metrics` (the last value of every logged scalar, then a last validation
        pass of the stage, then the last evaluation), `history` (one row per evaluation),
        `steps`, `seconds`, the row counts and the resolved `config`. A finished run returns its
        saved summary and trains nothing.
        """
        import torch

        if self.finished:
            with open(os.path.join(self.out_dir, "summary.json")) as f:
                summary = json.load(f)
            if echo is not None:
                echo(f"{self.name}: finished already ({summary['steps']} steps) -> {self.out_dir}/")
            return summary
        trainer, stage = self.trainer, self.stage
        if self.ckpt_path is not None and echo is not None and _launch_rank() == 0:
            echo(f"{self.name}: resuming from {self.ckpt_path}")
        try:
            trainer.fit(stage, ckpt_path=self.ckpt_path)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if torch.is_tensor(v) and v.numel() == 1}
            if self.val_rows and self.config.stage_name in ("pretrain", "sft", "reward_model", "dpo"):
                metrics.update(trainer.validate(stage, verbose=False)[0])  # val/ of the final weights
            if self.evaluator is not None and self.evaluator.history:
                metrics.update({k: v for k, v in self.evaluator.history[-1].items() if k.startswith("val/")})
        finally:
            finish_loggers(trainer)
        if trainer.interrupted:  # Ctrl-C / SIGTERM: no final folder, resume from the checkpoint
            raise KeyboardInterrupt(f"{self.name} was interrupted at step {trainer.global_step}; "
                                    f"continue it with --resume ({self.out_dir})")
        if save:  # every rank: a sharded policy is gathered whole first; rank 0 writes
            self.policy.save(self.out_dir, extra={"stage": self.name, "config": dataclasses.asdict(self.config.config)},
                             write=trainer.is_global_zero)
        summary = {"stage": self.name, "out": self.out_dir, "steps": trainer.global_step,
                   "seconds": time.perf_counter() - self.start, "metrics": metrics,
                   "history": self.evaluator.history if self.evaluator is not None else [],
                   "train_history": list(getattr(stage, "history", [])),
                   "train_rows": len(self.train_rows), "val_rows": len(self.val_rows), "config": self.resolved}
        if trainer.is_global_zero:
            write_json(os.path.join(self.out_dir, "summary.json"), summary)
            # The random states as this run left them: a pipeline that finds the run finished goes
            # on from them (`_finished_run`), as it would have after training it.
            torch.save(rng_state(), os.path.join(self.out_dir, END_RNG_FILE))
            write_complete(self.out_dir, {"stage": self.name, "steps": trainer.global_step,
                                          "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        if echo is not None and trainer.is_global_zero:  # one report, not one per rank
            echo(f"{self.name}: {trainer.global_step} steps in {summary['seconds']:.0f} s -> {self.out_dir}/")
            for k, v in sorted(metrics.items()):
                if not k.startswith("budget/"):
                    echo(f"  {k:<24} {v:.4g}")
        return summary


END_RNG_FILE = "end_rng.pt"


def _launch_rank() -> int:
    """This process's global rank as its launcher set it (Lightning's subprocess launcher,
    torchrun, SLURM), known before the Trainer exists; 0 for a one-process run."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)

# Keys that may differ between a run and its resumption: how it is logged, saved, watched and bounded,
# not what it trains. Any other Trainer option (accumulate_grad_batches, gradient_clip_val, precision,
# devices, strategy, deterministic, ...) changes the numbers, so it must stay as the run started.
RESUMABLE_CHANGES = ("out", "trainer.enable_progress_bar", "trainer.max_steps", "trainer.on_nonfinite", "logger.",
                     "checkpoint.", "trainer.profiler", "trainer.enable_model_summary", "trainer.detect_anomaly",
                     "trainer.max_time", "trainer.max_epochs")


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _check_same_config(out_dir: str, resolved: dict) -> None:
    """Refuse to resume a run with a config that trains something else than the saved one."""
    from rlhf_lab.config import ConfigError, load_yaml

    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        return
    saved, now = _flat(plain_config(load_yaml(path))), _flat(json.loads(json.dumps(resolved)))
    diffs = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
             and not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)]
    if diffs:
        shown = ", ".join(f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in diffs[:5])
        raise ConfigError(f"{path}: cannot resume with a different config: {shown}"
                          f"{' and more' if len(diffs) > 5 else ''}; use the saved config, or --overwrite")


def build_run(config: FitConfig, *, rows: tuple[list, list] | None = None, reward_fn=None, gold_fn=None,
              task=None, eval_prompts: list[str] | None = None, references: list[str] | None = None,
              run_config: Any = None, callbacks: list | None = None, eval_kwargs: dict | None = None,
              out_dir: str | None = None, reseed: bool = True, resume: bool = False,
              overwrite: bool = False) -> Run:
    """Build everything one run needs from `config`; returns a `Run` (call `.fit()`).

    The keyword arguments let a pipeline hand in what it has in memory instead of on disk:
    `rows` = (train, val) rows instead of the task's or the files' data, `reward_fn` (e.g. a reward
    model normalised once for a whole comparison), `gold_fn`, `task` (a task object),
    `eval_prompts` / `references` for the evaluation, `run_config` (recorded by the loggers instead of
    the resolved config), extra `callbacks`, `eval_kwargs` (more `EvalCallback` arguments) and
    `out_dir` (default `<out>/<stage>`). `reseed=False` keeps the random stream where a pipeline
    left it (the demo seeds once, before its first stage) instead of seeding with `config.seed`.

    The run folder must be empty or missing, unless `resume` (continue from its newest checkpoint;
    a finished folder gives a `Run` whose `finished` is true, with its saved policy) or
    `overwrite` (delete it first); see `rlhf_lab.runs.checkpoint.prepare_run_folder`. Nothing is
    written before these checks pass.
    """
    import lightning as L

    from rlhf_lab.data import GSM8KJudge, load_data, prompts_of
    from rlhf_lab.eval import EvalCallback
    from rlhf_lab.rewards import CallableSource
    from rlhf_lab.tasks import get_task

    c, stage = config, config.stage_name
    out_dir = out_dir or os.path.join(c.out, c.stage)
    _check_trainer(c.trainer)
    if _launch_rank() == 0:
        mode, ckpt_path = prepare_run_folder(out_dir, resume=resume, overwrite=overwrite)
    else:  # another process of a multi-process run: rank 0 owns the folder, this one only reads it
        mode, ckpt_path = "new", find_checkpoint(out_dir) if resume else None
    if mode == "finished":
        return _finished_run(c, out_dir)
    if reseed:
        L.seed_everything(c.seed, verbose=False)
    if task is None and c.task:
        task = get_task(c.task)
    if rows is not None:
        train, val = list(rows[0]), list(rows[1] or [])
    elif c.data is not None:
        train, val = load_data(c.data)
    elif task is not None:
        train, val = _task_rows(stage, task, c.seed)
    else:
        raise ValueError("give data (format and path) or a built-in task")
    train, val = list(train), list(val or [])
    if not train:  # before the stage (and its folder) is built, naming where the rows came from
        from rlhf_lab.errors import DataError

        source = ("the rows handed to build_run" if rows is not None else c.data.path if c.data is not None
                  else f"task {c.task or getattr(task, 'name', '')}")
        raise DataError(source, problem=f"no training rows for '{c.stage}' (after filtering); it needs at least one")
    online = stage in ("online_rl", "online_dpo")
    prompts = prompts_of(train) if online else None
    if eval_prompts is None:  # the validation rows' prompts (pretraining text has none)
        eval_prompts = prompts_of(val) if val and (online or not isinstance(val[0], str)) else []
        # Unpaired rows' completions include undesirable ones: no references to score against.
        if references is None and val and isinstance(val[0], dict) and "completion" in val[0] and "label" not in val[0]:
            references = [r["completion"] for r in val]

    if gold_fn is None:
        if task is not None:
            gold_fn = CallableSource(task.gold_reward)
        elif c.data is not None and c.data.format in ("gsm8k", "gsm8k_pairs"):
            gold_fn = CallableSource(GSM8KJudge([*train, *val]))

    # The reward: handed in as it is, or built from the config (a reward model is normalised on
    # samples of the starting policy, so its scores read in standard deviations of that policy's).
    # A fresh tokenizer learns from the task's own text when the task gives the data, else from the rows.
    if task is not None and rows is None and c.data is None:
        texts = task.tokenizer_texts()
    else:
        texts = _texts(train) + (task.tokenizer_texts() if task is not None else [])
    normalize = False
    if online and reward_fn is None:
        reward_fn = build_reward(c.reward, gold_fn, c.data)
        normalize = c.reward.source == "reward_model" and c.reward.normalize

    def normalized(source, sampler):
        samples = sampler.generate(prompts[: c.reward.normalize_prompts], max_new_tokens=c.config.max_new_tokens,
                                   temperature=getattr(c.config, "temperature", 1.0))
        return source.normalize(samples.prompts, samples.completions)

    # The policy, with what the stage needs of a reference and a critic.
    scalar_head = stage == "reward_model" or None
    critic = None
    if stage == "online_rl" and c.config.baseline == "critic":
        kind = c.model.critic or ("adapter" if c.model.lora is not None else "head")
        if kind == "reward_model":  # a copy of the (normalised) reward model (Ouyang et al. 2022)
            if not hasattr(reward_fn, "as_critic"):
                raise ValueError("model.critic reward_model needs reward.source reward_model")
            if normalize:  # the critic copies the normalised head: sample the starting policy first
                plain = dataclasses.replace(c.model, lora=None)
                reward_fn, normalize = normalized(reward_fn, build_policy(plain, texts)), False
            critic = reward_fn.as_critic()
        elif kind == "adapter":
            critic = "adapter"
        else:
            scalar_head = True
    elif c.model.critic is not None:
        raise ValueError(f"model.critic has no effect for '{c.stage}' (it trains no critic; got {c.model.critic!r})")
    policy = build_policy(c.model, texts, scalar_head=scalar_head, reference=_reference_mode(c), critic=critic,
                          expect=None if stage == "reward_model" else "policy")
    if normalize:
        reward_fn = normalized(reward_fn, policy)

    stage_class = stage_classes(stage)[0]
    if online:
        module = stage_class(policy, prompts, reward_fn, c.config, gold_fn=gold_fn)
    else:  # Pretrain, SFT, RewardModel, DPO: (policy, train rows, val rows, config)
        module = stage_class(policy, train, val or None, c.config)
    if not module.automatic_optimization:  # Lightning's clipping and accumulation do not apply
        check_manual_optimization(c.stage, c.trainer.options)

    # The evaluation: the one EvalCallback, for every stage but the reward model's.
    callbacks = list(callbacks or [])
    evaluator = None
    eval_prompts = eval_prompts[: c.eval.prompts] if c.eval.prompts else []
    max_steps = c.trainer.max_steps
    stop_at = None
    if c.budget is not None:
        per_iteration, steps_per_iteration = iteration_size(stage, c.config, len(prompts))
        # The callback stops the run; max_steps only bounds it (every response has ≥ 1 token).
        max_steps = (math.ceil(c.budget.amount / per_iteration) + 1) * steps_per_iteration
        stop_at = c.budget.amount
    if eval_prompts and stage != "reward_model":
        max_new = c.eval.max_new_tokens or (task.max_new_tokens if task is not None else 32)
        extra = dict(eval_kwargs or {})
        if not c.eval.greedy:
            extra.update(greedy=False, temperature=1.0, samples_per_prompt=c.eval.samples_per_prompt)
        evaluator = EvalCallback(
            eval_prompts, every=c.eval.every, axis=c.eval.axis, reward_fn=reward_fn, gold_fn=gold_fn,
            references=references[: len(eval_prompts)] if references else None, max_new_tokens=max_new,
            at_start=c.eval.at_start, greedy_gold=c.eval.greedy_gold, eval_seed=c.eval.seed,
            stop_at=stop_at, **extra)
        callbacks.append(evaluator)
    elif stop_at is not None:
        raise ValueError("budget needs an evaluation to stop the run: set eval.prompts > 0")
    # No optimiser step applies a NaN/inf gradient: skipped and counted (train/skipped_steps), or stopped.
    from rlhf_lab.stages.guards import NonFiniteGuard

    callbacks.append(NonFiniteGuard(c.trainer.on_nonfinite))

    resolved = plain_config(c)
    from rlhf_lab.config import dump_yaml

    if ckpt_path is not None:
        _check_same_config(out_dir, resolved)
    if _launch_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, f"config.yaml.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(dump_yaml(resolved))
        os.replace(tmp, os.path.join(out_dir, "config.yaml"))
    # Checkpoints: RunState goes first, so it writes a checkpoint before the others log the next step.
    state_callbacks, checkpoint_io = checkpoint_callbacks(out_dir, c.checkpoint)
    callbacks = [*state_callbacks[:1], *callbacks, *state_callbacks[1:]]
    # The trainer section as it is (any Trainer argument), then what the builder owns.
    trainer = make_trainer(os.path.dirname(out_dir), os.path.basename(out_dir), max_steps, logger=c.logger,
                           run_id=_wandb_id(out_dir) if c.logger.kind in ("wandb", "both") else None,
                           run_config=run_config if run_config is not None else resolved, callbacks=callbacks,
                           **c.trainer.trainer_kwargs(), plugins=[checkpoint_io],
                           enable_checkpointing=bool(c.checkpoint.every_n_steps))
    return Run(config=c, policy=policy, stage=module, trainer=trainer, evaluator=evaluator, reward_fn=reward_fn,
               gold_fn=gold_fn, train_rows=train, val_rows=val, out_dir=out_dir, resolved=resolved,
               ckpt_path=ckpt_path)


def _check_trainer(t: TrainerConfig) -> None:
    """Let Lightning refuse a trainer section it cannot run (a strategy on this machine, a precision)
    before any file is touched: a bare Trainer of the same arguments costs milliseconds and draws no
    random number. Its start-up lines are silenced; the run's own Trainer prints them."""
    names = ("lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(max(levels[name], logging.WARNING))
        new_trainer(**t.trainer_kwargs(), logger=False, enable_checkpointing=False, max_steps=t.max_steps)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _wandb_id(out_dir: str) -> str:
    """The wandb run id of the run in `out_dir`: made once and kept in `out_dir/wandb_id`, so a
    resumed run logs to the wandb run it started."""
    import uuid

    path = os.path.join(out_dir, "wandb_id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


def _finished_run(config: FitConfig, out_dir: str) -> Run:
    """The `Run` of a finished folder: its saved policy and summary, nothing to train."""
    import torch

    from rlhf_lab.policy import Policy

    info = read_complete(out_dir)
    if os.path.exists(os.path.join(out_dir, END_RNG_FILE)):
        set_rng_state(torch.load(os.path.join(out_dir, END_RNG_FILE), weights_only=True))
    if info.get("stage") != config.stage:
        raise ValueError(f"{out_dir} holds a finished '{info.get('stage')}' run, not '{config.stage}'")
    policy = Policy.load(out_dir, scalar_head=True if config.stage_name == "reward_model" else None)
    return Run(config=config, policy=policy, stage=None, trainer=None, evaluator=None, reward_fn=None,
               gold_fn=None, train_rows=[], val_rows=[], out_dir=out_dir, resolved=plain_config(config),
               finished=True)
