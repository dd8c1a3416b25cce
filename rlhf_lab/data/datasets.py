"""Token datasets and collators for the stages: packed text, SFT pairs, preference pairs, prompts.

Truncation is never silent: each dataset counts the rows it truncated (`n_truncated`) and logs it.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PackedTextDataset(Dataset):
    """A text corpus tokenised, joined with EOS between documents, and cut into fixed blocks.

    Each item is a full block: `input_ids` (block_size,) and a `loss_mask` that is 1 everywhere
    (every next token counts in pretraining). The tail shorter than a block is dropped and
    counted in `n_dropped_tokens`.
    """

    def __init__(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        stream: list[int] = []
        for text in texts:
            stream.extend(_encode(tokenizer, text))
            stream.append(tokenizer.eos_token_id)
        n_blocks = len(stream) // block_size
        if n_blocks == 0:
            raise ValueError(f"corpus has {len(stream)} tokens, fewer than one block of {block_size}")
        self.n_dropped_tokens = len(stream) - n_blocks * block_size
        self.blocks = torch.tensor(stream[: n_blocks * block_size]).view(n_blocks, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


class SFTDataset(Dataset):
    """Prompt/completion pairs: `prompt + completion + EOS`, loss on completion tokens only.

    When a row exceeds `max_length`, the start of the prompt is cut (its end, next to the answer,
    is what matters) and the row is counted in `n_truncated`; a completion that alone exceeds
    the limit is cut at its end.
    """

    def __init__(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int = 128):
        if not rows:
            raise ValueError("got 0 rows: a stage needs at least one prompt/completion (or preference) row")
        self.items = []
        self.n_truncated = 0
        for i, row in enumerate(rows):
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"SFT row {i}: field '{key}' must be a string, got {row.get(key)!r}")
            prompt = _encode(tokenizer, row["prompt"])
            completion = _encode(tokenizer, row["completion"]) + [tokenizer.eos_token_id]
            if len(prompt) + len(completion) > max_length:
                self.n_truncated += 1
                completion = completion[:max_length - 1]
                prompt = prompt[len(prompt) - (max_length - len(completion)):]
            ids = torch.tensor(prompt + completion)
            loss_mask = torch.tensor([0] * len(prompt) + [1] * len(completion))
            self.items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask})
        if self.n_truncated:
            log.warning("SFTDataset: truncated %d of %d rows to %d tokens", self.n_truncated, len(rows), max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PreferenceDataset(Dataset):
    """`prompt`/`chosen`/`rejected` rows as two tokenised sequences sharing the prompt."""

    def __init__(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int = 128):
        self.chosen = SFTDataset([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows],
                                 tokenizer, max_length)
        self.rejected = SFTDataset([{"prompt": r["prompt"], "completion": r["rejected"]} for r in rows],
                                   tokenizer, max_length)
        self.n_truncated = self.chosen.n_truncated + self.rejected.n_truncated

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict:
        return {"chosen": self.chosen[i], "rejected": self.rejected[i]}


def pad_collate(items: list[dict], pad_token_id: int) -> dict:
    """Right-pad `input_ids`, `attention_mask`, `loss_mask` to the longest item. Shape: (B, T)."""
    width = max(item["input_ids"].shape[0] for item in items)
    out = {}
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("loss_mask", 0)):
        out[key] = torch.stack(
            [torch.nn.functional.pad(item[key], (0, width - item[key].shape[0]), value=fill) for item in items]
        )
    return out


def preference_collate(items: list[dict], pad_token_id: int) -> dict:
    """Chosen rows then rejected rows in one padded batch of 2B (one forward pass for both)."""
    return pad_collate([i["chosen"] for i in items] + [i["rejected"] for i in items], pad_token_id)
