"""Pseudo-label the unlabeled shards with round k-1's model (un-noised) into round-k/pseudo_labels/.

    python stages/pseudo_label.py round=1
    accelerate launch stages/pseudo_label.py round=1      # shards split between ranks
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import int_at_least, parse_args, run  # noqa: E402
from pipeline.rounds import pseudo_label, round_dir  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, stage = parse_args(argv, {"round": int_at_least(1)})
    k = int(stage.get("round", 1))
    pseudo_label(cfg, k)
    print(f"pseudo labels in {round_dir(cfg, k) / 'pseudo_labels'}")
    return 0


if __name__ == "__main__":
    run(main)
