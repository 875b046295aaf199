"""Recipe search for CIFAR-10 with 4,000 labels, through the pipeline itself: its split, its
augmentation, its pseudo-label stage, so what a recipe scores here is what ``make iterate`` gets.

A recipe is a list of config overrides. Each run is ``stages/iterate.py --config
configs/cifar10.yaml round=K evaluate.test=false`` (validation only: the test set is never read)
in its own experiment; ``--base`` copies another experiment's round 0 so that students of one
teacher compare without training it again. The run's rounds are appended, with the command that
made them, to bench/results/cifar10_recipes.json.

    python bench/cifar10_search.py --name c10-ra --base c10-teacher --round 1 student.randaugment.enabled=true
    python bench/cifar10_search.py --name c10-20m --round 2 --budget 20m --note "the 20-minute proxy"
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from collect_iterate import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cifar10_recipes.json"


def rounds(exp: Path) -> list[dict]:
    """Each finished round's validation figures and cost (metrics.json, card.json)."""
    out = []
    for d in sorted(exp.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        if not (d / "metrics.json").is_file():
            continue
        m, card = json.loads((d / "metrics.json").read_text()), json.loads((d / "card.json").read_text())
        train = card.get("train") or [{}]
        out.append({"round": m["round"], "val_top1": m["val_top1"],
                    "pseudo_label_acc": None if m["pseudo_label_acc"] is None else round(m["pseudo_label_acc"], 2),
                    "epochs": train[0].get("epochs"), "precision": train[0].get("precision"),
                    "train_img_s": m.get("train_img_s"), "seconds": m["seconds"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the experiment (runs/<name>)")
    ap.add_argument("--round", type=int, default=1, help="the last round")
    ap.add_argument("--base", help="copy round 0 (the teacher) of runs/<base>")
    ap.add_argument("--budget", help="a time budget (20m, 60m) instead of the fixed schedules")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the record to append to")
    ap.add_argument("--note", default="", help="what the run tests")
    ap.add_argument("overrides", nargs="*", help="config overrides: the recipe")
    args = ap.parse_args()
    exp = args.runs_dir / args.name
    if args.base:
        if args.budget:
            sys.exit("--base and --budget: a budget plans the teacher too; train it in the run")
        if not (exp / "round-0").is_dir():
            shutil.copytree(args.runs_dir / args.base / "round-0", exp / "round-0")
    cmd = [sys.executable, "stages/iterate.py", "--config", "configs/cifar10.yaml", f"round={args.round}",
           "evaluate.test=false", f"name={args.name}", f"runs_dir={args.runs_dir}", "progress=false",
           *([f"budget={args.budget}"] if args.budget else []), *args.overrides]
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    entry = {"command": "python bench/cifar10_search.py " + shlex.join(sys.argv[1:]), "note": args.note,
             "rounds": rounds(exp), "wall_seconds": round(time.time() - start),
             "machine": machine(), "code_version": subprocess.run(
                 ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    if (exp / "budget.json").is_file():
        entry["budget_plan"] = json.loads((exp / "budget.json").read_text())
    record = json.loads(args.results.read_text()) if args.results.is_file() else {}
    record.setdefault("runs", []).append(entry)
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
