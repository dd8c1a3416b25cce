"""The algorithm registry: one entry is all a new algorithm needs to reach demo, fit and compare."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_lab.algorithms import (
    ALGORITHMS,
    BASE_STAGES,
    STAGE_NAMES,
    Algorithm,
    algorithm_names,
    fit_names,
    get_algorithm,
    register,
    unregister,
)


def test_the_registry_names_every_algorithm_and_stage():
    from rlhf_lab.stages import STAGES

    assert algorithm_names() == ("ppo", "reinforce", "rloo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp",
                                 "reinforce_pp_baseline", "trpo", "dpo", "online_dpo", "orpo", "kto")
    assert set(STAGE_NAMES) == set(STAGES)  # the light table and the stage layer agree
    assert fit_names() == (*BASE_STAGES, "online_rl", *algorithm_names())
    for entry in ALGORITHMS.values():  # every preset and demo config constructs, docs page exists
        assert entry.config().__class__.__name__ in ("OnlineRLConfig", "DPOConfig")
        entry.demo_config()
        assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", "..", "docs", entry.docs)), entry.docs


def test_a_preset_is_the_stage_defaults_with_its_knobs():
    grpo = get_algorithm("grpo").config()
    assert (grpo.baseline, grpo.kl_in, grpo.kl_estimator, grpo.kl_coef, grpo.algorithm) == \
        ("group_norm", "loss", "k3+", 0.04, "grpo")
    assert get_algorithm("grpo").preset_of(grpo) == {}
    tuned = get_algorithm("grpo").demo_config()
    # The demo tunes β and the learning rate on top of the paper's preset, nothing else of GRPO's.
    assert get_algorithm("grpo").preset_of(tuned) == {"kl_coef": 0.1, "lr": 2e-4, "minibatches": 4,
                                                      "prompts_per_step": 64, "missing_eos_penalty": 1.0}


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown algorithm 'a2c'; choose from: ppo"):
        get_algorithm("a2c")
    with pytest.raises(ValueError, match="registered already"):
        register(Algorithm("ppo", "online_rl", "again"))
    with pytest.raises(ValueError, match="stage must be one of online_rl, dpo, online_dpo"):
        Algorithm("mine", "sft", "not an algorithm")


def test_help_and_the_registry_import_nothing_heavy():
    code = ("import sys, rlhf_lab.algorithms, rlhf_lab.runs, rlhf_lab.cli as c; "
            "heavy = [m for m in ('torch', 'lightning', 'peft', 'torchmetrics', 'transformers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# A new algorithm, registered at run time: RLOO with the k2 KL in the loss. Nothing in the demo,
# fit or compare knows its name.
NEW = Algorithm("rloo_k2", "online_rl", "RLOO with the k2 KL estimator in the loss",
                preset=dict(baseline="leave_one_out", samples_per_prompt=2, clip_ratio=None, ppo_epochs=1,
                            minibatches=1, kl_in="loss", kl_estimator="k2", whiten_advantages=False),
                demo=dict(prompts_per_step=16, lr=2e-4, kl_coef=0.1), demo_budget=3, docs="algorithms/rloo.md")


@pytest.fixture
def new_algorithm():
    register(NEW)
    yield NEW
    unregister(NEW.name)


@pytest.mark.slow
def test_a_registered_algorithm_runs_through_demo_fit_and_compare(tmp_path, new_algorithm, capsys):
    from rlhf_lab.cli import main
    from rlhf_lab.compare import CompareConfig, run_compare

    # demo --algorithm
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--no-progress", "--out", out, "--algorithm", "rloo_k2"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["rl"]["algorithm"] == "rloo_k2"
    with open(os.path.join(out, "rloo_k2", "rlhf_lab_policy.json")) as f:
        config = json.load(f)["config"]
    assert (config["kl_estimator"], config["kl_in"], config["samples_per_prompt"]) == ("k2", "loss", 2)

    # fit NAME writes <out>/NAME/ with the preset's knobs
    fit_out = str(tmp_path / "fit")
    assert main(["fit", "rloo_k2", "--task", "arithmetic", "--out", fit_out, "--trainer.max_steps", "2",
                 "--config.prompts_per_step", "4", "--config.max_new_tokens", "3", "--eval.prompts", "4",
                 "--trainer.enable_progress_bar", "false", "--model.backbone", os.path.join(out, "sft")]) == 0
    with open(os.path.join(fit_out, "rloo_k2", "summary.json")) as f:
        summary = json.load(f)
    assert summary["config"]["config"]["kl_estimator"] == "k2" and summary["steps"] == 2

    # compare --algorithms
    outcome = run_compare(CompareConfig(algorithms=("rloo_k2",), seeds=1, quick=True, evals=2),
                          str(tmp_path / "cmp"), echo=lambda *a: None)
    (result,) = outcome.results
    assert result["algorithm"] == "rloo_k2" and result["samples"] >= 128
    assert "`rloo_k2`: 16 prompts × 2 responses" in open(outcome.report).read()


def test_fit_rejects_a_preset_that_contradicts_the_command_line(tmp_path, capsys):
    from rlhf_lab.cli import main

    config = tmp_path / "rl.yaml"
    config.write_text("stage: online_rl\ntask: arithmetic\nconfig:\n  preset: grpo\n")
    assert main(["fit", "ppo", "--config", str(config), "--print_config"]) == 2
    assert "config.preset is 'grpo' but the stage is 'ppo'" in capsys.readouterr().err
    config.write_text("stage: grpo\ntask: arithmetic\n")
    assert main(["fit", "ppo", "--config", str(config), "--print_config"]) == 2
    assert "the file trains 'grpo' but the command line says 'ppo'" in capsys.readouterr().err
    assert main(["fit", "grpo", "--config", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "stage: grpo" in printed and "baseline: group_norm" in printed
