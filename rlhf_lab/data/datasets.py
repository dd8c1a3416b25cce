"""Token datasets and collators for the stages: packed text, SFT pairs, preference pairs, unpaired
feedback, prompts.

Truncation is never silent: each dataset counts the rows it truncated (`n_truncated`) and logs it.
"""

from __future__ import annotations

import logging
import random

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


class UnpairedDataset(Dataset):
    """`prompt`/`completion`/`label` rows (KTO): each row's tokens and its label (True = desirable),
    and a mismatched sequence for KTO's reference point z0: the row's prompt followed by another
    row's completion.

    The other row is fixed when the dataset is built: the next row, in an order shuffled with
    `seed`, whose prompt differs (looking up to `MAX_LOOKAHEAD` rows ahead; else simply the next
    row, as when every row shares one prompt). Fixed per row, the estimate of z0 over a batch
    depends only on which rows the batch holds, not on how it is split into micro-batches or
    ranks, and the reference log-probs of the mismatched sequences can be precomputed like the
    rows'. Items: `{"row", "mismatched"}` (SFT items) and `label`.
    """

    MAX_LOOKAHEAD = 16

    def __init__(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int = 128, seed: int = 0):
        for i, row in enumerate(rows):
            if not isinstance(row.get("label"), bool):
                raise ValueError(f"unpaired row {i}: field 'label' must be a boolean (True = desirable, "
                                 f"False = undesirable), got {row.get('label')!r}")
        self.rows = SFTDataset(rows, tokenizer, max_length)
        self.partners = self._partners([r["prompt"] for r in rows], seed)
        self.mismatched = SFTDataset([{"prompt": r["prompt"], "completion": rows[j]["completion"]}
                                      for r, j in zip(rows, self.partners, strict=True)], tokenizer, max_length)
        self.labels = [row["label"] for row in rows]
        self.n_truncated = self.rows.n_truncated

    @classmethod
    def _partners(cls, prompts: list[str], seed: int) -> list[int]:
        """For each row, the row whose completion its mismatched sequence takes."""
        n = len(prompts)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        partners = [0] * n
        for k, i in enumerate(order):
            ahead = [order[(k + step) % n] for step in range(1, min(n, cls.MAX_LOOKAHEAD + 1))]
            partners[i] = next((j for j in ahead if prompts[j] != prompts[i]), ahead[0] if ahead else i)
        return partners

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"row": self.rows[i], "mismatched": self.mismatched[i], "label": self.labels[i]}


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


def unpaired_collate(items: list[dict], pad_token_id: int) -> dict:
    """The rows as one padded batch (B, T), their mismatched sequences as another under `kl_` keys
    (`kl_input_ids`, `kl_attention_mask`, `kl_loss_mask`: (B, T')), and `label` (B,) bool."""
    batch = pad_collate([i["row"] for i in items], pad_token_id)
    mismatched = pad_collate([i["mismatched"] for i in items], pad_token_id)
    batch.update({f"kl_{key}": value for key, value in mismatched.items()})
    batch["label"] = torch.tensor([i["label"] for i in items], dtype=torch.bool)
    return batch
