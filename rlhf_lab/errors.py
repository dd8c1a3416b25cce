"""The errors a user can cause, as one small hierarchy (imports nothing).

Every one of them is a `UserError`, a `ValueError`, so code that caught `ValueError` before still
catches them. `rlhf-lab` prints a `UserError` as one line, `rlhf-lab <command>: error: <message>`,
and exits with code 2 (`--debug` shows the traceback instead). The message names what was wrong
and where: the config key, the file and line, the checkpoint folder, the reward and row, the step
and parameter.

    UserError
    ├── ConfigError      a config key or value (also `rlhf_lab.config.ConfigError`)
    ├── DataError        a data file or row (also `rlhf_lab.data.DataError`)
    ├── CheckpointError  a checkpoint folder of the wrong kind (a reward model given as a policy, ...)
    ├── RewardError      a reward source that returned the wrong count, shape, or a non-finite score
    └── NonFiniteError   a non-finite gradient (trainer.on_nonfinite: stop), or weights about to be saved
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "NonFiniteError", "RewardError", "UserError"]


class UserError(ValueError):
    """Something the user gave (a config, a file, a checkpoint, a reward function) cannot be used.

    The message alone says what and where; the command line shows it as one line, exit code 2.
    """


class ConfigError(UserError):
    """A config key or value that does not fit its dataclass; the message names the key and file."""


class DataError(UserError):
    """A bad data file or row: the message names the file, the 1-based line and the field.

    Attributes: `path` (str), `line` (int | None; the item of a `.json` list, the row of a hub
    dataset; None when the whole file is at fault, e.g. it has no rows), `field` (str | None; None
    for invalid JSON or a row that is not an object), `problem` (the message after the place).
    """

    def __init__(self, path: str, line: int | None = None, field: str | None = None, problem: str = "bad data",
                 unit: str = "line"):
        self.path, self.line, self.field, self.problem, self.unit = path, line, field, problem, unit
        where = path if line is None else f"{path}, {unit} {line}"
        what = problem if field is None else f"field {field!r}: {problem}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep the attributes across processes (pickle calls __init__ with args)
        return type(self), (self.path, self.line, self.field, self.problem, self.unit)


class CheckpointError(UserError):
    """A checkpoint folder that is not what the field reading it needs (e.g. a reward model as a policy)."""


class RewardError(UserError):
    """A reward source returned scores that cannot be used: the wrong count or shape, or NaN / inf.

    The message names the source (its function or class) and, for a non-finite score, the first
    bad row and its prompt.
    """


class NonFiniteError(UserError):
    """A non-finite gradient stopped training (`trainer.on_nonfinite: stop`), or weights that are
    not finite were about to be saved; the message names the step or the parameter."""
