"""Checkpoints and exact resume, through Lightning's own checkpointing.

A run folder `<out>/<name>/` of `build_run` holds, while it trains, `checkpoints/last.ckpt` (always
kept) and the `keep` newest `checkpoints/step=N.ckpt`, written every `CheckpointConfig.every_n_steps`
optimiser steps by Lightning's `ModelCheckpoint`. A checkpoint holds everything the rest of the run
depends on:

- Lightning's part: the module's weights (policy, reference, critic, heads), the optimiser and
  scheduler states, the loop progress (global step, epoch, batches done in the epoch) and the
  state of every stateful callback (the `EvalCallback`'s history and counters);
- the stage's part (`on_save_checkpoint` of each stage): its budget counters, the adaptive KL
  controller, the per-iteration history, and its data order (`rlhf_lab.data.ResumableSampler`
  shuffles each epoch from a seed, so the epoch and the batches done in it are the position);
- `RunState`'s part: the torch (CPU and CUDA), Python and numpy random states at the end of the
  step, and every row the CSV logger has written, so `metrics.csv` of a resumed run continues
  exactly where the checkpoint was taken.

Lightning takes a checkpoint at the end of a training batch, before it logs that batch's metrics
and runs the validation due at that step. `DeferredCheckpointIO` therefore holds the checkpoint in
memory and writes it when the next batch starts (or training ends), adding the log rows written
by then; so the rows always belong to the same moment as the weights. Each file is written to a
temporary name and renamed: a crash while writing leaves the previous checkpoint whole.

A finished run writes `COMPLETE.json` last (`write_complete`); a folder without it is unfinished.
`prepare_run_folder` is the one policy for what a run does with its folder: a new run needs an
empty one, `resume` continues from the newest loadable checkpoint (or starts over when there is
none), `overwrite` deletes what is there.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any

from rlhf_lab.checks import check_positive
from rlhf_lab.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["COMPLETE_FILE", "CheckpointConfig", "check_finished", "DeferredCheckpointIO", "RunFolderError", "RunState",
           "find_checkpoint", "is_complete", "prepare_run_folder", "read_complete", "rng_state",
           "set_rng_state", "write_complete", "write_json"]

COMPLETE_FILE = "COMPLETE.json"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class RunFolderError(UserError):
    """A run folder that cannot be used as asked (it holds a run, or an unfinished one as a model)."""


@dataclass
class CheckpointConfig:
    """When a run writes Lightning checkpoints into `<run folder>/checkpoints/`."""

    every_n_steps: int = 100  # optimiser steps between checkpoints; 0 = none (the run cannot resume)
    keep: int = 1  # how many step=N.ckpt to keep besides last.ckpt (the newest is always kept)

    def __post_init__(self):
        check_positive("every_n_steps", self.every_n_steps, allow_zero=True)
        check_positive("keep", self.keep)


def write_json(path: str, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the folder


def is_complete(folder: str) -> bool:
    """Whether `folder` holds a finished run (its completion marker exists)."""
    return os.path.isfile(os.path.join(folder, COMPLETE_FILE))


def read_complete(folder: str) -> dict:
    with open(os.path.join(folder, COMPLETE_FILE)) as f:
        return json.load(f)


def write_complete(folder: str, info: dict) -> None:
    """Mark `folder` finished: written last, after the policy and the summary."""
    write_json(os.path.join(folder, COMPLETE_FILE), info)


def check_finished(folder: str, field: str) -> None:
    """Refuse a run folder of ours that is unfinished as a model to start from (`field` names the key).

    A run folder has config.yaml; it is finished once it has COMPLETE.json (runs before markers
    existed: summary.json). A stopped run may already hold a policy, saved at its end, but half
    written, so it is refused rather than taken for a finished one.
    """
    ours = os.path.isfile(os.path.join(folder, "config.yaml"))
    if ours and not is_complete(folder) and not os.path.isfile(os.path.join(folder, "summary.json")):
        raise RunFolderError(f"{field}: {folder} is an unfinished run (no {COMPLETE_FILE}); continue it with "
                          "--resume before starting from it")


def _loadable(path: str) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or corrupt file: fall back to an older one
        log.warning("checkpoint %s cannot be read (%s); trying an older one", path, type(e).__name__)
        return False
    return True


def find_checkpoint(folder: str) -> str | None:
    """The newest loadable checkpoint of the run in `folder`: last.ckpt, else the highest step=N.ckpt."""
    ckpt_dir = os.path.join(folder, CHECKPOINT_DIR)
    candidates = [os.path.join(ckpt_dir, LAST)]

    def step_of(path: str) -> int:
        match = re.search(r"step=(\d+)", os.path.basename(path))
        return int(match.group(1)) if match else -1

    candidates += sorted(glob.glob(os.path.join(ckpt_dir, "step=*.ckpt")), key=step_of, reverse=True)
    for path in candidates:
        if os.path.isfile(path) and _loadable(path):
            return path
    return None


def _remove_partial_writes(folder: str) -> None:
    """Delete the temporary files of atomic writes a killed process left in `folder` (never renamed)."""
    partial = glob.glob(os.path.join(folder, "*.tmp-*")) + glob.glob(os.path.join(folder, CHECKPOINT_DIR, "*.tmp-*"))
    for path in partial:
        os.remove(path)
    if partial:
        log.info("removed %d partial file(s) an interrupted write left in %s", len(partial), folder)


def prepare_run_folder(folder: str, resume: bool = False, overwrite: bool = False,
                       pipeline: bool = False) -> tuple[str, str | None]:
    """Decide what the run in `folder` does; returns (mode, checkpoint path or None).

    mode is "new" (empty or missing folder), "finished" (resume on a finished run: nothing to
    train), or "resume" (continue from the checkpoint returned). Without `resume` or `overwrite` a
    folder that holds anything is refused (`RunFolderError`) and no file is touched; `overwrite`
    deletes it; `resume` on an unfinished folder without a checkpoint clears it and starts over.
    A `pipeline` folder (the demo's) holds one run folder per stage, each with its own
    checkpoints: `resume` on it never clears anything and returns ("resume", None), every stage
    then resuming itself.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run, or replace it")
    holds = os.path.isdir(folder) and bool(os.listdir(folder))
    if not holds:
        return "new", None
    if overwrite:
        shutil.rmtree(folder)
        return "new", None
    finished = is_complete(folder)
    if not resume:
        what = "a finished run" if finished else "an unfinished run"
        raise RunFolderError(f"{folder} already holds {what}; pass --resume to continue it, --overwrite to "
                          "replace it, or choose another --out")
    if finished:
        return "finished", None
    _remove_partial_writes(folder)
    if pipeline:
        return "resume", None
    ckpt = find_checkpoint(folder)
    if ckpt is None:
        log.warning("%s holds no checkpoint to resume from (the run stopped before its first one); "
                    "starting it over", folder)
        shutil.rmtree(folder)
        return "new", None
    return "resume", ckpt


# --------------------------------------------------------------------------- random state


def rng_state() -> dict:
    """The torch (CPU and every CUDA device), Python and numpy random states."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain values only, so a checkpoint loads with torch.load(weights_only=True).
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- Lightning parts


def _csv_loggers(trainer) -> list:
    from rlhf_lab.runs.loggers import RunCSVLogger

    return [logger for logger in trainer.loggers if isinstance(logger, RunCSVLogger)]


def _make_io():
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class _DeferredCheckpointIO(TorchCheckpointIO):
        """Lightning's torch checkpoint IO, deferred and atomic (see the module docstring)."""

        def __init__(self):
            super().__init__()
            self.pending: list[tuple[str, Any, str]] = []  # ("save", checkpoint, path) | ("remove", None, path)
            self.extra = None  # trainer -> dict added to each checkpoint when it is written

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self.pending.append(("save", checkpoint, str(path)))

        def remove_checkpoint(self, path):
            self.pending.append(("remove", None, str(path)))

        def flush(self, trainer) -> None:
            import torch

            extra = self.extra(trainer) if self.extra is not None and self.pending else {}
            pending, self.pending = self.pending, []
            for op, checkpoint, path in pending:
                if op == "remove":
                    if os.path.exists(path):
                        os.remove(path)
                    continue
                checkpoint.update(extra)
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmp = f"{path}.tmp-{os.getpid()}"
                torch.save(checkpoint, tmp)
                os.replace(tmp, path)

    return _DeferredCheckpointIO()


def DeferredCheckpointIO():  # noqa: N802  (a factory: lightning is imported only when a run is built)
    """A `CheckpointIO` that writes Lightning's checkpoints when `RunState` says so, atomically."""
    return _make_io()


def _make_run_state():
    from lightning.pytorch.callbacks import Callback

    class _RunState(Callback):
        """Saves and restores what Lightning does not: random states, log rows, data position."""

        def __init__(self, io):
            self.io = io
            io.extra = self._extra
            self._restore: dict | None = None

        # -------------------------------------------------------------- save
        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            checkpoint["rlhf_lab"] = {"rng": rng_state(), "epoch": trainer.current_epoch,
                                      "batches_done": progress.processed}

        def _extra(self, trainer) -> dict:
            rows = {}
            for logger in _csv_loggers(trainer) if trainer.is_global_zero else []:
                logger.save()
                rows[logger.log_dir] = list(logger.experiment.rows)
            return {"rlhf_lab_log": rows}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.io.flush(trainer)  # the previous batch's checkpoint, with all its rows

        def on_train_end(self, trainer, pl_module) -> None:
            self.io.flush(trainer)

        def on_exception(self, trainer, pl_module, exception) -> None:
            self.io.pending = []  # a failed step's state is never written

        # -------------------------------------------------------------- restore
        def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            state = checkpoint.get("rlhf_lab")
            if state is None:
                raise RunFolderError("the checkpoint was not written by an rlhf_lab run (no 'rlhf_lab' state); "
                                  "it cannot be resumed exactly")
            self._restore = state
            rows = checkpoint.get("rlhf_lab_log", {})
            for logger in _csv_loggers(trainer) if trainer.is_global_zero else []:
                logger.experiment.restore(rows.get(logger.log_dir, []))
            if hasattr(pl_module, "resume_data_position"):
                pl_module.resume_data_position(state["epoch"], state["batches_done"])

        def on_train_start(self, trainer, pl_module) -> None:
            if self._restore is not None:  # last, so nothing before the first step draws from them
                set_rng_state(self._restore["rng"])
                self._restore = None

    return _RunState


def RunState(io):  # noqa: N802  (a factory: lightning is imported only when a run is built)
    """The callback that completes Lightning's checkpoints (see the module docstring)."""
    return _make_run_state()(io)


def checkpoint_callbacks(folder: str, config: CheckpointConfig) -> tuple[list, Any]:
    """The callbacks and the checkpoint IO plugin of a run with checkpoints in `folder/checkpoints`."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    io = DeferredCheckpointIO()
    callbacks = [RunState(io)]
    if config.every_n_steps:
        callbacks.append(ModelCheckpoint(
            dirpath=os.path.join(folder, CHECKPOINT_DIR), filename="{step}", monitor="step", mode="max",
            save_top_k=config.keep, every_n_train_steps=config.every_n_steps, save_last=True,
            save_on_train_epoch_end=False, enable_version_counter=False))
    return callbacks, io
