"""The `compare` subcommand's argparse wiring, on a fresh parser (no training)."""

import argparse

import pytest

from rlhf_lab.compare.cli import add_compare_command, compare_main


def _parser():
    parser = argparse.ArgumentParser(prog="rlhf-lab")
    add_compare_command(parser.add_subparsers(dest="command"))
    return parser


def test_help_names_every_option_and_the_outputs(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["compare", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--task", "--algorithms", "--seeds", "--budget", "--budget-unit", "--evals",
                 "--workers", "--logger", "--base-seed", "--backbone", "--quick"):
        assert flag in text
    for word in ("report.md", "reward_vs_budget.png", "gold_vs_proxy.png", "reward_kl_frontier.png",
                 "result.json", "95%"):
        assert word in text


def test_defaults_and_func():
    args = _parser().parse_args(["compare", "--out", "x"])
    assert (args.task, args.algorithms, args.seeds, args.budget, args.budget_unit, args.workers, args.logger) == (
        "arithmetic", "ppo,rloo,grpo,dpo", 3, None, "samples", 1, "csv")
    assert args.func is compare_main


def test_out_is_required(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["compare"])
    assert "--out" in capsys.readouterr().err


def test_bad_settings_exit_2_with_a_message_before_anything_runs(tmp_path, capsys):
    args = _parser().parse_args(["compare", "--out", str(tmp_path / "c"), "--algorithms", "ppo,sac"])
    assert args.func(args) == 2
    assert "algorithms" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    args = _parser().parse_args(["compare", "--out", str(tmp_path / "c"), "--workers", "0"])
    assert args.func(args) == 2
