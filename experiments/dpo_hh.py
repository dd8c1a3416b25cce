"""DPO (or ORPO, KTO) on HH-RLHF-format pairs (prompt = the dialogue up to the last Assistant turn).

    python experiments/dpo_hh.py [--algorithm dpo|orpo|kto] [--model.backbone SFT_FOLDER] [--data.path FILE]
                                 [--key.sub value ...]

--algorithm swaps the registry preset on top of the config file (`stage` and the preset's knobs;
KTO splits each pair into a desirable and an undesirable row). Prints the implicit-reward
accuracy and margin on the held-out pairs (KTO: rows) after training.
"""

import argparse
import json
import os
import sys

from rlhf_lab.algorithms import ALGORITHMS, get_algorithm
from rlhf_lab.experiment import fit_from_files

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "dpo_hh.yaml")
OFFLINE = [name for name, entry in ALGORITHMS.items() if entry.stage == "dpo"]

parser = argparse.ArgumentParser(add_help=False)
parser.add_argument("--algorithm", default="dpo", choices=OFFLINE)
args, overrides = parser.parse_known_args(sys.argv[1:])
if args.algorithm != "dpo":  # the preset's knobs override the file's; the command line's win over both
    preset = get_algorithm(args.algorithm).preset
    overrides = ["--stage", args.algorithm, *(a for k, v in preset.items() for a in (f"--config.{k}", json.dumps(v))),
                 *overrides]
summary = fit_from_files(CONFIG, overrides)
m = summary["metrics"]
start = {"dpo": "log 2 = 0.693 at the start", "kto": "0.5 at the start"}.get(args.algorithm)
print(f"held-out {'rows' if args.algorithm == 'kto' else 'pairs'}: implicit-reward accuracy "
      f"{m['val/reward_accuracy']:.1%}, margin {m['val/reward_margin']:.3f}, {args.algorithm} loss "
      f"{m['val/loss']:.3f}" + (f" ({start})" if start else ""))
