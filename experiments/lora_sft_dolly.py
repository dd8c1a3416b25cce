"""LoRA SFT of a tiny OPT-style model on Dolly-format data, with ROUGE and perplexity before/after.

    python experiments/lora_sft_dolly.py [--data.path FILE.jsonl] [--key.sub value ...]

The recipe of the usual "fine-tune OPT with LoRA on Dolly" tutorial, on a tiny config and the
local sample (experiments/configs/sft_dolly_lora.yaml); the adapter is saved with its base.
"""

import sys

from rlhf_lab.experiment import evaluate_checkpoint, fit_from_files

summary = fit_from_files("experiments/configs/sft_dolly_lora.yaml", sys.argv[1:])
history = summary["history"]  # EvalCallback: at the start (untrained adapter) and at the end
for key in ("val/rouge1", "val/rouge2", "val/rougeL", "val/perplexity"):
    print(f"{key:<16} {history[0][key]:.4f} -> {history[-1][key]:.4f}")
# The saved folder is an adapter (+ its base); `rlhf-lab eval` works on it too.
data = summary["config"]["data"]
evaluate_checkpoint(summary["out"], data_format="dolly", data_path=data["path"], on_error="skip", n_prompts=8)
