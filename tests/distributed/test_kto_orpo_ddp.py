"""KTO and ORPO from one process to two DDP ranks: the same global batch gives the same update.

The machinery of tests/distributed/test_ddp.py (its worker trains each case on one process and as
2 gloo ranks). KTO's reference point z0 is a mean over the global batch's mismatched pairs, summed
over the ranks before the loss reads it, and its loss and metrics divide by the global batch's row
counts, so 2 ranks, and micro-batches on one process, must reproduce the one-process run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ddp_cases", HERE / "test_ddp.py")
ddp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp)

pytestmark = pytest.mark.slow

# The worker's 16 pairs: KTO splits them into 32 rows, batches of 8 rows (7 in the uneven case:
# shares of 4 and 3 rows on 2 ranks, in parts of 3).
CASES = {
    "kto": {"stage": "dpo", "config": {"variant": "kto"}},
    # Desirable rows weigh 60 times the undesirable ones and the step is large: the likelihood of
    # every answer rises, so the mismatched pairs' KL, and z0, are positive at the second step.
    "kto_weighted": {"stage": "dpo", "config": {"variant": "kto", "lr": 0.03, "desirable_weight": 3.0,
                                                "undesirable_weight": 0.05}},
    "kto_precomputed": {"stage": "dpo", "config": {"variant": "kto", "reference": "precomputed"}},
    "kto_uneven": {"stage": "dpo", "config": {"variant": "kto", "batch_size": 7, "micro_batch_size": 3}},
    "orpo": {"stage": "dpo", "config": {"variant": "orpo", "beta": 0.1, "nll_coef": 1.0}},
}
MICRO = {f"{name}+micro": {**case, "config": {**case["config"], "micro_batch_size": 3}}
         for name, case in CASES.items() if "micro_batch_size" not in case["config"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto_ddp")
    (root / "one").mkdir()
    (root / "two").mkdir()
    ones = {**CASES, **MICRO}
    one, two = ddp._start(root / "one", 1, ones), ddp._start(root / "two", 2, CASES)
    return {"one": ddp._results(one, root / "one", ones), "two": ddp._results(two, root / "two", CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_one_process_update(results, case):
    ddp._same_update(results["one"][case], results["two"][case], case)
    if case == "kto_weighted":  # the reference point took part: z0 > 0, from the whole global batch
        assert results["one"][case]["metrics"]["train/kl_reference_point"] > 0.5


@pytest.mark.parametrize("case", list(MICRO))
def test_micro_batches_give_the_whole_batch_update(results, case):
    whole, chunked = results["one"][case.removesuffix("+micro")], results["one"][case]
    ddp._close(ddp._comparable(whole["weights"], case), ddp._comparable(chunked["weights"], case), atol=1e-5)
    assert whole["budget"] == chunked["budget"]
    ddp._close(whole["metrics"], chunked["metrics"], atol=1e-5)
