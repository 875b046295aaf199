"""Run or resume Noisy Student rounds 0..N and print test top-1 per round (``make iterate ROUND=N``).

    python stages/iterate.py round=2 [--config configs/fashion_mnist.yaml] [student.drop_path_rate=0.2 ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("iterate")
