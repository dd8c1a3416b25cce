"""Run setup shared by the demo, the CLI and experiment scripts: loggers and Trainers.

One `LoggerConfig` says where a run's metrics go. `build_loggers` turns it into Lightning
loggers for one stage: a `CSVLogger` writing `<out>/<stage>/metrics.csv` (the default), and/or a
`WandbLogger` whose project, group, tags and run name come from the config, that records the
run's full configuration, and that runs offline (files under `<out>/wandb/`, `wandb sync` later)
when no `WANDB_API_KEY` is set. `make_trainer` builds the Trainer every stage of ours uses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from rlhf_lab.checks import check_choice

__all__ = ["LoggerConfig", "RunCSVLogger", "build_loggers", "finish_loggers", "make_trainer", "new_trainer",
           "plain_config", "quiet_libraries"]

LOGGER_KINDS = ("csv", "wandb", "both", "none")


@dataclass
class LoggerConfig:
    """Where a run's metrics go (`kind`) and how wandb files the run."""

    kind: str = "csv"  # csv | wandb | both | none
    project: str = "rlhf_lab"  # wandb project
    group: str | None = None  # wandb group (runs compared together); None = the run folder's name
    tags: list[str] = field(default_factory=list)  # wandb tags; the stage name is always added
    name: str | None = None  # wandb run name; None = "<group>-<stage>"
    offline: bool | None = None  # None = offline exactly when WANDB_API_KEY is not set

    def __post_init__(self):
        check_choice("kind", self.kind, LOGGER_KINDS)
        if isinstance(self.tags, str):
            raise ValueError(f"tags must be a list of strings, got the string {self.tags!r}")
        self.tags = [str(t) for t in self.tags]


def plain_config(value: Any) -> Any:
    """Dataclasses, tuples and nested containers as plain dicts/lists/scalars (for YAML and wandb).

    The items of a dataclass field marked `metadata={"flatten": True}` (`TrainerConfig.options`)
    stand beside the other fields, as they were given (`rlhf_lab.config.build` reads them back there).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("flatten"):
                out.update(plain_config(getattr(value, f.name)) or {})
            else:
                out[f.name] = plain_config(getattr(value, f.name))
        return out
    if isinstance(value, dict):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _run_csv_logger_class():
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class RowsWriter(ExperimentWriter):
        """Lightning's CSV writer that keeps every row it wrote (`rows`), never deletes a
        metrics.csv it finds (the run folder's policy is `prepare_run_folder`'s), and can restore
        the rows of a checkpoint (`restore`) so a resumed run continues the file."""

        def __init__(self, log_dir: str) -> None:
            self.rows: list[dict] = []
            super().__init__(log_dir)

        def _check_log_dir_exists(self) -> None:
            pass

        def log_metrics(self, metrics_dict, step=None) -> None:
            super().log_metrics(metrics_dict, step)
            self.rows.append(self.metrics[-1])

        def restore(self, rows: list[dict]) -> None:
            """Rewrite metrics.csv as exactly `rows` (atomically) and go on appending after them."""
            import csv

            self.rows, self.metrics = [dict(r) for r in rows], []
            self.metrics_keys = sorted(set().union(*self.rows)) if self.rows else []
            tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
            if not self.rows:
                if os.path.exists(self.metrics_file_path):
                    os.remove(self.metrics_file_path)
                return
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(tmp, self.metrics_file_path)

    class RunCSVLogger(CSVLogger):
        """`<out>/<stage>/metrics.csv`, flushed every step, resumable (see `RowsWriter`)."""

        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = RowsWriter(log_dir=self.log_dir)
            return self._experiment

    return RunCSVLogger


def __getattr__(name: str):
    if name == "RunCSVLogger":  # built on first use: lightning is imported only when a run is built
        cls = _run_csv_logger_class()
        globals()["RunCSVLogger"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_loggers(config: LoggerConfig | str, out: str, stage: str,
                  run_config: Any = None, run_id: str | None = None) -> list:
    """The Lightning loggers of one stage, with `run_config` (any dataclass or dict) recorded.

    CSV: `<out>/<stage>/metrics.csv`, the config in `<out>/<stage>/hparams.yaml`. wandb: project
    `config.project`, group `config.group` (default: the name of `out`), run name
    `config.name or "<group>-<stage>"`, tags `config.tags + [stage]`, the config as the run's
    wandb config; offline unless `WANDB_API_KEY` is set (or `config.offline` says otherwise).
    `run_id` fixes the wandb run id (`resume="allow"`), so a resumed run logs to the same wandb run.
    """
    if isinstance(config, str):
        config = LoggerConfig(kind=config)
    hparams = plain_config(run_config) if run_config is not None else None
    loggers = []
    if config.kind in ("csv", "both"):
        from rlhf_lab.runs import loggers as this

        csv_logger = this.RunCSVLogger(out, name=stage, version="", flush_logs_every_n_steps=1)
        if hparams:
            csv_logger.log_hyperparams(hparams)
        loggers.append(csv_logger)
    if config.kind in ("wandb", "both"):
        from lightning.pytorch.loggers import WandbLogger

        offline = config.offline if config.offline is not None else not os.environ.get("WANDB_API_KEY")
        group = config.group or os.path.basename(os.path.normpath(out))
        tags = list(dict.fromkeys([*config.tags, stage]))
        loggers.append(WandbLogger(project=config.project, group=group, name=config.name or f"{group}-{stage}",
                                   tags=tags, save_dir=out, offline=offline, config=hparams or {},
                                   **({"id": run_id, "resume": "allow"} if run_id else {})))
    return loggers


def finish_loggers(trainer) -> None:
    """Close a stage's wandb run, so the next stage of the same process starts its own run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()


def make_trainer(out: str, stage: str, max_steps: int, logger: LoggerConfig | str = "csv",
                 run_config: Any = None, run_id: str | None = None, **kwargs):
    """A Trainer for one stage of ours: `max_steps` optimiser steps, metrics to `build_loggers`.

    Defaults: logging every step, no Lightning checkpoints (`build_run` adds them, see
    `rlhf_lab.runs.checkpoint`), no sanity validation, one CPU device; any Trainer argument in
    `kwargs` overrides them. `run_id`: the wandb run id (see `build_loggers`). A value Lightning
    refuses is a `ConfigError` (see `new_trainer`).
    """
    loggers = build_loggers(logger, out, stage, run_config, run_id=run_id)
    defaults = dict(max_steps=max_steps, max_epochs=-1, logger=loggers or False, enable_checkpointing=False,
                    enable_model_summary=False, log_every_n_steps=1, accelerator="cpu", devices=1,
                    # The run's own folder: what Lightning writes there (a SLURM requeue checkpoint, which
                    # a later fit without ckpt_path would load) never reaches another stage's run.
                    num_sanity_val_steps=0, default_root_dir=os.path.join(out, stage),
                    use_distributed_sampler=False)  # the stages shard global batches themselves
    defaults.update(kwargs)
    return new_trainer(**defaults)


def new_trainer(**kwargs):
    """`lightning.Trainer(**kwargs)`; a value Lightning refuses (a strategy it does not know or
    cannot run here, a precision, deepspeed not installed) is a `ConfigError` naming the trainer
    section, in one line, instead of a traceback."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kwargs)
    except (ValueError, MisconfigurationException) as e:
        from rlhf_lab.errors import ConfigError

        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"trainer: lightning.Trainer refused it: {message}") from e


def quiet_libraries() -> None:
    """Offline hub and no library start-up chatter, for the CLI's process and compare's workers.

    Lightning sets its loggers' levels when it is imported, so it is imported first and
    lowering them here sticks. Our own `rlhf_lab` loggers print INFO (load reports, cut counts).
    """
    import lightning  # noqa: F401  (it sets its loggers' levels on import; ours must come after)
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad=True.*")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rlhf_lab").setLevel(logging.INFO)
