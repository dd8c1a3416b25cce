"""The full toy pipeline from YAML configs: pretrain -> SFT -> reward model -> PPO on arithmetic.

    python experiments/toy_pipeline.py [--out runs/toy] [--key.sub value ...]

Runs from any directory. An override `--key value` applies to every stage (e.g. --trainer.max_steps 5
for a smoke run); `--STAGE.key value` (STAGE: pretrain, sft, reward_model, ppo) to one of them.
"""

import json
import os
import sys

from rlhf_lab.demo import build_preference_pairs
from rlhf_lab.experiment import fit_from_files, split_overrides
from rlhf_lab.policy import Policy
from rlhf_lab.tasks import get_task

STAGES = ("pretrain", "sft", "reward_model", "ppo")
args = split_overrides(sys.argv[1:], STAGES)
out = next((a.split("=", 1)[1] for a in args["pretrain"] if a.startswith("--out=")), "runs/toy")
task = get_task("arithmetic")
configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "toy")


def stage(name: str, *more: str) -> dict:
    return fit_from_files(os.path.join(configs, f"{name}.yaml"), [f"--out={out}", *more, *args[name]])


stage("pretrain")
sft = stage("sft", "--model.backbone", f"{out}/pretrain")
# Preference pairs: SFT samples of the RL prompts, ranked by the gold judge.
pairs = build_preference_pairs(Policy.load(f"{out}/sft"), task.rl_prompts(), task.gold_reward, samples=32,
                               temperature=1.5, max_new_tokens=task.max_new_tokens, seed=0)
with open(f"{out}/pairs.jsonl", "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs)
rm = stage("reward_model", "--model.backbone", f"{out}/sft", "--data.path", f"{out}/pairs.jsonl")
ppo = stage("ppo", "--model.backbone", f"{out}/sft", "--reward.path", f"{out}/reward_model")
print(f"reward model val accuracy {rm['metrics']['val/accuracy']:.1%}; greedy gold score "
      f"SFT {sft['metrics']['val/gold_reward']:.1%} -> PPO {ppo['metrics']['val/gold_reward']:.1%}")
