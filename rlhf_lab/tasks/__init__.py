"""Built-in tasks: each ships its data, prompts and a gold judge, generated from a seed."""

from rlhf_lab.tasks.alice import AliceTask
from rlhf_lab.tasks.arithmetic import ArithmeticTask

__all__ = ["TASKS", "AliceTask", "ArithmeticTask", "get_task"]

TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "alice": AliceTask}


def get_task(name: str, **kwargs):
    """Build the task registered as `name` with `kwargs` for its constructor."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; choose from: {', '.join(sorted(TASKS))}"
        ) from None
    return cls(**kwargs)
