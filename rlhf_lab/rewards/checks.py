"""The check every reward and gold score passes where it enters a run: `check_scores`.

A reward source is user code (a judge function, a reward model, a weighted sum), so what it
returns is checked before anything learns from it or logs it: one score per row, 1-D, every score
finite. A wrong count, a wrong shape or a NaN stops the run with a `RewardError` that names the
source and, for a non-finite score, the first bad row and its prompt, instead of a NaN update or a
broadcast that silently pairs scores with the wrong rows.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

from rlhf_lab.errors import RewardError

__all__ = ["check_scores", "reward_name"]

_PROMPT_CHARS = 40  # how much of the offending row's prompt the message shows


def reward_name(source: Any) -> str:
    """A readable name of a reward source: the `__qualname__` of a function or bound method
    ("ArithmeticTask.gold_reward"; a function defined inside another keeps its own name, a lambda
    gets its file and line), looking through `CallableSource` and `functools.partial` to the
    function they wrap; else the class name of a callable object (`RewardModelSource`, `WeightedSum`)."""
    if isinstance(source, str):
        return source
    for _ in range(8):  # unwrap CallableSource(fn) and partial(fn, ...) to the function the user wrote
        if isinstance(source, functools.partial):
            source = source.func
        elif type(source).__name__ == "CallableSource" and callable(getattr(source, "fn", None)):
            source = source.fn
        else:
            break
    if not (inspect.isfunction(source) or inspect.ismethod(source) or inspect.isbuiltin(source)):
        return type(source).__name__
    name = source.__qualname__.rsplit("<locals>.", 1)[-1]  # a function defined in a function: its own name
    code = getattr(source, "__code__", None)
    if name.endswith("<lambda>") and code is not None:  # say which lambda
        name = f"{name} at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return name


def _prompt_excerpt(prompt: str) -> str:
    short = prompt if len(prompt) <= _PROMPT_CHARS else prompt[:_PROMPT_CHARS] + "..."
    return repr(short)


def check_scores(scores: Any, n_rows: int, source: Any, prompts: Sequence[str] | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float,
                 what: str = "reward") -> torch.Tensor:
    """`scores` as a 1-D `dtype` tensor of `n_rows` finite values on `device`, else a `RewardError`.

    `scores` is what a reward source returned for `n_rows` rows: a tensor, a list or a numpy array
    of numbers. `source` names it in messages (see `reward_name`; a string is used as it is), `what`
    says which role it plays ("reward", "gold reward"), and `prompts` (the rows' prompts) lets a
    non-finite score name its row's prompt. The messages:

        reward my_judge returned 31 scores for 32 rows
        reward my_judge returned shape (32, 1) for 32 rows; expected one score per row, shape (32,)
        reward my_judge returned nan for row 3 (prompt 'Q: 2+3=\\nA:'); 2 of 32 scores are not finite

    Rows count from 0, in the order the source received them. `device` None keeps the tensor's
    device (a list becomes a CPU tensor).
    """
    name = f"{what} {reward_name(source)}"
    if isinstance(scores, torch.Tensor):
        out = scores.detach()
    else:
        try:
            out = torch.as_tensor(scores)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(f"{name} returned {type(scores).__name__}, not a tensor or list of numbers "
                              f"({e})") from None
    if out.is_complex():
        raise RewardError(f"{name} returned {out.dtype} values; expected real numbers (one float per row)")
    if out.ndim != 1:
        raise RewardError(f"{name} returned shape {tuple(out.shape)} for {n_rows} rows; expected one "
                          f"score per row, shape ({n_rows},)")
    if out.shape[0] != n_rows:
        raise RewardError(f"{name} returned {out.shape[0]} scores for {n_rows} rows")
    out = out.to(device=device if device is not None else out.device, dtype=dtype)
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        row = int(bad[0])
        where = f" (prompt {_prompt_excerpt(prompts[row])})" if prompts is not None and row < len(prompts) else ""
        raise RewardError(f"{name} returned {float(out[row])} for row {row}{where}; "
                          f"{len(bad)} of {n_rows} scores are not finite")
    return out
