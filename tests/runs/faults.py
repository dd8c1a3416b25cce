"""Fault injection for the resume tests: run a command, SIGKILL it after its first checkpoint, resume.

`kill_after_checkpoint(cmd, folder)` starts `cmd` (a real process), waits until
`folder/checkpoints/last.ckpt` exists, then a random delay (so the kill lands at a random step,
possibly in the middle of writing the next checkpoint or a log row), and kills it with SIGKILL.
`same_run(a, b)` compares two finished run folders: the weights bit for bit, and `metrics.csv` /
`samples.csv` row for row, except the wall-clock columns.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

# Columns that measure wall-clock time: the only ones allowed to differ after a resume.
CLOCK_COLUMNS = ("budget/seconds", "compare/seconds")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_lab.cli", *args]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def kill_after_checkpoint(cmd: list[str], marker: str, seed: int, max_delay: float = 1.5,
                          timeout: float = 600) -> float:
    """Start `cmd`, SIGKILL it a random time after `marker` (a file) appears; returns the delay.

    Fails if the process ends by itself before it could be killed (the run was too short to test).
    """
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    try:
        while not os.path.exists(marker):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended ({proc.returncode}) before {marker} appeared:\n"
                                     f"{proc.stderr.read()[-3000:]}")
            if time.monotonic() - start > timeout:
                raise AssertionError(f"no {marker} after {timeout} s")
            time.sleep(0.01)
        delay = random.Random(seed).uniform(0, max_delay)
        time.sleep(delay)
        assert proc.poll() is None, f"the run finished within {delay:.2f} s of its first checkpoint: make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        return delay
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def weights(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update({f"{name}:{k}": v for k, v in load_file(os.path.join(folder, name)).items()})
    sub = os.path.join(folder, "critic")
    if os.path.isdir(sub):
        out.update({f"critic/{k}": v for k, v in weights(sub).items()})
    return out


def table(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k not in CLOCK_COLUMNS} for row in csv.DictReader(f)]


def same_run(a: str, b: str) -> None:
    """Assert the run folders `a` and `b` trained the same weights and logged the same rows."""
    wa, wb = weights(a), weights(b)
    assert wa, f"no weights in {a}"
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"
    for name in ("metrics.csv", "samples.csv"):
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        assert os.path.exists(pa) == os.path.exists(pb), name
        if os.path.exists(pa):
            ra, rb = table(pa), table(pb)
            assert len(ra) == len(rb), f"{name}: {len(ra)} rows vs {len(rb)}"
            for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
                assert x == y, f"{name} row {i} differs:\n{x}\n{y}"
