"""Collect a finished `make report` into bench/results/<out>.json and copy the report as an example.

    python bench/collect_robustness.py runs/fashion_mnist bench/results/fashion_mnist_robustness.json \
        --command "make iterate ROUND=2 && make report" --example docs/example-report
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from collect_iterate import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--command", required=True)
    ap.add_argument("--wall-seconds", type=float, default=None, help="wall time of `make report`")
    ap.add_argument("--example", type=Path, default=None, help="copy report.md/html and plots/ here")
    args = ap.parse_args()
    report = json.loads((args.run_dir / "report.json").read_text())
    rounds = [{"round": r["round"], "model": r["model"], "test_top1": round(r["test_top1"], 2),
               "mce": None if r["mce"] is None else round(r["mce"], 2),
               "relative_mce": None if r["relative_mce"] is None else round(r["relative_mce"], 2),
               "mfr": None if r["mfr"] is None else round(r["mfr"], 2), "ece": round(r["ece"], 4),
               "nll": round(r["nll"], 4)} for r in report["rows"] if r["round"] is not None]
    out = {"rounds": rounds, "machine": machine(), "command": args.command,
           "wall_seconds": args.wall_seconds, "evaluate": report["evaluate"],
           "notes": "top-1, mCE, mFR in percent (mCE/mFR normalised by the round-0 teacher); ECE a fraction"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    if args.example is not None:
        args.example.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "report.html", "report.json"):
            shutil.copy2(args.run_dir / name, args.example / name)
        shutil.rmtree(args.example / "plots", ignore_errors=True)
        shutil.copytree(args.run_dir / "plots", args.example / "plots")


if __name__ == "__main__":
    main()
