"""`run_compare` end to end on a quick setting: the report, the plots, resume, workers, mismatches.

The slow tests share one comparison folder (2 algorithms × 2 seeds at the quick budget), built
once per module; each later test works on its own copy, so they stay independent of order.
"""

import glob
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from rlhf_lab.compare.config import CompareConfig
from rlhf_lab.compare.report import METRICS, PLOTS
from rlhf_lab.compare.runner import CompareConfigError, run_compare, run_logger_config
from rlhf_lab.compare.stats import mean_ci

ALGS, SEEDS = "ppo,dpo", 2
RUNS = ["ppo-s0", "ppo-s1", "dpo-s0", "dpo-s1"]


def _config(**kw):
    return CompareConfig(**{"algorithms": ALGS, "seeds": SEEDS, "quick": True, "evals": 2, **kw})


# ---------------------------------------------------------------------------------- fast
# (EvalCallback's budget axis, stop and checkpoints: tests/eval/test_callback.py)
def test_each_run_is_its_own_wandb_run_in_the_comparisons_group():
    a = run_logger_config("wandb", "cmp", "grpo", 2, "arithmetic")
    b = run_logger_config("wandb", "cmp", "grpo", 1, "arithmetic")
    assert (a.kind, a.group, b.group) == ("wandb", "cmp", "cmp")
    assert {"algorithm:grpo", "seed:2"} <= set(a.tags) and "seed:1" in b.tags
    assert a.name != b.name


# ---------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare") / "cmp")
    lines = []
    outcome = run_compare(_config(), out, echo=lines.append)
    return out, outcome, lines


def _copy(src, dst, runs=True):
    shutil.copytree(src, dst, ignore=None if runs else shutil.ignore_patterns("runs"))
    return dst


def _result(out, run):
    with open(os.path.join(out, "runs", run, "result.json")) as f:
        return json.load(f)


def _table_rows(report, section):
    """{first cell: [cells]} of the markdown table under `## <section>`."""
    text = report.split(f"## {section}", 1)[1]
    rows = {}
    for line in text.splitlines():
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_quick_compare_writes_runs_report_and_plots(finished):
    from PIL import Image

    out, outcome, lines = finished
    assert outcome.base_built and outcome.skipped == []
    assert sorted(outcome.executed) == sorted(RUNS)
    assert os.path.exists(os.path.join(out, "base", "base.json"))
    for name in ("sft", "reward_model"):
        assert os.path.exists(os.path.join(out, "base", name, "model.safetensors"))
    budget = _config().budget
    for run in RUNS:
        r = _result(out, run)
        assert r["samples"] >= budget  # the budget was spent (at most one iteration more)
        with open(os.path.join(out, "runs", run, "history.json")) as f:
            history = json.load(f)
        assert history[0]["checkpoint"] == 0 and history[0]["samples"] in (0, r["samples"])
        assert history[-1]["gold_reward"] == r["gold_reward"]
        # Each measurement is in the run's Lightning log too, under DESIGN.md's val/ names.
        with open(os.path.join(out, "runs", run, run.split("-")[0], "metrics.csv")) as f:
            header = set(f.readline().strip().split(","))
        assert {"val/reward", "val/gold_reward", "val/greedy_gold_reward", "val/kl", "compare/samples"} <= header
    # DPO drew its budget from the SFT policy before training, and ranked it into pairs.
    assert _result(out, "dpo-s0")["pairs"] > 0
    for plot in PLOTS:
        with Image.open(os.path.join(out, plot)) as im:
            im.verify()
        with Image.open(os.path.join(out, plot)) as im:
            assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
    assert any(line.startswith("[4/4]") for line in lines)


@pytest.mark.slow
def test_report_tables_match_the_runs_result_files(finished):
    out, _, _ = finished
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    for plot in PLOTS:
        assert f"]({plot})" in report
    assert "95%" in report and "Student t" in report and "seeds" in report
    # Per-run table: every cell is the run's result.json value, rounded as printed.
    runs = _table_rows(report, "Runs")
    for run in RUNS:
        r = _result(out, run)
        assert runs[run][:len(METRICS)] == [f"{r[k]:.{d}f}" for k, _, d in METRICS], run
        assert runs[run][-1] == str(r["optimizer_steps"])
    # Results table: mean ± 95% half-width over the two seeds, recomputed from result.json.
    table = _table_rows(report, "Results")
    for alg in ALGS.split(","):
        rs = [_result(out, f"{alg}-s{s}") for s in range(SEEDS)]
        assert table[alg][0] == str(SEEDS)
        for (key, _, digits), cell in zip(METRICS, table[alg][1:], strict=True):
            m = mean_ci([r[key] for r in rs])
            assert cell == f"{m.mean:.{digits}f} ± {m.half_width:.{digits}f}", (alg, key)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["table"]["ppo"]["gold_reward"]["values"] == [_result(out, r)["gold_reward"] for r in RUNS[:2]]


@pytest.mark.slow
def test_rerun_trains_only_the_missing_run(finished, tmp_path):
    out = _copy(finished[0], str(tmp_path / "cmp"))
    os.remove(os.path.join(out, "runs", "ppo-s1", "result.json"))  # as if interrupted mid-run
    with open(os.path.join(out, "runs", "ppo-s1", "stale.txt"), "w") as f:
        f.write("left by the interrupted run")
    kept = {run: os.path.getmtime(os.path.join(out, "runs", run, "result.json")) for run in RUNS if run != "ppo-s1"}
    base_mtime = os.path.getmtime(os.path.join(out, "base", "sft", "model.safetensors"))

    outcome = run_compare(_config(), out, echo=lambda *a: None)
    assert outcome.executed == ["ppo-s1"]
    assert sorted(outcome.skipped) == sorted(kept)
    assert not outcome.base_built
    assert os.path.getmtime(os.path.join(out, "base", "sft", "model.safetensors")) == base_mtime
    for run, mtime in kept.items():
        assert os.path.getmtime(os.path.join(out, "runs", run, "result.json")) == mtime
    assert os.path.exists(os.path.join(out, "runs", "ppo-s1", "result.json"))
    assert not os.path.exists(os.path.join(out, "runs", "ppo-s1", "stale.txt"))  # restarted clean
    # Nothing missing: a third call trains nothing and only rewrites the report.
    assert run_compare(_config(), out, echo=lambda *a: None).executed == []


@pytest.mark.slow
def test_a_changed_setting_is_refused_before_anything_runs(finished, tmp_path, capsys):
    out = _copy(finished[0], str(tmp_path / "cmp"))
    with pytest.raises(CompareConfigError, match=r"budget: saved 128, now 256"):
        run_compare(_config(budget=256), out, echo=lambda *a: None)
    with pytest.raises(CompareConfigError, match="budget_unit"):
        run_compare(_config(budget_unit="tokens"), out, echo=lambda *a: None)
    from rlhf_lab.compare.cli import compare_main

    args = SimpleNamespace(task="arithmetic", algorithms=ALGS, seeds=SEEDS, budget=None, budget_unit="samples",
                           evals=3, base_seed=0, backbone="gpt2-tiny", quick=True, workers=1, logger="csv", out=out,
                           checkpoint_every=100)
    assert compare_main(args) == 2
    assert "evals: saved 2, now 3" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(RUNS)  # nothing ran, nothing removed


@pytest.mark.slow
def test_two_workers_run_new_seeds_in_their_own_processes(finished, tmp_path):
    out = _copy(finished[0], str(tmp_path / "cmp"))
    before = {run: _result(out, run) for run in RUNS}
    # A third seed extends the comparison: same base, same budget; only the two new runs train.
    outcome = run_compare(_config(seeds=3), out, workers=2, echo=lambda *a: None)
    assert sorted(outcome.executed) == ["dpo-s2", "ppo-s2"]
    new = [_result(out, run) for run in outcome.executed]
    assert all(r["pid"] != os.getpid() for r in new)  # trained in spawned workers ...
    assert all(r["threads"] == max(1, min(len(os.sched_getaffinity(0)), torch.get_num_threads()) // 2)
               for r in new)  # ... with cores // workers torch threads each
    assert {run: _result(out, run) for run in RUNS} == before
    with open(os.path.join(out, "report.md")) as f:
        rows = _table_rows(f.read(), "Results")
    assert rows["ppo"][0] == "3"


@pytest.mark.slow
def test_wandb_logger_puts_each_run_in_the_comparisons_group(finished, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = _copy(finished[0], str(tmp_path / "wandbcmp"), runs=False)
    outcome = run_compare(_config(algorithms="ppo", seeds=1), out, logger="wandb", echo=lambda *a: None)
    assert outcome.executed == ["ppo-s0"] and not outcome.base_built
    run_files = glob.glob(os.path.join(out, "runs", "ppo-s0", "wandb", "offline-run-*", "run-*.wandb"))
    assert len(run_files) == 1
    with open(run_files[0], "rb") as f:
        data = f.read()
    for needle in (b"wandbcmp", b"algorithm:ppo", b"seed:0"):  # group and tags, in the run's record
        assert needle in data
    assert re.search(rb"wandbcmp-ppo-s0", data)
