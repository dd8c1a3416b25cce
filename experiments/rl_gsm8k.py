"""SFT then GRPO on GSM8K-format problems with the verifiable gold reward.

    python experiments/rl_gsm8k.py [--out runs/gsm8k] [--data.path TRAIN] [--data.val_path TEST] [...]

The reward is 1 when the completion's final number equals the gold number after "####"
(rlhf_lab.data.GSM8KJudge); the same judge measures val/gold_reward.
"""

import sys

from rlhf_lab.experiment import fit_from_files

args = sys.argv[1:]
out = args[args.index("--out") + 1] if "--out" in args else "runs/gsm8k"
sft = fit_from_files("experiments/configs/sft_gsm8k.yaml", ["--out", out, *args])
# The common overrides apply to both stages; the RL stage starts from the SFT folder.
rl = fit_from_files("experiments/configs/rl_gsm8k.yaml",
                    ["--out", out, *args, "--model.backbone", f"{out}/sft", "--model.overrides", "{}"])
print(f"gold reward (greedy, {rl['config']['eval']['prompts']} test prompts): "
      f"SFT {sft['metrics']['val/gold_reward']:.1%} -> GRPO {rl['metrics']['val/gold_reward']:.1%}")
