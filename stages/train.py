"""Train round 0's teacher or round k's noised student.

    python stages/train.py role=teacher                 # round 0
    python stages/train.py role=student round=1         # needs round-1/pseudo_labels
    accelerate launch stages/train.py role=student round=1 ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("train")
