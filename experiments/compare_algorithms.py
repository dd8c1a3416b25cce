"""Compare algorithms on arithmetic at an equal sample budget from one SFT checkpoint, from Python.

    python experiments/compare_algorithms.py [--out runs/cmp] [--algorithms ppo,rloo,grpo,dpo] [--seeds 3]
                                             [--budget 15360] [--workers 1] [--quick]

The same as `rlhf-lab compare`: report.md (mean ± 95% CI over seeds) and three plots in --out;
re-running resumes. This script then ranks the algorithms by their final gold score.
"""

import argparse
from statistics import mean

from rlhf_lab.compare import CompareConfig, run_compare

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/cmp")
parser.add_argument("--algorithms", default="ppo,rloo,grpo,dpo")
parser.add_argument("--seeds", type=int, default=3)
parser.add_argument("--budget", type=int, default=None)
parser.add_argument("--workers", type=int, default=1)
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()

config = CompareConfig(task="arithmetic", algorithms=args.algorithms, seeds=args.seeds, budget=args.budget,
                       quick=args.quick)
outcome = run_compare(config, args.out, workers=args.workers)
gold = {a: mean(r["gold_reward"] for r in outcome.results if r["algorithm"] == a) for a in config.algorithms}
for rank, (algorithm, score) in enumerate(sorted(gold.items(), key=lambda kv: -kv[1]), 1):
    print(f"{rank}. {algorithm:<10} mean gold score {score:.3f} over {config.seeds} seeds")
print(f"report: {outcome.report}")
