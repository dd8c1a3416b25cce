"""LoRA SFT of a tiny OPT-style model on Dolly-format data, with ROUGE and perplexity before/after.

    python experiments/lora_sft_dolly.py [--out runs/dolly-lora] [--data.path FILE.jsonl] [--key.sub value ...]

The recipe of the usual "fine-tune OPT with LoRA on Dolly" tutorial on a tiny config and the local
sample. Offline there is no pretrained OPT, so the script first pretrains the tiny one on the
data's own text (all weights); the SFT stage then trains a LoRA adapter on that frozen base.
"""

import json
import os
import sys

from rlhf_lab.config import apply_overrides, parse_overrides
from rlhf_lab.data import DataConfig, load_data
from rlhf_lab.experiment import evaluate_checkpoint, fit_from_files

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SAMPLE = os.path.normpath(os.path.join(CONFIGS, "..", "..", "..", "shared", "data", "dolly", "dolly-sample.jsonl"))
args = sys.argv[1:]
opts = apply_overrides({"out": "runs/dolly-lora", "data": {"path": SAMPLE}}, parse_overrides(args))
out, data = opts["out"], opts["data"]["path"]
# The SFT stage's own split (same fraction and seed): only its training rows go into the corpus.
train, val = load_data(DataConfig(format="dolly", path=data, val_fraction=0.1, on_error="skip"))
os.makedirs(out, exist_ok=True)
with open(f"{out}/corpus.txt", "w") as f:
    f.write("\n\n".join(r["prompt"] + r["completion"] for r in train))
with open(f"{out}/val.jsonl", "w") as f:
    f.writelines(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in val)
fit_from_files(os.path.join(CONFIGS, "pretrain_dolly.yaml"),
               [f"--out={out}", *args, "--data", f"{{format: text, path: {out}/corpus.txt, val_fraction: 0.1}}"])
summary = fit_from_files(os.path.join(CONFIGS, "sft_dolly_lora.yaml"),
                         [f"--out={out}", *args, "--model.backbone", f"{out}/pretrain", "--model.overrides", "{}"])
history = summary["history"]  # EvalCallback: at the start (adapter still zero) and at the end
for key in ("val/rouge1", "val/rouge2", "val/rougeL", "val/reference_perplexity"):
    print(f"{key:<16} {history[0][key]:.4f} -> {history[-1][key]:.4f}")
# The saved folder is the adapter (+ its base): reloaded, it scores the held-out rows as above.
evaluate_checkpoint(summary["out"], data_path=f"{out}/val.jsonl", n_prompts=len(val), max_new_tokens=48)
