"""Pseudo-label the unlabeled shards with round k-1's model (un-noised) into round-k/pseudo_labels/.

    python stages/pseudo_label.py round=1
    accelerate launch stages/pseudo_label.py round=1      # shards split between ranks
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("pseudo-label")
