"""SFT a tiny GPT-2 on the arithmetic task, then PPO straight on the gold judge.

    python experiments/sft_then_ppo_on_gold.py --out runs/gold-ppo [--sft-steps 150] [--ppo-iterations 30]
"""

import argparse

import lightning as L

from rlhf_lab.eval import gold_accuracy
from rlhf_lab.models.backbones import build_tiny_model
from rlhf_lab.models.tokenizer import train_bpe_tokenizer
from rlhf_lab.policy import Policy
from rlhf_lab.rewards import CallableSource
from rlhf_lab.stages import PPO, SFT, PPOConfig, SFTConfig
from rlhf_lab.tasks import get_task

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/gold-ppo")
parser.add_argument("--sft-steps", type=int, default=150)
parser.add_argument("--ppo-iterations", type=int, default=30)
args = parser.parse_args()

L.seed_everything(0)
task = get_task("arithmetic")
tokenizer = train_bpe_tokenizer(task.tokenizer_texts())
policy = Policy(build_tiny_model("gpt2-tiny", tokenizer), tokenizer)
train, val = task.sft_pairs()
L.Trainer(max_steps=args.sft_steps, accelerator="cpu", default_root_dir=args.out).fit(SFT(policy, train, val, SFTConfig()))
policy.save(f"{args.out}/sft")

config = PPOConfig(lr=3e-4, prompts_per_step=64, samples_per_prompt=4, minibatches=4, max_new_tokens=6)
rl_policy = Policy.load(f"{args.out}/sft", scalar_head=True, reference="copy")
ppo = PPO(rl_policy, task.rl_prompts(), CallableSource(task.gold_reward), config)
L.Trainer(max_steps=args.ppo_iterations * config.ppo_epochs * config.minibatches, accelerator="cpu",
          default_root_dir=args.out).fit(ppo)
rl_policy.save(f"{args.out}/ppo")
print(f"greedy gold accuracy: SFT {gold_accuracy(policy, task.eval_prompts(), task.gold_reward):.1%} "
      f"→ PPO {gold_accuracy(rl_policy, task.eval_prompts(), task.gold_reward):.1%}")
