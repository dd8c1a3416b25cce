"""Datasets, loaders and data configs.

Names are imported on first access (PEP 562 module `__getattr__`), so `from rlhf_lab.data import
FORMATS` stays light while `from rlhf_lab.data import SFTDataset` loads torch as before. The
torch-free tables live in `rlhf_lab.data.formats`.
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(
        ["PackedTextDataset", "PreferenceDataset", "SFTDataset", "UnpairedDataset", "pad_collate",
         "preference_collate", "unpaired_collate"],
        "datasets",
    ),
    **dict.fromkeys(
        ["DataError", "GSM8KJudge", "LoadReport", "Rows", "gsm8k_reward", "load_alpaca", "load_dolly",
         "load_gsm8k", "load_gsm8k_solution_pairs", "load_hh", "load_jsonl_rows", "load_preference_rows",
         "load_prompt_completion", "load_prompts", "load_text", "load_unpaired_rows", "train_val_split",
         "unpair"],
        "loaders",
    ),
    **dict.fromkeys(["FORMATS", "STAGE_KINDS"], "formats"),
    "GlobalBatchSampler": "sampler",
    "ResumableSampler": "sampler",
    **dict.fromkeys(["DataConfig", "check_stage_data", "load_data", "prompts_of"], "spec"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
