"""Argument checks shared by the losses and the stage configs.

Every check raises ``ValueError`` whose message starts with the argument name, so a
wrong call fails at the top of the function instead of broadcasting silently.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

def check_tensor(name: str, x: Any) -> None:
    import torch  # here, so the config checks below import without torch

    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_ndim(name: str, x: torch.Tensor, ndim: int, letters: str) -> None:
    """Require ``x.ndim == ndim``; ``letters`` is the expected shape, e.g. "(B, T)"."""
    check_tensor(name, x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {letters} ({ndim}-D), got {tuple(x.shape)}")


def check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Require every tensor in ``others`` to have exactly the shape of ``ref``."""
    check_tensor(ref_name, ref)
    for name, x in others.items():
        check_tensor(name, x)
        if x.shape != ref.shape:
            raise ValueError(
                f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, "
                f"got {tuple(x.shape)}"
            )


def check_choice(name: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        valid = ", ".join(repr(k) for k in choices)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
