"""Run a comparison: one shared base, then every algorithm × seed at one budget, then the report.

A comparison folder `DIR` holds:

    compare.json              the settings every run depends on (`CompareConfig.identity`)
    base/                     pretrain/, sft/, reward_model/ (HF folders) and base.json, the
                              base's done-marker (reward normalisation, stage summaries)
    runs/<alg>-s<seed>/       <alg>/metrics.csv (Lightning), history.json (the measurements along
                              the budget), policy/ (the final policy), and result.json, the run's
                              final row, written last: a run is finished exactly when it exists
    report.md, summary.json, reward_vs_budget.png, gold_vs_proxy.png, reward_kl_frontier.png

Re-running the same command skips the base when base.json exists and every run whose
result.json exists, so an interrupted comparison finishes only what is missing: an interrupted
run goes on from its last checkpoint (`CompareConfig.checkpoint_every`), exactly as if it had not
stopped, and so does an interrupted base; a run that stopped before its first checkpoint starts again.

Every run starts from `base/sft` and is scored by the same normalised reward model (the proxy);
the task's gold judge only measures. The budget is counted by `rlhf_lab.stages.common.Budget`:
`budget/samples` (responses sampled) or `budget/generated_tokens` (response tokens, EOS included).
Online algorithms stop at the first iteration at which their counter reaches the budget. DPO
first samples responses from the SFT policy, in the online algorithms' batches, until the same
counter reaches the budget, ranks each prompt's responses with the proxy into pairs, and then
trains on them (`DemoConfig.dpo`): its optimiser steps sample nothing and are not counted.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import lightning as L
import torch

from rlhf_lab.compare.config import CompareConfig
from rlhf_lab.demo import build_base, rank_into_pairs
from rlhf_lab.policy import Policy
from rlhf_lab.rewards import RewardModelSource, check_scores
from rlhf_lab.runs.checkpoint import find_checkpoint
from rlhf_lab.runs.loggers import LoggerConfig, quiet_libraries
from rlhf_lab.tasks import get_task

__all__ = ["CompareConfigError", "CompareOutcome", "run_compare", "run_one", "run_logger_config"]

BASE_DIR, RUNS_DIR = "base", "runs"
CONFIG_FILE, BASE_MARKER = "compare.json", "base.json"
RESULT_FILE, HISTORY_FILE = "result.json", "history.json"


class CompareConfigError(ValueError):
    """The folder holds a comparison with other settings (or a broken base); nothing was run."""


@dataclass
class CompareOutcome:
    """What `run_compare` did: the runs it executed and skipped, and where the report is."""

    out: str  # the comparison folder
    executed: list[str]  # runs (`<alg>-s<seed>`) this call trained, in the order they finished
    skipped: list[str]  # runs already finished in the folder (result.json present)
    base_built: bool  # whether this call built the base (False: it was there)
    report: str  # path of report.md
    results: list[dict]  # result.json of every run of the comparison, in algorithm × seed order
    seconds: float  # wall time of this call


def run_name(algorithm: str, seed: int) -> str:
    """The run's folder name under `runs/`: `<algorithm>-s<seed>`; returns a str."""
    return f"{algorithm}-s{seed}"


def _write_json(path: str, data) -> None:
    """Write JSON atomically: a reader (or a resume) never sees a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------- one run
def run_logger_config(kind: str, group: str, algorithm: str, seed: int, task: str):
    """The `LoggerConfig` of one run: wandb group = the comparison, tags = algorithm and seed.

    Every run of a comparison goes into one wandb group (the comparison folder's name) as its
    own wandb run, `<group>-<algorithm>-s<seed>`, tagged `algorithm:<alg>`, `seed:<seed>` and
    `task:<task>`, so the dashboard groups or filters them at once. Returns a LoggerConfig.
    """
    return LoggerConfig(kind=kind, group=group, name=f"{group}-{run_name(algorithm, seed)}",
                        tags=[f"algorithm:{algorithm}", f"seed:{seed}", f"task:{task}", "compare"])


def load_reward_source(base_dir: str):
    """The comparison's proxy: the base's reward model with its saved normalisation; returns a RewardModelSource."""
    info = _read_json(os.path.join(base_dir, BASE_MARKER))
    return RewardModelSource(Policy.load(os.path.join(base_dir, "reward_model")),
                             shift=info["reward_shift"], scale=info["reward_scale"])


def _sample_budget(policy, prompts: list[str], reward_fn, config: CompareConfig, per_step: int, group: int,
                   max_new_tokens: int, seed: int) -> tuple[list[str], list[str], list[float], int, int]:
    """DPO's budget: sample from `policy` (the SFT policy) in the online algorithms' batches.

    Each round takes the next `prompts_per_step` prompts of a seeded shuffle (a new one per pass,
    the last partial batch dropped, as the online loaders do) and samples `samples_per_prompt`
    responses each at temperature 1, until the budget counter reaches the budget. Returns the
    rows' prompts, completions and proxy scores, and the samples and tokens spent.
    """
    gen = torch.Generator().manual_seed(seed)
    rows_p: list[str] = []
    rows_c: list[str] = []
    scores: list[float] = []
    samples = tokens = 0
    order: list[int] = []
    while (samples if config.budget_unit == "samples" else tokens) < config.budget:
        if len(order) < per_step:
            order = torch.randperm(len(prompts), generator=gen).tolist()
            if len(prompts) < per_step:  # fewer prompts than a batch: one batch of all of them
                per_step = len(prompts)
        batch, order = [prompts[i] for i in order[:per_step]], order[per_step:]
        rollout = policy.generate(batch, max_new_tokens=max_new_tokens, temperature=1.0,
                                  samples_per_prompt=group, generator=gen)
        rows_p.extend(rollout.prompts)
        rows_c.extend(rollout.completions)
        scores.extend(check_scores(reward_fn(rollout.prompts, rollout.completions), len(rollout), reward_fn,
                                   rollout.prompts).tolist())
        samples += len(rollout)
        tokens += int(rollout.response_mask.sum())
    return rows_p, rows_c, scores, samples, tokens


# The history row keys of a comparison (report.md, the plots) and the val/ metrics they come from.
MEASURED = {"gold_reward": "val/gold_reward", "greedy_gold_reward": "val/greedy_gold_reward",
            "proxy_reward": "val/reward", "kl": "val/kl", "response_length": "val/response_length"}


def _history(rows: list[dict]) -> list[dict]:
    """The evaluator's rows as the comparison's history: budget spent and the measured metrics."""
    return [{"checkpoint": i, "samples": int(r["samples"]), "generated_tokens": int(r["generated_tokens"]),
             "optimizer_steps": r["step"], "seconds": r["seconds"],
             **{k: r[v] for k, v in MEASURED.items()}} for i, r in enumerate(rows)]


def run_one(spec: dict) -> dict:
    """Train and measure one algorithm × seed from the comparison's base; returns its result.json dict.

    The run is `rlhf_lab.demo.final_run_config` (the registry's demo settings of the algorithm)
    built by the one builder, with the comparison's budget and its measurement: `EvalCallback` on
    the budget axis, `eval_samples_per_prompt` sampled responses per eval prompt (seeded with
    `eval_seed`, so every run and every measurement draws the same random numbers) plus the greedy
    gold score. `spec` (plain values, so it pickles into a worker process): `out` (the comparison
    folder), `algorithm`, `seed`, `config` (a CompareConfig as a dict), `logger` (csv | wandb),
    `group` (the wandb group), `threads` (torch threads, or None to keep the process's).
    """
    from rlhf_lab.algorithms import get_algorithm
    from rlhf_lab.demo import final_run_config
    from rlhf_lab.runs.builder import BudgetConfig, EvalConfig, build_run

    config = CompareConfig(**spec["config"])
    algorithm, seed = spec["algorithm"], spec["seed"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out, name = spec["out"], run_name(algorithm, seed)
    base_dir, run_dir = os.path.join(out, BASE_DIR), os.path.join(out, RUNS_DIR, name)
    # An interrupted run goes on from its last checkpoint; one without any starts again.
    resume = find_checkpoint(os.path.join(run_dir, algorithm)) is not None
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)  # once, first: the builder goes on from this stream

    demo = dataclasses.replace(config.demo_config(), seed=seed)
    task = get_task(config.task)
    max_new_tokens = demo.new_tokens()
    prompts, eval_prompts = task.rl_prompts(seed=config.base_seed), task.eval_prompts()
    reward_fn = load_reward_source(base_dir)
    logger = run_logger_config(spec["logger"], spec["group"], algorithm, seed, task.name)
    run_config = {"compare": config.identity(), "algorithm": algorithm, "seed": seed}
    unit = "samples" if config.budget_unit == "samples" else "generated_tokens"
    measure = dict(prompts=len(eval_prompts), greedy=False, samples_per_prompt=config.eval_samples_per_prompt,
                   greedy_gold=True, seed=config.eval_seed, max_new_tokens=max_new_tokens)
    extra: dict = {}
    if not get_algorithm(algorithm).online:  # dpo: sample the budget from SFT, rank by the proxy, train
        sft = Policy.load(os.path.join(base_dir, "sft"))
        batch = demo.final_config("ppo")  # the online algorithms' batches
        t0 = time.perf_counter()
        rows_p, rows_c, scores, samples, tokens = _sample_budget(
            sft, prompts, reward_fn, config, batch.prompts_per_step, batch.samples_per_prompt, max_new_tokens, seed)
        pairs = rank_into_pairs(rows_p, rows_c, scores, random.Random(seed), config.dpo_max_pairs_per_prompt)
        if not pairs:
            raise RuntimeError(f"{name}: the {samples} SFT samples gave no preference pairs (every prompt's "
                               "responses scored alike); raise the budget")
        steps = demo.budget(algorithm)
        fit_config = final_run_config(demo, algorithm, run_dir, base_dir, logger, progress=False,
                                      evaluation=EvalConfig(every=steps / config.evals, axis="step", **measure))
        run = build_run(fit_config, task=task, rows=(pairs, []), reward_fn=reward_fn, eval_prompts=eval_prompts,
                        run_config=run_config, reseed=False, resume=resume, eval_kwargs=dict(
                            budget_of=lambda module: {"samples": samples, "generated_tokens": tokens},
                            extra_seconds=time.perf_counter() - t0, budget_prefix="compare", max_rows=0, batch_size=256))
        extra = {"pairs": len(pairs)}
    else:
        fit_config = final_run_config(
            demo, algorithm, run_dir, base_dir, logger, progress=False,
            budget=BudgetConfig(amount=config.budget, unit=unit),
            evaluation=EvalConfig(every=config.budget / config.evals, axis=unit, **measure))
        run = build_run(fit_config, task=task, rows=(prompts, eval_prompts), reward_fn=reward_fn,
                        run_config=run_config, reseed=False, resume=resume,
                        eval_kwargs=dict(budget_prefix="compare", max_rows=0, batch_size=256))
    run.fit()
    evaluator = run.evaluator
    spent = evaluator.history[-1]["samples" if unit == "samples" else "generated_tokens"]
    if run.trainer.interrupted or (get_algorithm(algorithm).online and spent < config.budget):
        # Lightning turns Ctrl-C and SIGTERM into exits; this guards any other early stop, so a
        # result.json always means a run that spent its budget.
        raise RuntimeError(f"{name} stopped at {spent} of its {config.budget} {config.budget_unit}; "
                           "re-run the command to train it again")

    history = _history(evaluator.history)
    final = history[-1]
    _write_json(os.path.join(run_dir, HISTORY_FILE), history)
    result = {
        "run": name, "algorithm": algorithm, "seed": seed,
        "budget_unit": config.budget_unit, "budget": config.budget,
        "samples": final["samples"], "generated_tokens": final["generated_tokens"],
        "optimizer_steps": final["optimizer_steps"],
        **{k: final[k] for k in MEASURED},
        "seconds": evaluator.train_seconds(), "eval_seconds": evaluator.eval_seconds,
        "total_seconds": time.perf_counter() - start,
        **extra,
        "threads": torch.get_num_threads(), "pid": os.getpid(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write_json(os.path.join(run_dir, RESULT_FILE), result)  # the resume marker: written last
    return result


def _worker_init(threads: int) -> None:
    quiet_libraries()
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- the folder
def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def check_folder_config(out: str, config: CompareConfig) -> None:
    """Save the comparison's settings in `out/compare.json`, or check them against the saved ones.

    Raises `CompareConfigError` naming every setting that differs (results at other settings
    would not compare); `algorithms` and `seeds` may change. Returns None.
    """
    path = os.path.join(out, CONFIG_FILE)
    identity = json.loads(json.dumps(config.identity()))
    if not os.path.exists(path):
        _write_json(path, {"identity": identity, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        return
    saved, now = _flatten(_read_json(path)["identity"]), _flatten(identity)
    diffs = [f"  {k}: saved {saved.get(k, '(absent)')!r}, now {now.get(k, '(absent)')!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise CompareConfigError(
            f"{out} holds a comparison with other settings, and results at different settings do not "
            f"compare, so nothing was run. Differences (from {path}):\n" + "\n".join(diffs)
            + "\nRun with the saved settings to resume or extend it, or choose another --out.")


def ensure_base(out: str, config: CompareConfig, logger: str = "csv", echo=print) -> tuple[bool, dict]:
    """Build the shared base in `out/base/` unless its marker (base.json) exists.

    The base is `rlhf_lab.demo.build_base` at `config.demo_config()`: pretrain → SFT → reward model
    → normalisation on SFT samples (temperature 1). Returns (built now, the marker's contents).
    """
    base_dir = os.path.join(out, BASE_DIR)
    marker = os.path.join(base_dir, BASE_MARKER)
    if os.path.exists(marker):
        info = _read_json(marker)
        if info.get("identity") != json.loads(json.dumps(config.identity())):
            raise CompareConfigError(f"{base_dir} was built for other settings than this comparison's "
                                     f"(see 'identity' in {marker}); choose another --out")
        return False, info
    runs = os.path.join(out, RUNS_DIR)
    finished = sorted(d for d in (os.listdir(runs) if os.path.isdir(runs) else [])
                      if os.path.exists(os.path.join(runs, d, RESULT_FILE)))
    if finished:
        raise CompareConfigError(f"{base_dir} has no {BASE_MARKER} but {runs} holds finished runs "
                                 f"({', '.join(finished)}): they came from a base that is gone. "
                                 "Delete the runs (or the whole folder) to start again.")
    echo(f"base: building {base_dir} (pretrain → SFT → reward model), shared by every run")
    start = time.perf_counter()
    group = os.path.basename(os.path.normpath(out))
    log = LoggerConfig(kind=logger, group=group, tags=[f"task:{config.task}", "compare", "base"])
    base = build_base(base_dir, config.demo_config(), logger=log, run_config={"compare": config.identity()},
                      progress=False, echo=echo, resume=True)  # an interrupted base goes on where it stopped
    info = {"summary": base.summary, "reward_shift": base.reward_fn.shift, "reward_scale": base.reward_fn.scale,
            "seconds": time.perf_counter() - start, "identity": config.identity()}
    _write_json(marker, info)
    return True, info


def _threads_per_worker(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # OMP_NUM_THREADS (what torch.get_num_threads reflects) caps it: on a shared machine the user's
    # setting wins.
    return max(1, min(cores, torch.get_num_threads()) // workers)


def _line(i: int, n: int, r: dict) -> str:
    return (f"[{i}/{n}] {r['run']}: gold {r['gold_reward']:.3f} (greedy {r['greedy_gold_reward']:.3f}), "
            f"proxy {r['proxy_reward']:.3f}, KL {r['kl']:.3f} nats, {r['samples']} samples / "
            f"{r['generated_tokens']} tokens, {r['seconds']:.0f} s")


def run_compare(config: CompareConfig, out: str, workers: int = 1, logger: str = "csv",
                echo=print) -> CompareOutcome:
    """Run (or finish) the comparison in folder `out` and write its report; returns a CompareOutcome.

    Checks or saves the folder's settings (`check_folder_config`), builds the base unless it is
    there (`ensure_base`), trains every algorithm × seed that has no result.json yet (`run_one`)
    in this process (`workers=1`) or in a pool of `workers` spawned processes with
    max(1, cores // workers) torch threads each, and writes report.md, summary.json and the plots
    (`rlhf_lab.compare.report.write_report`). `logger`: csv, or wandb (one group per comparison,
    one wandb run per algorithm × seed).
    """
    from rlhf_lab.compare.report import write_report

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    check_folder_config(out, config)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    group = os.path.basename(os.path.normpath(out))
    plan = [(a, s) for a in config.algorithms for s in config.seed_list]
    done = {run_name(a, s) for a, s in plan if os.path.exists(os.path.join(out, RUNS_DIR, run_name(a, s), RESULT_FILE))}
    todo = [(a, s) for a, s in plan if run_name(a, s) not in done]
    echo(f"compare {group}: {len(config.algorithms)} algorithms × {config.seeds} seeds at "
         f"{config.budget} {config.budget_unit} each; {len(done)} of {len(plan)} runs already finished")

    base_built, base_info = ensure_base(out, config, logger, echo)
    if not base_built:
        echo(f"base: found {os.path.join(out, BASE_DIR)} (SFT greedy gold score "
             f"{base_info['summary']['sft']['gold_accuracy']:.1%})")

    threads = _threads_per_worker(workers) if workers > 1 else None
    specs = [{"out": out, "algorithm": a, "seed": s, "config": dataclasses.asdict(config), "logger": logger,
              "group": group, "threads": threads} for a, s in todo]
    executed: list[str] = []
    if workers == 1 or len(specs) <= 1:
        for spec in specs:
            result = run_one(spec)
            executed.append(result["run"])
            echo(_line(len(executed), len(specs), result))
    elif specs:
        ctx = multiprocessing.get_context("spawn")
        echo(f"running {len(specs)} runs in {min(workers, len(specs))} processes, {threads} torch thread(s) each")
        with ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=ctx,
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            pending = {pool.submit(run_one, spec): run_name(spec["algorithm"], spec["seed"]) for spec in specs}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = pending.pop(future)
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise RuntimeError(f"run {name} failed; finished runs are kept, re-run the same "
                                           "command to resume") from future.exception()
                    executed.append(name)
                    echo(_line(len(executed), len(specs), future.result()))

    results = [_read_json(os.path.join(out, RUNS_DIR, run_name(a, s), RESULT_FILE)) for a, s in plan]
    histories = {r["run"]: _read_json(os.path.join(out, RUNS_DIR, r["run"], HISTORY_FILE)) for r in results}
    seconds = time.perf_counter() - start
    report = write_report(out, config, results, histories, base_info,
                          meta={"workers": workers, "executed": executed, "seconds": seconds})
    echo(f"wrote {report} and the plots in {seconds:.0f} s ({len(executed)} runs trained, "
         f"{len(done)} found finished{', base built' if base_built else ''})")
    return CompareOutcome(out=out, executed=executed, skipped=sorted(done), base_built=base_built,
                          report=report, results=results, seconds=seconds)
