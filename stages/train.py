"""Train round 0's teacher or round k's noised student.

    python stages/train.py role=teacher                 # round 0
    python stages/train.py role=student round=1         # needs round-1/pseudo_labels
    accelerate launch stages/train.py role=student round=1 ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import choice, int_at_least, parse_args, run  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.rounds import train_round  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, stage = parse_args(argv, {"role": choice("teacher", "student"), "round": int_at_least(0)})
    role = stage.get("role", "teacher")
    k = stage.get("round", 0 if role == "teacher" else 1)
    if (role == "teacher") != (k == 0):
        raise ConfigError(f"role={role} does not go with round={k} (the teacher is round 0, students are 1, 2, ...)")
    train_round(cfg, int(k))
    return 0


if __name__ == "__main__":
    run(main)
