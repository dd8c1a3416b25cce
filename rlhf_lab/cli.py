"""The `rlhf-lab` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rlhf_lab import __version__

# The names only; importing rlhf_lab.demo would pull in torch before --help needs it.
ALGORITHMS = ("ppo", "reinforce", "rloo", "grpo", "trpo", "dpo", "online_dpo")
TASKS = ("arithmetic", "alice")
BACKBONES = ("gpt2-tiny", "llama-tiny", "opt-tiny", "bigram", "lstm", "attention")


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    from transformers.utils import logging as hf_logging

    from rlhf_lab.demo import DemoConfig, run_demo

    # Quiet the libraries' start-up chatter so the demo's own tables stand out. Lightning sets
    # its loggers' levels when it is imported, so this comes after the import.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    lora = None
    if args.lora:
        from rlhf_lab.models.lora import LoraSettings

        lora = LoraSettings(r=args.lora_rank, alpha=2.0 * args.lora_rank)
    config = DemoConfig(seed=args.seed, task=args.task, backbone=args.backbone, lora=lora)
    if args.quick:
        config.pretrain_steps, config.sft_steps, config.reward_steps, config.rl_iterations = 40, 20, 20, 4
        config.dpo_steps, config.pair_samples = 4, 4
        config.eval_every = 2
    run_demo(out=args.out, config=config, logger=args.logger, algorithm=args.algorithm,
             progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-lab",
        description="rlhf_lab: train language models from feedback (pretrain, SFT, reward model, PPO/REINFORCE/RLOO/GRPO/TRPO) "
        "with PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"rlhf_lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on a built-in task (a few minutes on CPU)",
        description="Train a tiny model from scratch through pretrain → SFT → reward model → RL on "
        "a built-in task (arithmetic by default), print a table per stage and generations "
        "before/after RL, and write a run folder: one HF checkpoint per stage, Lightning CSV "
        "metrics, summary.json and rl_curve.png.",
    )
    demo.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>/)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--algorithm", default="ppo", choices=list(ALGORITHMS),
                      help="algorithm of the last stage (default: ppo); the online ones are presets of one loop, "
                      "dpo trains on the gold-ranked pairs, online_dpo ranks fresh samples with the reward model")
    demo.add_argument("--task", default="arithmetic", choices=list(TASKS),
                      help="built-in task (default: arithmetic); alice = questions about Alice in Wonderland")
    demo.add_argument("--backbone", default="gpt2-tiny", metavar="NAME|PATH",
                      help=f"model: a named tiny config or toy model ({', '.join(BACKBONES)}; default "
                      "gpt2-tiny), or a local Hugging Face model folder (its tokenizer is used)")
    demo.add_argument("--lora", action="store_true",
                      help="train a LoRA adapter in the last stage instead of all weights; its reference is "
                      "the same model with the adapter disabled")
    demo.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r with --lora (alpha = 2r; default 8)")
    demo.add_argument("--logger", default="csv", choices=["csv", "wandb"],
                      help="csv (default), or wandb (offline when WANDB_API_KEY is not set)")
    demo.add_argument("--quick", action="store_true",
                      help="tiny budgets (seconds, not minutes): checks the wiring, learns little")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
