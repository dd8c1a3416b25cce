"""The top layer below the CLI: the one builder of runs, and its loggers and Trainer.

The algorithm registry it reads is `rlhf_lab.algorithms` (a bottom-layer table of names: no
torch, so `rlhf-lab --help` reads it at once, and stage configs can resolve presets from it).
- `loggers.py`: `LoggerConfig`, `build_loggers`, `make_trainer`, `finish_loggers`, `quiet_libraries`,
  `RunCSVLogger` (metrics.csv that a resumed run continues).
- `checkpoint.py`: `CheckpointConfig`, the run-folder policy (`prepare_run_folder`, `COMPLETE.json`)
  and what exact resume adds to Lightning's checkpoints (`RunState`, `DeferredCheckpointIO`).
- `builder.py`: the typed run configs (`FitConfig`, `ModelConfig`, `RewardConfig`, `EvalConfig`,
  `TrainerConfig`) and `build_run`: configs in, a ready run (policy, reward source, stage,
  evaluation, loggers, Trainer, run folder) out. `demo`, `fit` and `compare` all call it.

Names are imported lazily, so `import rlhf_lab.runs` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoggerConfig": "loggers", "build_loggers": "loggers", "finish_loggers": "loggers",
    "make_trainer": "loggers", "plain_config": "loggers", "quiet_libraries": "loggers",
    "FitConfig": "builder", "ModelConfig": "builder", "RewardConfig": "builder", "EvalConfig": "builder",
    "TrainerConfig": "builder", "BudgetConfig": "builder", "Run": "builder", "build_run": "builder",
    "build_policy": "builder", "build_reward": "builder", "CheckpointConfig": "checkpoint",
    "prepare_run_folder": "checkpoint", "find_checkpoint": "checkpoint", "RunCSVLogger": "loggers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rlhf_lab.runs.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rlhf_lab.runs' has no attribute {name!r}")
