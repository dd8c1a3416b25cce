"""Fault injection for the resume tests: run a real process, SIGKILL it at a chosen point, resume.

`kill_at(at_fault(args, plan))` runs `rlhf-lab ARGS` in its own process, which stops itself at
the point `plan` names (a training step, or the middle of its N-th checkpoint write), and kills it
there with SIGKILL. The point is chosen by the test (from a seed), so the kill lands mid-run on
any machine, however fast.
`same_run(a, b)` compares two finished run folders: the weights bit for bit, and `metrics.csv` /
`samples.csv` row for row, except the wall-clock columns.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

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


def at_fault(args: list[str], plan: dict) -> list[str]:
    """The command `rlhf-lab ARGS` in a process that stops itself (SIGSTOP) at `plan`:

    - `{"step": K}`: at the start of the first training batch whose global step is at least K
      (after the previous batch's checkpoint was written);
    - `{"write": N}`: in the middle of writing its N-th checkpoint file, after the data went to the
      temporary file and before it is renamed to `*.ckpt` (counting only paths that contain
      `plan["under"]` when given).

    The point is a place in the run, not a time, so the kill lands there on a fast or a slow machine.
    """
    return [sys.executable, os.path.abspath(__file__), json.dumps(plan), *args]


def kill_at(cmd: list[str], timeout: float = 600, env: dict | None = None) -> None:
    """Run `cmd` (an `at_fault` command) until it stops itself, then SIGKILL it, and with it every
    process it started (the other ranks of a multi-process run, which stop at the same point).

    Fails if the process ends by itself before it reaches its fault point (the plan was past the
    end of the run).
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=ENV if env is None else env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when the child stops or ends
        finally:
            timer.cancel()
        if not os.WIFSTOPPED(status):
            proc.returncode = os.waitstatus_to_exitcode(status)
            err.seek(0)
            raise AssertionError(f"{' '.join(cmd)} ended ({proc.returncode}) before its fault point:\n"
                                 f"{err.read()[-3000:]}")
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher and the ranks it started
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == -signal.SIGKILL, proc.returncode


def _install(plan: dict) -> None:
    """Make this process stop itself at `plan` (see `at_fault`)."""
    from rlhf_lab.runs import checkpoint

    def stop() -> None:
        os.kill(os.getpid(), signal.SIGSTOP)
        raise AssertionError("resumed after SIGSTOP: the test kills a stopped run, never continues it")

    if "step" in plan:
        make = checkpoint.RunState

        def run_state(io):
            callback = make(io)
            original = callback.on_train_batch_start

            def on_train_batch_start(trainer, *args):
                original(trainer, *args)
                if trainer.global_step >= plan["step"]:
                    stop()

            callback.on_train_batch_start = on_train_batch_start
            return callback

        checkpoint.RunState = run_state
    else:
        replace, writes = os.replace, []

        def os_replace(src, dst, *args, **kwargs):
            if str(dst).endswith(".ckpt") and plan.get("under", "") in str(dst):
                writes.append(dst)
                if len(writes) == plan["write"]:
                    stop()
            return replace(src, dst, *args, **kwargs)

        os.replace = os_replace


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


if __name__ == "__main__":  # at_fault's command: python faults.py PLAN ARGS...
    _install(json.loads(sys.argv[1]))
    from rlhf_lab.cli import main

    sys.exit(main(sys.argv[2:]))
