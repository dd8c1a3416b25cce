"""The `rlhf-lab compare` command: `add_compare_command(subparsers)` adds it to a parser."""

from __future__ import annotations

import argparse
import sys

from rlhf_lab.algorithms import algorithm_names
from rlhf_lab.compare.config import (
    BUDGET_UNITS,
    DEFAULT_ALGORITHMS,
    DEFAULT_BUDGET,
    QUICK_BUDGET,
    CompareConfig,
)

__all__ = ["add_compare_command", "compare_main"]


DESCRIPTION = f"""\
Compare algorithms at an equal budget. Builds one shared base in DIR/base/ (pretrain → SFT →
reward model, the demo's stages 1-3), then trains every algorithm × seed from that SFT
checkpoint against that reward model (the proxy) until it has spent the budget, measuring it
on the task's eval prompts along the way (proxy reward, gold score, KL to the SFT policy). Writes
DIR/report.md (a table of mean ± 95% Student-t CI over seeds of gold score, proxy reward, KL,
wall time and tokens), DIR/summary.json and three plots: reward_vs_budget.png,
gold_vs_proxy.png, reward_kl_frontier.png. Each run leaves DIR/runs/<alg>-s<seed>/result.json
when it finishes; re-running the same command skips finished runs and the base, so an
interrupted comparison finishes only the missing runs, and adding algorithms or seeds trains only
the new ones. Changing any other setting on an existing DIR is refused.

Budget: online algorithms stop at the first iteration at which budget/samples (or
budget/generated_tokens) reaches it. DPO samples that budget from the SFT policy first, ranks
each prompt's responses with the proxy into pairs and trains on them; its optimiser steps
sample nothing and are not counted.

Default: {",".join(DEFAULT_ALGORITHMS)} × 3 seeds at {DEFAULT_BUDGET["samples"]:,} samples took
12 minutes on a 2-core CPU with OMP_NUM_THREADS=1, the shared base (4 minutes) included."""


def add_compare_command(subparsers) -> argparse.ArgumentParser:
    """Add the `compare` subcommand to `subparsers` (from `parser.add_subparsers()`); returns its parser.

    The parsed namespace's `func(args)` runs the comparison and returns the exit code (0, or 2
    for bad settings or a folder that holds a comparison with other settings).
    """
    p = subparsers.add_parser(
        "compare", help="compare algorithms × seeds at an equal budget from one SFT checkpoint → report + plots",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="comparison folder; re-run with the same DIR to resume or extend it")
    from rlhf_lab.tasks import TASKS

    p.add_argument("--task", default="arithmetic", choices=list(TASKS), help="built-in task (default: arithmetic)")
    p.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS), metavar="A,B,...",
                   help=f"comma-separated, from {', '.join(algorithm_names())} (default: {','.join(DEFAULT_ALGORITHMS)})")
    p.add_argument("--seeds", type=int, default=3, metavar="N",
                   help="runs per algorithm, with seeds 0 … N-1 (default: 3)")
    p.add_argument("--budget", type=int, default=None, metavar="N",
                   help=f"budget per run in --budget-unit (default: {DEFAULT_BUDGET['samples']:,} samples = 60 "
                   f"iterations of 64 prompts × 4, or {DEFAULT_BUDGET['tokens']:,} tokens; with --quick "
                   f"{QUICK_BUDGET['samples']} samples or {QUICK_BUDGET['tokens']} tokens)")
    p.add_argument("--budget-unit", default="samples", choices=list(BUDGET_UNITS),
                   help="samples: responses sampled; tokens: response tokens generated, EOS included "
                   "(default: samples)")
    p.add_argument("--evals", type=int, default=6, metavar="K",
                   help="measure each run at k/K of its budget, k = 1 … K, besides the start (default: 6)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="runs at a time, each in its own process with max(1, cores // N) torch threads "
                   "(cores capped by OMP_NUM_THREADS when set; default: 1, in this process)")
    p.add_argument("--logger", default="csv", choices=["csv", "wandb"],
                   help="csv (default: each run's metrics.csv), or wandb: one group named after DIR, one "
                   "wandb run per algorithm × seed tagged algorithm:<alg> and seed:<seed> (offline when "
                   "WANDB_API_KEY is not set)")
    p.add_argument("--base-seed", type=int, default=0, metavar="N",
                   help="seed of the shared base: pretraining, SFT, reward model, prompt split (default: 0)")
    p.add_argument("--backbone", default="gpt2-tiny", metavar="NAME|PATH",
                   help="model of the base, as in `rlhf-lab demo` (default: gpt2-tiny)")
    p.add_argument("--quick", action="store_true",
                   help="tiny base and budgets (seconds per run): checks the wiring, learns little")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="optimiser steps between checkpoints of every stage and run (default 100; 0 = none). "
                   "Re-running the command resumes: finished runs are kept and an interrupted one goes on "
                   "from its last checkpoint")
    p.set_defaults(func=compare_main)
    return p


def compare_main(args: argparse.Namespace) -> int:
    """Run `rlhf-lab compare` from parsed arguments; returns the exit code."""
    try:
        config = CompareConfig(task=args.task, algorithms=args.algorithms, seeds=args.seeds, budget=args.budget,
                               budget_unit=args.budget_unit, evals=args.evals, base_seed=args.base_seed,
                               backbone=args.backbone, quick=args.quick,
                               checkpoint_every=args.checkpoint_every)
        if args.workers < 1:
            raise ValueError(f"workers must be >= 1, got {args.workers}")
    except ValueError as e:
        print(f"rlhf-lab compare: error: {e}", file=sys.stderr)
        return 2
    from rlhf_lab.compare.runner import CompareConfigError, run_compare
    from rlhf_lab.runs import quiet_libraries

    quiet_libraries()
    try:
        run_compare(config, args.out, workers=args.workers, logger=args.logger)
    except CompareConfigError as e:
        print(f"rlhf-lab compare: error: {e}", file=sys.stderr)
        return 2
    return 0
