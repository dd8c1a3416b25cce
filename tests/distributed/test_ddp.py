"""One script from one process to many: the same global batch gives the same update.

Real processes: tests/distributed/worker.py trains every case on one process and as 2 DDP ranks (gloo on
CPU, Lightning's launcher), and with `micro_batch_size` on one process. The loss, the updated
weights (fp32 tolerance), the logged metrics and the budget counters must agree. The CLI test
runs `rlhf-lab fit sft` on 1 process and on 2 ranks and compares the run folders.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_lab.runs.builder import fsdp2_available

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("faults", HERE.parent / "runs" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)

pytestmark = pytest.mark.slow
NO_FSDP2 = "FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6"

# case -> stage and knobs; the online cases train on one replayed buffer (4 prompts x 4 samples).
CASES = {
    "sft": {"stage": "sft"},
    "reward_model": {"stage": "reward_model"},
    "dpo": {"stage": "dpo"},
    "online_dpo": {"stage": "online_dpo"},
    "ppo": {"stage": "ppo"},
    "ppo_seq_mean": {"stage": "ppo", "config": {"aggregation": "seq_mean"}},
    "reinforce": {"stage": "reinforce"},
    "rloo": {"stage": "rloo"},
    "grpo": {"stage": "grpo"},
    "grpo_token_mean": {"stage": "grpo", "config": {"aggregation": "token_mean"}},
}
ONLINE = ("ppo", "ppo_seq_mean", "reinforce", "rloo", "grpo", "grpo_token_mean")
# Every case again on one process, its batches (minibatches online) in parts of 3 rows or pairs:
# uneven parts (8 = 3 + 3 + 2), under activation checkpointing in the offline stages.
MICRO = {f"{name}+micro": {**case, "config": {**case.get("config", {}), "micro_batch_size": 3}}
         for name, case in CASES.items()}
# Batches of 7 rows (pairs) in parts of 3: on 2 ranks the shares are 4 and 3, so one rank runs 2
# parts and the other 1, plus a zero-weighted one to keep a sharded model's gathers in step.
UNEVEN = {"sft_uneven": {"stage": "sft", "config": {"batch_size": 7, "micro_batch_size": 3}},
          "dpo_uneven": {"stage": "dpo", "config": {"batch_size": 7, "micro_batch_size": 3}}}
# Cases run again on 2 ranks with every weight sharded (trainer.strategy fsdp2): the policy, the
# reference copy, the value head (ppo) and the score head (reward_model).
SHARDED = {**{name: CASES[name] for name in ("sft", "reward_model", "dpo", "online_dpo", "ppo", "grpo")}, **UNEVEN}


def _replay(path: Path) -> None:
    """4 prompts x 4 samples with responses of 1 to 4 tokens (so token and sequence means differ)."""
    spec = importlib.util.spec_from_file_location("worker", HERE / "worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    from rlhf_lab.stages import OnlineRL, OnlineRLConfig

    config = OnlineRLConfig.preset("grpo", prompts_per_step=4, samples_per_prompt=4, max_new_tokens=4)
    stage = OnlineRL(worker.policy(reference="copy"), worker.PROMPTS, worker.CallableSource(worker.chars), config)
    torch.manual_seed(0)
    rollout = stage.make_rollout(worker.PROMPTS[:4])
    start = rollout.prompt_length
    for i in range(len(rollout)):
        cut = start + 1 + i % 4  # keep 1..4 response tokens
        rollout.response_mask[i, cut:] = 0
        rollout.attention_mask[i, cut:] = 0
        rollout.input_ids[i, cut:] = worker.TOKENIZER.pad_token_id
    rollout.ref_logprobs = None  # recomputed by each run (in chunks with micro_batch_size)
    rollout.save(str(path))


def _start(out: Path, devices: int, cases: dict, strategy: str = "ddp") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "worker.py"), str(out), str(devices), json.dumps(cases), strategy],
                            env=faults.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _results(proc: subprocess.Popen, out: Path, cases: dict) -> dict:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in cases}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    for sub in ("one", "two", "sharded"):
        (root / sub).mkdir()
        _replay(root / sub / "replay.pt")
    # The one-process runs and the 2-rank runs side by side (they share nothing but the machine).
    ones = {**CASES, **MICRO, **UNEVEN}
    one, two = _start(root / "one", 1, ones), _start(root / "two", 2, CASES)
    sharded = _start(root / "sharded", 2, SHARDED, "fsdp2") if fsdp2_available() else None
    return {"one": _results(one, root / "one", ones), "two": _results(two, root / "two", CASES),
            "sharded": _results(sharded, root / "sharded", SHARDED) if sharded else None}


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = torch.as_tensor(a[k]).double(), torch.as_tensor(b[k]).double()
        assert torch.allclose(x, y, atol=atol, rtol=1e-4), f"{k}: differs by up to {float((x - y).abs().max()):.3g}"


def _comparable(weights: dict, case: str) -> dict:
    """The weights whose gradient is not zero by a symmetry of the loss. Where it is, the
    computed gradient is rounding noise (~1e-9), which AdamW scales to steps of up to lr in
    either direction, so no two summation orders agree there: the attention keys' bias (a
    softmax is unchanged by a shift of its inputs), and for the Bradley-Terry loss, which sees
    only score differences, the head's bias and the final norm's bias (a constant score shift)."""
    out = dict(weights)
    for name in [k for k in out if k.endswith("attn.c_attn.bias")]:
        bias = out[name]
        width = bias.numel() // 3  # [query | key | value]
        out[name] = torch.cat([bias[:width], bias[2 * width:]])
    if case == "reward_model":
        out = {k: v for k, v in out.items() if k not in ("head.bias", "transformer.ln_f.bias")}
    return out


def _same_update(one: dict, two: dict, case: str) -> None:
    assert (one["world_size"], two["world_size"]) == (1, 2)
    moved = max(float((one["weights"][k] - one["start"][k]).abs().max()) for k in one["weights"])
    assert moved > 1e-4, "the run did not train: nothing to compare"
    _close(_comparable(one["weights"], case), _comparable(two["weights"], case), atol=1e-5)
    assert one["budget"] == two["budget"]  # global counters: 2 ranks count what 1 process counts
    _close(one["metrics"], two["metrics"], atol=1e-5)  # global means, not rank 0's half
    assert len(one["history"]) == len(two["history"])
    for a, b in zip(one["history"], two["history"], strict=True):
        _close(a, b, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_one_process_update(results, case):
    _same_update(results["one"][case], results["two"][case], case)


@pytest.mark.parametrize("case", list(SHARDED))
def test_sharded_ranks_give_the_one_process_update(results, case):
    """FSDP2 on 2 gloo ranks: each rank holds half of every weight, gathers each block for its
    forward and backward (the whole policy for sampling), and reduce-scatters the gradients."""
    if results["sharded"] is None:
        pytest.skip(NO_FSDP2)
    _same_update(results["one"][case], results["sharded"][case], case)


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_give_the_whole_batch_update(results, case):
    whole, chunked = results["one"][case], results["one"][f"{case}+micro"]
    _close(_comparable(whole["weights"], case), _comparable(chunked["weights"], case), atol=1e-5)
    assert whole["budget"] == chunked["budget"]
    _close(whole["metrics"], chunked["metrics"], atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_fit_on_two_ranks_ends_as_on_one(tmp_path, strategy):
    """`rlhf-lab fit sft` for 20 steps: 2 ranks draw the global batches one process draws. Under
    fsdp2 (every weight sharded) the 2-rank run is also killed at step 12 (SIGKILL, every rank)
    and resumed from its step-10 checkpoint, which holds the whole weights and optimiser state."""
    if strategy == "fsdp2" and not fsdp2_available():
        pytest.skip(NO_FSDP2)
    args = ["fit", "sft", "--task", "arithmetic", "--trainer.max_steps", "20", "--config.batch_size", "8",
            "--eval.prompts", "4", "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_steps", "5",
            "--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2}"]
    one = subprocess.Popen(faults.cli(*args, "--out", str(tmp_path / "one")), env=faults.ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    two = [*args, "--trainer.devices", "2", "--trainer.strategy", strategy, "--out", str(tmp_path / "two")]
    if strategy == "fsdp2":
        faults.kill_at(faults.at_fault(two, {"step": 12}))
        assert sorted(os.listdir(tmp_path / "two" / "sft" / "checkpoints")) == ["last.ckpt", "step=10.ckpt"]
        two.append("--resume")
    faults.run(faults.cli(*two))
    assert one.wait(timeout=600) == 0, one.stderr.read()[-3000:]
    one.stderr.close()
    a, b = tmp_path / "one" / "sft", tmp_path / "two" / "sft"
    wa, wb = faults.weights(str(a)), faults.weights(str(b))
    _close(wa, wb, atol=1e-4)
    # Rank 0 alone wrote the folder: the same files as one process, each once, none half-written.
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    ra, rb = (list(csv.DictReader(open(d / "metrics.csv"))) for d in (a, b))
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        for key in ("budget/samples", "budget/optimizer_steps", "step"):
            assert x.get(key) == y.get(key)
        for key in ("train/loss", "val/loss"):
            if x.get(key):
                assert abs(float(x[key]) - float(y[key])) < 1e-4, (key, x[key], y[key])
    sa, sb = (json.load(open(d / "summary.json")) for d in (a, b))
    assert sa["metrics"]["budget/samples"] == sb["metrics"]["budget/samples"] == 160.0
    assert abs(sa["metrics"]["val/loss"] - sb["metrics"]["val/loss"]) < 1e-4
