"""Evaluate models: clean metrics, corruption robustness, perturbation stability, pseudo-label health,
and the experiment's report (``make report``).

    python stages/evaluate.py                              # every finished round of the experiment
    python stages/evaluate.py models=runs/x/round-2 test=CIFAR10 out=runs/x/eval-cifar
    accelerate launch stages/evaluate.py                   # the work split between ranks
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import parse_args, run  # noqa: E402
from pipeline.evaluate.report import evaluate  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, stage = parse_args(argv, {"models": str, "test": str, "out": str})
    dirs = [d for d in str(stage["models"]).split(",") if d] if "models" in stage else None
    rows, path = evaluate(cfg, dirs, stage.get("test"), stage.get("out"))
    from pipeline.runtime import make_accelerator

    if make_accelerator().is_main_process:
        for r in rows:
            extra = "".join(f"  {k} {r[k.lower()]:6.2f}%" for k in ("mCE", "mFR") if r[k.lower()] is not None)
            print(f"{r['label']:<16} top-1 {r['test_top1']:6.2f}%  ECE {r['ece']:.4f}{extra}")
        if path is not None:
            print(f"report: {path} (and report.html beside it)")
    return 0


if __name__ == "__main__":
    run(main)
