"""The data formats and which row kinds each stage takes: plain names, importable without torch.

The CLI offers `FORMATS` as the choices of `--format`; `rlhf_lab.data.spec` checks configs
against both tables.
"""

from __future__ import annotations

__all__ = ["FORMATS", "STAGE_KINDS"]

# format -> the kind of row it yields
FORMATS = {
    "text": "text",
    "prompt_completion": "sft",
    "dolly": "sft",
    "alpaca": "sft",
    "gsm8k": "sft",
    "preference": "preference",
    "hh": "preference",
    "gsm8k_pairs": "preference",
    "unpaired": "unpaired",
    "prompts": "prompts",
}
# stage -> the row kinds it accepts (online stages take the prompts of any row kind that has them)
STAGE_KINDS = {
    "pretrain": ("text",),
    "sft": ("sft",),
    "reward_model": ("preference",),
    "dpo": ("preference", "unpaired"),  # unpaired rows: variant kto only (FitConfig checks)
    "online_rl": ("prompts", "sft", "preference", "unpaired"),
    "ppo": ("prompts", "sft", "preference", "unpaired"),
    "online_dpo": ("prompts", "sft", "preference", "unpaired"),
}
