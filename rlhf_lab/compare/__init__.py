"""`rlhf-lab compare`: algorithms × seeds from one SFT checkpoint at an equal budget → a report.

- `config.py`: `CompareConfig` (what runs; the settings a folder must keep).
- `runner.py`: `run_compare` (the base once, then each run in this process or a process pool,
  resuming a folder) and `run_one` (one algorithm × seed).
- `stats.py`: `mean_ci`, the mean ± Student-t interval over seeds.
- `report.py`: `write_report`: report.md, summary.json and the three plots.
- `cli.py`: `add_compare_command(subparsers)`, the argparse wiring.
"""

from rlhf_lab.compare.config import CompareConfig

__all__ = ["CompareConfig", "run_compare"]


def __getattr__(name: str):
    # run_compare pulls in Lightning and the stages; import it only when asked for.
    if name == "run_compare":
        from rlhf_lab.compare.runner import run_compare

        return run_compare
    raise AttributeError(f"module 'rlhf_lab.compare' has no attribute {name!r}")
