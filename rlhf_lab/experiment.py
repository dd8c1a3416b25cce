"""One stage from one config: what `rlhf-lab fit STAGE --config FILE.yaml` runs.

A `FitConfig` holds everything a run needs: the stage and its hyperparameters (`config`, the
stage's own dataclass), the model (`model`), the data (`data`, or a built-in `task`), the reward
source of the online stages (`reward`), periodic evaluation (`eval`), the Trainer (`trainer`)
and the loggers (`logger`). `fit(config)` builds the policy, the data and the stage, trains,
and writes `<out>/<stage>/`: the policy as an HF folder (the next stage's `model.backbone`),
Lightning's `metrics.csv`, the resolved `config.yaml` and `summary.json`.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from rlhf_lab.data import DataConfig, GSM8KJudge, load_data, prompts_of
from rlhf_lab.runs.builder import (
    EvalConfig,
    FitConfig,
    ModelConfig,
    RewardConfig,
    TrainerConfig,
    build_fit_config,
    build_run,
)

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "FitConfig", "ModelConfig", "RewardConfig", "TrainerConfig", "build_fit_config",
           "config_from_files", "evaluate_checkpoint", "fit", "fit_from_files"]


def fit(config: FitConfig, echo=print, resume: bool = False, overwrite: bool = False) -> dict:
    """Train `config.stage` and write `<out>/<stage>/`; returns the summary (also in summary.json).

    `resume` continues the run in that folder from its newest checkpoint (a finished run is
    returned as it is); `overwrite` deletes the folder first; without either, a folder that holds
    anything is refused. This is `build_run(config, resume=..., overwrite=...).fit()`: the summary holds `metrics` (the last value of every logged
    scalar, then the last evaluation), `history` (one dict of val/ metrics per evaluation, with its
    `step`), `steps`, `seconds`, the row counts and the resolved `config`.
    """
    return build_run(config, resume=resume, overwrite=overwrite).fit(echo=echo)


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
    from rlhf_lab.rewards import CallableSource, RewardModelSource, check_scores
    from rlhf_lab.tasks import get_task

    if task is None and data_path is None:
        raise ValueError("give a task or a data file to evaluate on")
    torch.manual_seed(seed)
    policy = Policy.load(checkpoint, expect="policy", field="the checkpoint to evaluate").eval()
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
    reward_fn = RewardModelSource(Policy.load(reward_model, scalar_head=True, expect="reward_model",
                                              field="--reward-model")) if reward_model else None
    ref_policy = Policy.load(reference, expect="policy", field="--reference").eval() if reference else None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # The win rate against the reference is judged by the reward model, else by the gold judge.
        judge = reward_fn or gold
        result = evaluate_policy(policy, prompts, reward_fn=reward_fn, gold_fn=gold, win_judge=judge,
                                 reference=ref_policy if judge is not None else None, references=references,
                                 max_new_tokens=max_new, greedy=greedy, generator=generator, max_rows=None)
        metrics = dict(result.metrics)
        if ref_policy is not None:
            # KL(policy ‖ reference) on the policy's own samples at temperature 1, per sequence (k3, never negative).
            rollout = policy.generate(prompts, max_new_tokens=max_new, generator=generator)
            ref_lp = ref_policy.logprobs(rollout.input_ids, rollout.attention_mask)
            metrics["val/kl"] = sequence_kl(rollout.logprobs, ref_lp, rollout.response_mask.float())
        if pairs is not None and reward_fn is not None:
            pair_prompts = [r["prompt"] for r in pairs]
            chosen = check_scores(reward_fn(pair_prompts, [r["chosen"] for r in pairs]), len(pairs), reward_fn,
                                  pair_prompts)
            rejected = check_scores(reward_fn(pair_prompts, [r["rejected"] for r in pairs]), len(pairs), reward_fn,
                                    pair_prompts)
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
    win over every file); `stage` wins over the files' `stage`.

    A relative path in a file (`data.path`, `data.val_path`, `model.backbone`, `model.tokenizer`,
    `reward.path`) is relative to that file's folder when it exists there, so a shipped config runs
    from any directory; paths on the command line are relative to the current directory.
    """
    from rlhf_lab.config import apply_overrides, load_yaml, parse_overrides

    paths = [paths] if isinstance(paths, str) else list(paths)
    data: dict = {}
    for path in paths:
        data = merge_dicts(data, _relative_to(load_yaml(path), os.path.dirname(os.path.abspath(path))))
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


# Keys whose values are paths; a relative one in a config file is read from the file's folder.
PATH_KEYS = (("data", "path"), ("data", "val_path"), ("model", "backbone"), ("model", "tokenizer"),
             ("reward", "path"))


def _relative_to(data: dict, folder: str) -> dict:
    """`data` with each relative path of PATH_KEYS that exists under `folder` made absolute."""
    data = dict(data)
    for section, key in PATH_KEYS:
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not os.path.isabs(value):
            candidate = os.path.normpath(os.path.join(folder, value))
            if os.path.exists(candidate):
                data[section] = {**node, key: candidate}
    return data


def split_overrides(args: list[str], stages: tuple[str, ...]) -> dict[str, list[str]]:
    """Split a multi-stage script's `--key value` arguments by stage.

    `--NAME.key value` (NAME in `stages`) goes to stage NAME only, as `--key value`; any other
    override goes to every stage. Returns `{stage: overrides}` for each of `stages`.
    """
    from rlhf_lab.config import parse_overrides

    out: dict[str, list[str]] = {s: [] for s in stages}
    for key, value in parse_overrides(list(args)):
        head, _, rest = key.partition(".")
        targets = [head] if head in stages and rest else list(stages)
        arg = rest if head in stages and rest else key
        for stage in targets:
            out[stage].append(f"--{arg}={json.dumps(value) if not isinstance(value, str) else value}")
    return out
