"""The `rlhf-lab` command: demo, fit, generate, eval, compare, bench."""

from __future__ import annotations

import argparse
import sys

from rlhf_lab import __version__


def _names():
    """The registries the options offer, read when the parser is built (so a task, backbone or
    preset registered before `main()` is accepted too)."""
    from rlhf_lab.algorithms import algorithm_names, fit_names
    from rlhf_lab.data import FORMATS
    from rlhf_lab.models.backbones import backbone_names
    from rlhf_lab.tasks import TASKS

    return dict(algorithms=algorithm_names(), tasks=tuple(TASKS), backbones=tuple(backbone_names()),
                stages=fit_names(), formats=tuple(FORMATS))


def _quiet() -> None:
    """Offline hub, and the libraries' start-up chatter off, so our own output stands out."""
    from rlhf_lab.runs import quiet_libraries

    quiet_libraries()


# --------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    _quiet()
    from rlhf_lab.demo import DemoConfig, run_demo

    lora = None
    if args.lora:
        from rlhf_lab.models.lora import LoraSettings

        lora = LoraSettings(r=args.lora_rank, alpha=2.0 * args.lora_rank)
    config = DemoConfig(seed=args.seed, task=args.task, backbone=args.backbone, lora=lora)
    if args.quick:
        config.pretrain_steps, config.sft_steps, config.reward_steps, config.final_budget = 40, 20, 20, 4
        config.pair_samples, config.eval_every = 4, 2
    config.checkpoint_every = args.checkpoint_every
    run_demo(out=args.out, config=config, logger=args.logger, algorithm=args.algorithm,
             progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)
    return 0


def _add_demo(sub, names: dict) -> None:
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
    demo.add_argument("--algorithm", default="ppo", choices=list(names["algorithms"]),
                      help="algorithm of the last stage (default: ppo); the online ones are presets of one loop, "
                      "dpo trains on the gold-ranked pairs, online_dpo ranks fresh samples with the reward model")
    demo.add_argument("--task", default="arithmetic", choices=list(names["tasks"]),
                      help="built-in task (default: arithmetic); alice = questions about Alice in Wonderland")
    demo.add_argument("--backbone", default="gpt2-tiny", metavar="NAME|PATH",
                      help=f"model: a named tiny config or toy model ({', '.join(names['backbones'])}; default "
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
    demo.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                      help="optimiser steps between each stage's checkpoints (default 100; 0 = none)")
    _add_folder_flags(demo, "the run folder")
    demo.set_defaults(func=_demo)


# --------------------------------------------------------------------------- fit

FIT_EPILOG = """\
configuration keys (YAML, or --key.sub value on the command line; run with --print_config to see
every key of a stage with its value):
  stage, out, seed, task                     the run; task = a built-in task's data and gold judge
  model.backbone, model.tokenizer, model.vocab_size, model.overrides, model.lora.{r,alpha,dropout,
    target_modules}, model.reference         what the stage starts from
  data.format, data.path, data.val_path, data.val_fraction, data.seed, data.limit, data.on_error,
    data.split, data.unit, data.prompt_field, data.completion_field, data.pairs
  config.*                                   the stage's hyperparameters (see below) on top of the
                                             algorithm's preset; online_rl takes config.preset NAME
  reward.source (gold|gsm8k|reward_model), reward.path, reward.normalize, reward.normalize_prompts
  model.critic (head|adapter|reward_model)   online_rl with a critic
  eval.every, eval.axis, eval.prompts, eval.max_new_tokens, eval.at_start, eval.greedy,
    eval.samples_per_prompt, eval.greedy_gold, eval.seed
  budget.amount, budget.unit                 online stages: stop at an equal budget
  trainer.max_steps, trainer.accelerator, trainer.devices, trainer.precision, trainer.strategy,
    trainer.val_check_interval, trainer.log_every_n_steps, trainer.enable_progress_bar,
    trainer.on_nonfinite (skip|stop)          a NaN/inf gradient: skip the step (train/skipped_steps) or fail
  trainer.KEY                                any other lightning.Trainer argument, passed through, e.g.
                                             trainer.accumulate_grad_batches, trainer.gradient_clip_val,
                                             trainer.num_nodes, trainer.profiler (docs/scale.md)
  logger.kind (csv|wandb|both|none), logger.project, logger.group, logger.tags, logger.name,
    logger.offline

examples:
  rlhf-lab fit sft --config experiments/configs/sft_dolly_lora.yaml
  rlhf-lab fit pretrain --task arithmetic --trainer.max_steps 200 --out runs/p
  rlhf-lab fit grpo --config experiments/configs/rl_gsm8k.yaml --config.lr 5e-5 --print_config
"""


def _stage_keys_help(stage: str | None) -> str:
    """The config.* keys of one stage (or of all) with defaults and notes, for fit --help."""
    from rlhf_lab.algorithms import STAGE_NAMES, fit_names, stage_classes
    from rlhf_lab.config import field_help
    from rlhf_lab.runs.builder import stage_of

    if stage not in fit_names():
        return ("config.* keys: run `rlhf-lab fit NAME --help` to list those of one stage "
                f"({', '.join(fit_names())})")
    name = stage_of(stage)
    assert name in STAGE_NAMES
    config_class = stage_classes(name)[1]
    lines = [f"config.* of {stage} (stage {name}, {config_class.__name__}; an algorithm's preset "
             "overrides these defaults — see --print_config):"]
    for key, default, note in field_help(config_class):
        lines.append(f"  config.{key:<22} {default:<10} {note}")
    return "\n".join(lines)


def _fit(args: argparse.Namespace, overrides: list[str]) -> int:
    _quiet()
    from rlhf_lab.config import ConfigError, dump_yaml
    from rlhf_lab.experiment import config_from_files
    from rlhf_lab.runs import plain_config

    # --out and --task are shorthands for the keys of the same names.
    shorthands = [f"--{key}={value}" for key, value in (("out", args.out), ("task", args.task)) if value]
    try:
        config = config_from_files(args.config or [], [*overrides, *shorthands], stage=args.stage)
    except (ConfigError, ValueError) as e:
        print(f"rlhf-lab fit: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(plain_config(config)), end="")
        return 0
    from rlhf_lab.runs.builder import build_run

    try:  # a config the builder refuses (a missing reward.path, a knob the stage cannot use) is a user error
        run = build_run(config, resume=args.resume, overwrite=args.overwrite)
    except ValueError as e:
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"rlhf-lab fit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    run.fit(echo=print)
    return 0


def _add_folder_flags(parser, folder: str) -> None:
    """--resume / --overwrite: what a command does with a run folder that already holds something."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help=f"continue the run in {folder} from its last checkpoint (a finished run is left "
                       "as it is); without --resume or --overwrite a non-empty folder is refused")
    group.add_argument("--overwrite", action="store_true", help=f"delete {folder} first and start over")


def _add_fit(sub, argv: list[str], names: dict) -> None:
    stage = next((a for a in argv[argv.index("fit") + 1:] if not a.startswith("-")), None) \
        if "fit" in argv else None
    fit = sub.add_parser(
        "fit", help="train one stage from a YAML config plus --key.sub overrides",
        description=f"Train one stage ({', '.join(names['stages'])}: the base stages, online_rl with knobs "
        "set by hand, or a registered algorithm with its preset) from a "
        "YAML config whose keys are overridden by --key.sub value arguments (LightningCLI style). "
        "Writes <out>/<NAME>/: the policy as an HF folder (use it as the next stage's "
        "model.backbone), metrics.csv, config.yaml (the resolved config) and summary.json.",
        epilog=FIT_EPILOG + "\n" + _stage_keys_help(stage),
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    fit.add_argument("stage", choices=list(names["stages"]), help="the stage to train")
    fit.add_argument("--config", action="append", metavar="FILE.yaml",
                     help="YAML config (repeatable: later files override earlier ones)")
    fit.add_argument("--out", help="run folder (same as --out in the YAML; default runs/fit)")
    fit.add_argument("--task", choices=list(names["tasks"]), help="built-in task as data and gold judge")
    _add_folder_flags(fit, "<out>/<NAME>/")
    fit.add_argument("--print_config", "--print-config", action="store_true", dest="print_config",
                     help="print the resolved config as YAML and exit")
    fit.set_defaults(func=_fit, takes_overrides=True)


# --------------------------------------------------------------------------- generate


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if args.prompts_file.endswith((".jsonl", ".jsonl.gz", ".json")):
            from rlhf_lab.data import load_prompts

            prompts += list(load_prompts(args.prompts_file, args.field))
        else:
            from rlhf_lab.data import load_text

            prompts += [line.replace("\\n", "\n") for line in load_text(args.prompts_file, unit="line")]
    if args.escapes:
        prompts = [p.encode().decode("unicode_escape") for p in prompts]
    if not prompts:
        raise SystemExit("rlhf-lab: error: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    _quiet()
    import json

    import torch

    from rlhf_lab.policy import Policy

    prompts = _read_prompts(args)
    policy = Policy.load(args.checkpoint, expect="policy", field="generate's checkpoint").eval()
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            rollout = policy.generate(prompts[i:i + args.batch_size], max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p, greedy=args.greedy,
                                      samples_per_prompt=args.samples, generator=generator)
            rows += [{"prompt": p, "completion": c} for p, c in zip(rollout.prompts, rollout.completions, strict=True)]
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} completions to {args.out}")
    else:
        for r in rows:
            print(f"{r['prompt']!r} -> {r['completion']!r}")
    return 0


def _add_generate(sub) -> None:
    gen = sub.add_parser(
        "generate", help="sample completions from a checkpoint folder",
        description="Sample completions from any checkpoint folder a stage wrote (or a local HF folder "
        "saved by Policy.save). Prints prompt -> completion, or writes JSON lines with --out.")
    gen.add_argument("checkpoint", help="checkpoint folder (e.g. runs/fit/sft)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); see --escapes")
    gen.add_argument("--prompts-file", help=".jsonl/.json (field --field) or a text file with one prompt per line "
                     "(\\n in a line becomes a newline)")
    gen.add_argument("--field", default="prompt", help="the prompt field of a .jsonl prompts file (default: prompt)")
    gen.add_argument("--escapes", action="store_true", help="interpret backslash escapes (\\n) in the prompts")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="response length limit (default: 32)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--samples", type=int, default=1, help="completions per prompt (default: 1)")
    gen.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (default: 64)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--out", help="write JSON lines {prompt, completion} here instead of printing")
    gen.set_defaults(func=_generate)


# --------------------------------------------------------------------------- eval


def _eval(args: argparse.Namespace) -> int:
    _quiet()
    from rlhf_lab.experiment import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, task=args.task, data_format=args.format, data_path=args.data,
                        on_error=args.on_error, reward_model=args.reward_model, reference=args.reference,
                        n_prompts=args.prompts, max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                        seed=args.seed, out=args.out)
    return 0


def _add_eval(sub, names: dict) -> None:
    ev = sub.add_parser(
        "eval", help="run the evaluation metrics on a checkpoint",
        description="Generate on an evaluation prompt set and compute the val/ metrics that apply: "
        "response length and distinct-1/2 always; val/gold_reward with a task (or GSM8K data); "
        "val/reward with --reward-model; val/rouge1/2/L and val/reference_perplexity when the data has "
        "reference completions; val/win_rate (judged by the reward model, else the gold judge) and "
        "val/kl with --reference; val/reward_model_accuracy for preference data with a reward model. "
        "Prints the metrics and writes metrics.json and samples.csv to --out.")
    ev.add_argument("checkpoint", help="checkpoint folder to evaluate")
    ev.add_argument("--task", choices=list(names["tasks"]), help="built-in task: its eval prompts and gold judge")
    ev.add_argument("--data", help="data file of the eval prompts (and references / pairs)")
    ev.add_argument("--format", default="prompt_completion", choices=list(names["formats"]),
                    help="format of --data (default: prompt_completion)")
    ev.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="bad rows in --data")
    ev.add_argument("--reward-model", help="reward-model checkpoint: val/reward (and the win-rate judge)")
    ev.add_argument("--reference", help="reference checkpoint (e.g. the SFT policy): val/win_rate and val/kl")
    ev.add_argument("--prompts", type=int, default=200, help="evaluate the first N prompts (default: 200)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="response length (default: the task's, else 64)")
    ev.add_argument("--sample", action="store_true", help="sample at temperature 1 instead of greedy decoding")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    ev.add_argument("--out", help="folder for metrics.json and samples.csv (default: <checkpoint>/eval)")
    ev.set_defaults(func=_eval)


# --------------------------------------------------------------------------- main


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-lab",
        description="rlhf_lab: train language models from feedback (pretrain, SFT, reward model, "
        "PPO/REINFORCE/RLOO/GRPO/TRPO, DPO) with PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"rlhf_lab {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback (a user error is otherwise one line, exit code 2)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = _names()
    _add_demo(sub, names)
    _add_fit(sub, list(argv or []), names)
    _add_generate(sub)
    _add_eval(sub, names)
    from rlhf_lab.compare.cli import add_compare_command

    add_compare_command(sub)
    from rlhf_lab.bench import add_bench_command

    add_bench_command(sub)
    return parser


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code.

    A user error (`rlhf_lab.errors.UserError`: a config, data file, checkpoint, reward or
    non-finite update; or a missing file) is printed as one line, `rlhf-lab <command>: error:
    <message>`, on stderr and returns 2. `--debug` (anywhere on the line) prints the traceback too.
    """
    from rlhf_lab.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the command too, where fit would read it as an override
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.debug = debug
    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"rlhf-lab {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: the run stopped at a step; its checkpoints stay
        if debug:
            import traceback

            traceback.print_exc()
        print(f"rlhf-lab {args.command}: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
