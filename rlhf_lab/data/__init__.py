"""Datasets and collators."""

from rlhf_lab.data.datasets import (
    PackedTextDataset,
    PreferenceDataset,
    SFTDataset,
    pad_collate,
    preference_collate,
)

__all__ = ["PackedTextDataset", "PreferenceDataset", "SFTDataset", "pad_collate", "preference_collate"]
