"""DPO on HH-RLHF-format pairs (prompt = the dialogue up to the last Assistant turn).

    python experiments/dpo_hh.py [--model.backbone SFT_FOLDER] [--data.path FILE] [--key.sub value ...]

Prints the implicit-reward accuracy and margin on the held-out pairs before and after training.
"""

import os
import sys

from rlhf_lab.experiment import fit_from_files

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "dpo_hh.yaml")
summary = fit_from_files(CONFIG, sys.argv[1:])
m = summary["metrics"]
print(f"held-out pairs: implicit-reward accuracy {m['val/reward_accuracy']:.1%}, "
      f"margin {m['val/reward_margin']:.3f}, DPO loss {m['val/loss']:.3f} (log 2 = 0.693 at the start)")
