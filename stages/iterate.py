"""Run or resume Noisy Student rounds 0..N and print test top-1 per round (``make iterate ROUND=N``).

    python stages/iterate.py round=2 [--config configs/fashion_mnist.yaml] [student.drop_path_rate=0.2 ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import int_at_least, parse_args, run  # noqa: E402
from pipeline.rounds import iterate, table  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, stage = parse_args(argv, {"round": int_at_least(0)})
    rows = iterate(cfg, int(stage.get("round", 2)))
    from pipeline.runtime import make_accelerator

    if make_accelerator().is_main_process:
        print(f"\nexperiment {cfg.name} ({cfg.run_dir})\n" + table(rows))
    return 0


if __name__ == "__main__":
    run(main)
