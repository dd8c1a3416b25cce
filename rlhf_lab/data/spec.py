"""A stage's data as configuration: `DataConfig` names a format and a file, `load_data` reads it.

This is how YAML configs and the CLI reach the loaders of `rlhf_lab.data.loaders`:

    data:
      format: dolly            # one of FORMATS
      path: data/dolly.jsonl   # a local file, or a hub dataset id (needs a network)
      val_fraction: 0.1        # or val_path: a separate file of the same format
      on_error: skip           # skip bad rows (counted in the log) instead of failing

Each format yields one kind of row, and each stage takes certain kinds (`STAGE_KINDS`):
text documents (pretraining), prompt/completion rows (SFT; their prompts also serve as RL
prompts), prompt/chosen/rejected rows (reward model, DPO; their prompts also serve as RL
prompts), prompt/completion/label rows of unpaired feedback (DPO's variant kto; their prompts
also serve as RL prompts), and prompts alone (online RL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_lab.checks import check_choice
from rlhf_lab.data.formats import FORMATS, STAGE_KINDS

if TYPE_CHECKING:
    from rlhf_lab.data.loaders import Rows

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "STAGE_KINDS", "DataConfig", "check_stage_data", "load_data", "prompts_of"]


@dataclass
class DataConfig:
    """Which rows a stage reads: a format, a file (or hub id) and how to split and clean it."""

    format: str = "prompt_completion"  # a key of FORMATS
    path: str = ""  # .jsonl / .jsonl.gz / .json (or .txt for text); a hub dataset id with a network
    val_path: str | None = None  # a separate validation file of the same format
    val_fraction: float = 0.0  # without val_path: hold out this fraction (text: the last documents)
    seed: int = 0  # seed of the shuffled train/val split
    limit: int | None = None  # keep only the first `limit` training rows (the cut is logged)
    on_error: str = "raise"  # "raise": bad rows fail with file, line and field; "skip": skip and count
    split: str = "train"  # hub datasets: the split to read
    unit: str = "paragraph"  # text: "paragraph", "line" or "file" documents
    prompt_field: str = "prompt"  # prompt_completion / prompts: the prompt's field
    completion_field: str = "completion"  # prompt_completion: the completion's field
    pairs: str = "first"  # gsm8k_pairs: "first" pair per question or "all"

    def __post_init__(self):
        check_choice("format", self.format, tuple(FORMATS))
        check_choice("on_error", self.on_error, ("raise", "skip"))
        if not self.path:
            raise ValueError("data.path is empty: give a file (or a hub dataset id)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_path and self.val_fraction:
            raise ValueError("give data.val_path or data.val_fraction, not both")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1 or null, got {self.limit}")

    @property
    def kind(self) -> str:
        """The kind of row this format yields: text, sft, preference, unpaired or prompts."""
        return FORMATS[self.format]


def _read(config: DataConfig, path: str) -> Rows:
    # The loaders are imported here, not at the top, so `DataConfig` stays light to import (the
    # loaders' prompt templates import transformers).
    from rlhf_lab.data import loaders

    c, kw = config, dict(on_error=config.on_error)
    if c.format == "text":
        return loaders.load_text(path, unit=c.unit, **kw)
    if c.format == "gsm8k_pairs":
        return loaders.load_gsm8k_solution_pairs(path, pairs=c.pairs, **kw)
    kw["split"] = c.split
    if c.format == "prompt_completion":
        return loaders.load_prompt_completion(path, c.prompt_field, c.completion_field, **kw)
    if c.format == "prompts":
        return loaders.load_prompts(path, c.prompt_field, **kw)
    readers = {"dolly": loaders.load_dolly, "alpaca": loaders.load_alpaca, "gsm8k": loaders.load_gsm8k,
               "preference": loaders.load_preference_rows, "hh": loaders.load_hh,
               "unpaired": loaders.load_unpaired_rows}
    return readers[c.format](path, **kw)


def load_data(config: DataConfig) -> tuple[Rows, Rows]:
    """`(train, val)` rows of `config` (val may be empty). Every loader's report is logged.

    Text documents split contiguously (the last `val_fraction`, so no passage is in both);
    other rows by a seeded shuffle (`train_val_split`). `limit` then keeps the first training
    rows and logs how many it left out. A file that gives no rows (empty, only blank lines, or
    every record skipped as bad) is a `DataError` naming it.
    """
    from rlhf_lab.data.loaders import Rows, tail_split, train_val_split

    rows = _read(config, config.path)
    _require_rows(rows, config, "data.path")
    log.info("%s", rows.report)
    if config.val_path:
        train, val = rows, _read(config, config.val_path)
        _require_rows(val, config, "data.val_path")
        log.info("%s", val.report)
    elif config.val_fraction and config.format == "text":
        train, val = tail_split(rows, config.val_fraction)
    else:
        train, val = train_val_split(rows, config.val_fraction, seed=config.seed)
    if config.limit is not None and len(train) > config.limit:
        log.warning("%s: data.limit keeps the first %d of %d training rows (%d left out)", config.path,
                    config.limit, len(train), len(train) - config.limit)
        train = Rows(train[: config.limit], train.report)
    return train, val


def _require_rows(rows: Rows, config: DataConfig, key: str) -> None:
    """Fail, naming the file and why, when a load gave no rows (before any run folder is written)."""
    if rows:
        return
    from rlhf_lab.errors import DataError

    report = rows.report
    if report.n_records == 0:
        problem = "has no rows (the file is empty or holds only blank lines)"
    elif report.n_skipped == report.n_records:
        problem = (f"has no usable rows: all {report.n_records} records are bad and were skipped "
                   f"(data.on_error: skip); first: {report.errors[0]}")
    else:
        problem = (f"gave no {config.format} rows from its {report.n_records} records"
                   + (f" ({report.n_skipped} skipped as bad)" if report.n_skipped else ""))
    raise DataError(report.source, problem=f"{problem}; {key} needs at least one row")


def prompts_of(rows: list) -> list[str]:
    """The prompts of rows of any kind with prompts: strings as they are, dicts' `prompt` field."""
    return [r if isinstance(r, str) else r["prompt"] for r in rows]


def check_stage_data(stage: str, config: DataConfig) -> None:
    """Fail early, naming the field, when `stage` cannot train on `config.format`."""
    kinds = STAGE_KINDS.get(stage)
    if kinds is None:
        raise ValueError(f"unknown stage '{stage}'; choose from: {', '.join(STAGE_KINDS)}")
    if config.kind not in kinds:
        fitting = [f for f, k in FORMATS.items() if k in kinds]
        raise ValueError(f"data.format '{config.format}' gives {config.kind} rows, which stage '{stage}' "
                         f"cannot train on; formats for {stage}: {', '.join(fitting)}")
