"""Evaluate models: clean metrics, corruption robustness, perturbation stability, pseudo-label health,
and the experiment's report (``make report``).

    python stages/evaluate.py                              # every finished round of the experiment
    python stages/evaluate.py models=runs/x/round-2 test=CIFAR10 out=runs/x/eval-cifar
    accelerate launch stages/evaluate.py                   # the work split between ranks
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("evaluate")
