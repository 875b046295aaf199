"""Collect a finished `make iterate` run into bench/results/<out>.json.

    python bench/collect_iterate.py runs/fashion_mnist bench/results/fashion_mnist_iterate.json \
        --command "make iterate ROUND=2" --wall-seconds 1560

``--labels-only RUN_DIR`` adds a round-0-only run of the same budget as the baseline (``labels_only``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import version  # torch's, without importing it: a benchmark may be running
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    flags = set()
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2") + (
        ", native bf16" if flags & {"avx512_bf16", "amx_bf16"} else ", no native bf16")
    return f"{os.cpu_count()} cores {cpu} ({isa}){mem}, no GPU, torch {version('torch')}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--command", required=True)
    ap.add_argument("--wall-seconds", type=float, default=None, help="wall time of the whole command")
    ap.add_argument("--phases", action="store_true", help="also the seconds of prepare and of each round's phases")
    ap.add_argument("--labels-only", type=Path, help="a labels-only run (round 0 alone) of the same budget")
    ap.add_argument("--labels-only-command", default=None)
    args = ap.parse_args()
    rounds = []
    for d in sorted(args.run_dir.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        m = json.loads((d / "metrics.json").read_text())
        row = {"round": m["round"], "model": m["model"], "test_top1": m["test_top1"],
               "pseudo_label_acc": None if m["round"] == 0 else round(m["pseudo_label_acc"], 2),
               "seconds": m["seconds"]}
        if args.phases:  # where the round's time went
            evals = [json.loads(p.read_text()) for p in (d / "eval").glob("clean-*.json")]
            row.update({"val_top1": m.get("val_top1"), "params": m.get("params"),
                        "pseudo_label_seconds": m.get("pseudo_label_seconds"), "train_seconds": m.get("train_seconds"),
                        "train_img_s": m.get("train_img_s"),
                        "evaluation_seconds": round(sum(e.get("seconds", 0) for e in evals), 1) if evals else None})
        rounds.append(row)
    card = json.loads((args.run_dir / "round-0" / "card.json").read_text())
    out = {"rounds": rounds, "machine": machine(), "command": args.command,
           "wall_seconds": args.wall_seconds, "code_version": card.get("code_version"),
           "gain_top1": round(rounds[-1]["test_top1"] - rounds[0]["test_top1"], 2) if rounds else None}
    if args.labels_only:
        m = json.loads((args.labels_only / "round-0" / "metrics.json").read_text())
        lo_card = json.loads((args.labels_only / "round-0" / "card.json").read_text())
        out["labels_only"] = {"command": args.labels_only_command, "test_top1": m["test_top1"],
                              "val_top1": m.get("val_top1"), "epochs": lo_card["train"][0]["epochs"],
                              "images_trained": sum(t["bad_samples"]["used"] for t in lo_card["train"]),
                              "seconds": m["seconds"]}
        out["gain_over_labels_only"] = round(rounds[-1]["test_top1"] - m["test_top1"], 2)
    if args.phases:
        data = json.loads((Path(card["parents"]["data_dir"]) / "manifest.json").read_text()) if card.get(
            "parents", {}).get("data_dir") else {}
        out["prepare_seconds"] = data.get("seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
