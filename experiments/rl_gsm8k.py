"""SFT then GRPO on GSM8K-format problems with the verifiable gold reward.

    python experiments/rl_gsm8k.py [--out runs/gsm8k] [--key.sub value ...] [--sft.key value] [--grpo.key value]

Runs from any directory (the configs' data paths are relative to the config files). An override
`--key value` applies to both stages; `--sft.key value` or `--grpo.key value` to one of them (e.g.
`--grpo.config.max_new_tokens 64`). The reward is 1 when the completion's final number equals the
gold number after "####" (rlhf_lab.data.GSM8KJudge); the same judge measures val/gold_reward.
"""

import os
import sys

from rlhf_lab.experiment import fit_from_files, split_overrides

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
args = split_overrides(sys.argv[1:], ("sft", "grpo"))
out = next((a.split("=", 1)[1] for a in args["sft"] if a.startswith("--out=")), "runs/gsm8k")
sft = fit_from_files(os.path.join(CONFIGS, "sft_gsm8k.yaml"), [*args["sft"], f"--out={out}"])
# The RL stage starts from the SFT folder (its model keys win over the shared overrides).
rl = fit_from_files(os.path.join(CONFIGS, "rl_gsm8k.yaml"),
                    [*args["grpo"], f"--out={out}", "--model.backbone", f"{out}/sft", "--model.overrides", "{}"])
print(f"gold reward (greedy, {rl['config']['eval']['prompts']} test prompts): "
      f"SFT {sft['metrics']['val/gold_reward']:.1%} -> GRPO {rl['metrics']['val/gold_reward']:.1%}")
