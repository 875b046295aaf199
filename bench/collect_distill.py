"""Collect a finished `make distill` (its compression.json) into bench/results/<out>.json.

    python bench/collect_distill.py runs/fashion_mnist/distilled/small bench/results/fashion_mnist_distill.json \
        --command "make distill"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from collect_iterate import machine

KEYS = ("model", "params", "macs", "test_top1", "latency_ms_b1", "img_s_b64", "file_bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("distilled_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--command", required=True)
    args = ap.parse_args()
    rep = json.loads((args.distilled_dir / "compression.json").read_text())
    card = json.loads((args.distilled_dir / "card.json").read_text())
    out = {"teacher": {k: rep["teacher"][k] for k in KEYS}, "student": {k: rep["student"][k] for k in KEYS},
           "labels_only_top1": rep["labels_only_top1"], "retained": rep["retained"],
           "params_ratio": rep["params_ratio"], "distill": card.get("distill"),
           "student_train_seconds": card["metrics"]["train_seconds"], "threads": rep["teacher"]["threads"],
           "machine": machine(), "command": args.command}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
