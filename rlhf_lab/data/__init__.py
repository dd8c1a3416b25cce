"""Datasets and collators."""

from rlhf_lab.data.datasets import (
    PackedTextDataset,
    PreferenceDataset,
    SFTDataset,
    pad_collate,
    preference_collate,
)
from rlhf_lab.data.loaders import (
    DataError,
    GSM8KJudge,
    LoadReport,
    Rows,
    gsm8k_reward,
    load_alpaca,
    load_dolly,
    load_gsm8k,
    load_gsm8k_solution_pairs,
    load_hh,
    load_jsonl_rows,
    load_preference_rows,
    load_prompt_completion,
    load_prompts,
    load_text,
    train_val_split,
)
from rlhf_lab.data.spec import (
    FORMATS,
    STAGE_KINDS,
    DataConfig,
    check_stage_data,
    load_data,
    prompts_of,
)

__all__ = [
    "PackedTextDataset", "PreferenceDataset", "SFTDataset", "pad_collate", "preference_collate",
    "DataError", "GSM8KJudge", "LoadReport", "Rows", "gsm8k_reward", "load_alpaca", "load_dolly",
    "load_gsm8k", "load_gsm8k_solution_pairs", "load_hh", "load_jsonl_rows", "load_preference_rows",
    "load_prompt_completion", "load_prompts", "load_text", "train_val_split",
    "FORMATS", "STAGE_KINDS", "DataConfig", "check_stage_data", "load_data", "prompts_of",
]
