"""Run folders, atomic checkpoints and the pieces of exact resume (fast, in one process)."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_lab.data.sampler import ResumableSampler
from rlhf_lab.runs.checkpoint import (
    COMPLETE_FILE,
    DeferredCheckpointIO,
    RunFolderError,
    find_checkpoint,
    prepare_run_folder,
    rng_state,
    set_rng_state,
    write_complete,
)


def _snapshot(folder) -> dict:
    """Every file under `folder` with its bytes and modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (f.read(), os.stat(path).st_mtime_ns)
    return out


# --------------------------------------------------------------------------- the folder policy


def test_new_folder_is_used_as_it_is(tmp_path):
    assert prepare_run_folder(str(tmp_path / "missing")) == ("new", None)
    (tmp_path / "empty").mkdir()
    assert prepare_run_folder(str(tmp_path / "empty")) == ("new", None)


@pytest.mark.parametrize("finished", [True, False])
def test_folder_with_a_run_is_refused_and_untouched(tmp_path, finished):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step\n0\n")
    if finished:
        write_complete(str(run), {"stage": "sft"})
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="already holds an? (finished|unfinished) run; pass --resume"):
        prepare_run_folder(str(run))
    assert _snapshot(run) == before


def test_overwrite_deletes_and_resume_finds_the_state(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("step\n0\n")
    # resume without a checkpoint: nothing to continue from, so the run starts over in an empty folder
    assert prepare_run_folder(str(run), resume=True) == ("new", None)
    assert not run.exists()
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"x": torch.ones(1)}, run / "checkpoints" / "last.ckpt")
    assert prepare_run_folder(str(run), resume=True) == ("resume", str(run / "checkpoints" / "last.ckpt"))
    write_complete(str(run), {"stage": "sft"})
    assert prepare_run_folder(str(run), resume=True) == ("finished", None)
    assert prepare_run_folder(str(run), overwrite=True) == ("new", None)
    assert not run.exists()
    with pytest.raises(RunFolderError, match="exclude each other"):
        prepare_run_folder(str(run), resume=True, overwrite=True)


# --------------------------------------------------------------------------- atomic checkpoints


class _Trainer:
    loggers: list = []
    is_global_zero = True


def test_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoints" / "last.ckpt")
    io = DeferredCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    assert not os.path.exists(path)  # deferred: nothing on disk until the next batch starts
    io.flush(_Trainer())
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):  # half a file, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as h:
            h.truncate(10)
        raise OSError("disk full")

    io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.flush(_Trainer())
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert find_checkpoint(str(tmp_path)) == path


def test_unreadable_last_checkpoint_falls_back_to_the_newest_step(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (4, 8):
        torch.save({"step": step}, ckpts / f"step={step}.ckpt")
    (ckpts / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert find_checkpoint(str(tmp_path)) == str(ckpts / "step=8.ckpt")


def test_deferred_removal_waits_for_the_new_checkpoint(tmp_path):
    old, new = str(tmp_path / "step=2.ckpt"), str(tmp_path / "step=4.ckpt")
    torch.save({"step": 2}, old)
    io = DeferredCheckpointIO()
    io.save_checkpoint({"step": 4}, new)
    io.remove_checkpoint(old)
    assert os.path.exists(old)  # a kill now still leaves step 2
    io.flush(_Trainer())
    assert not os.path.exists(old) and torch.load(new, weights_only=True)["step"] == 4


# --------------------------------------------------------------------------- resume pieces


def test_rng_state_round_trip_restores_every_stream():
    import random

    import numpy as np

    state = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_sampler_order_depends_on_seed_and_epoch_and_skips_once():
    s = ResumableSampler(10, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and len(s) == 10
    assert list(ResumableSampler(10, seed=3)) == e0  # a function of the seed, not of the global stream
    torch.manual_seed(0)
    assert list(ResumableSampler(10, seed=3)) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(10))
    s.skip(1, 4)
    assert list(s) == e1[4:]  # resumed mid-epoch: the rest of epoch 1
    assert list(s) == e1  # the skip applies once
    assert list(ResumableSampler(5, seed=3, shuffle=False)) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- the CLI, end to end


@pytest.mark.slow
def test_fit_into_a_finished_folder_exits_2_and_changes_nothing(tmp_path, capsys):
    from rlhf_lab.cli import main

    args = ["fit", "sft", "--task", "arithmetic", "--out", str(tmp_path), "--trainer.max_steps", "2",
            "--eval.prompts", "0", "--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2}",
            "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    assert os.path.exists(tmp_path / "sft" / COMPLETE_FILE)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "already holds a finished run; pass --resume" in lines[0], lines
    assert _snapshot(tmp_path) == before
    # --resume on a finished run trains nothing and changes nothing either
    assert main([*args, "--resume"]) == 0
    assert _snapshot(tmp_path) == before
    # a changed config cannot resume an unfinished run
    os.remove(tmp_path / "sft" / COMPLETE_FILE)
    os.makedirs(tmp_path / "sft" / "checkpoints")
    torch.save({"x": 1}, tmp_path / "sft" / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main([*args, "--resume", "--config.lr", "0.5"]) == 2
    assert "cannot resume with a different config: config.lr" in capsys.readouterr().err


def test_an_unfinished_run_is_not_a_model_to_start_from(tmp_path):
    from rlhf_lab.runs.builder import ModelConfig, build_policy

    run = tmp_path / "sft"
    run.mkdir()
    (run / "config.yaml").write_text("stage: sft\n")
    (run / "rlhf_lab_policy.json").write_text("{}")  # a policy half written when the run stopped
    with pytest.raises(RunFolderError, match=r"model.backbone: .*sft is an unfinished run \(no COMPLETE.json\)"):
        build_policy(ModelConfig(backbone=str(run)))
