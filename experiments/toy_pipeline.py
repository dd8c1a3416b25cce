"""The full toy pipeline from YAML configs: pretrain -> SFT -> reward model -> PPO on arithmetic.

    python experiments/toy_pipeline.py [--out runs/toy] [--key.sub value ...]

Overrides after --out apply to every stage (e.g. --trainer.max_steps 5 for a smoke run).
"""

import json
import sys

from rlhf_lab.demo import build_preference_pairs
from rlhf_lab.experiment import fit_from_files
from rlhf_lab.policy import Policy
from rlhf_lab.tasks import get_task

args = sys.argv[1:]
out = args[args.index("--out") + 1] if "--out" in args else "runs/toy"
extra = [a for i, a in enumerate(args) if a != "--out" and (i == 0 or args[i - 1] != "--out")]
task, configs = get_task("arithmetic"), "experiments/configs/toy"


def stage(name: str, *more: str) -> dict:
    return fit_from_files(f"{configs}/{name}.yaml", ["--out", out, *more, *extra])


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
