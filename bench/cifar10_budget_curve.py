"""What more time buys on CIFAR-10: the config's recipe under each time budget against its
labels-only twin, both through ``make iterate``'s own entry point on this machine.

The twin is round 0 alone with the same teacher recipe, given as many epochs as it takes to train
at least as many images as the whole Noisy Student run did (its students train more images a
second than the teacher's small batches, so the twin also runs longer than the budget).

Runs what is missing (runs/cifar10-<budget>, runs/cifar10-labels-only-<budget>; a finished run is
only read), then writes bench/results/cifar10_budget_curve.json and its plot (.png beside it).

    python bench/cifar10_budget_curve.py --budgets 20m 60m
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from collect_iterate import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "cifar10_budget_curve.json"


def run(name: str, last_round: int, args: list[str], runs_dir: Path) -> float | None:
    """Run (or resume) one experiment; its wall seconds, or None when it had finished before."""
    if (runs_dir / name / f"round-{last_round}" / "metrics.json").is_file():
        return None
    start = time.time()
    subprocess.run([sys.executable, "stages/iterate.py", "--config", "configs/cifar10.yaml", f"round={last_round}",
                    *args, f"name={name}", f"runs_dir={runs_dir}", "progress=false"], cwd=ROOT, check=True)
    return round(time.time() - start, 1)


def images_trained(exp: Path, last_round: int) -> int:
    """Training images (labeled and pseudo-labeled, every epoch) of rounds 0..last_round."""
    cards = [json.loads((exp / f"round-{k}" / "card.json").read_text()) for k in range(last_round + 1)]
    return sum(t["bad_samples"]["used"] for c in cards for t in c["train"])


def twin_epochs(exp: Path, last_round: int) -> int:
    """Teacher epochs that train at least the images of the Noisy Student run ``exp``."""
    teacher = json.loads((exp / "round-0" / "card.json").read_text())["train"][0]
    per_epoch = teacher["bad_samples"]["used"] / teacher["epochs"]
    return math.ceil(images_trained(exp, last_round) / per_epoch)


def summary(exp: Path, last_round: int, command: str, wall_s: float | None) -> dict:
    """Each round's accuracy and cost, the images trained, and the wall time."""
    rounds = []
    for k in range(last_round + 1):
        d = exp / f"round-{k}"
        m, card = json.loads((d / "metrics.json").read_text()), json.loads((d / "card.json").read_text())
        rounds.append({"round": k, "val_top1": m["val_top1"], "test_top1": m["test_top1"],
                       "epochs": card["train"][0]["epochs"], "precision": card["train"][0]["precision"],
                       "seconds": m["seconds"]})
    data_name = Path(json.loads((exp / "round-0" / "card.json").read_text())["parents"]["data_dir"]).name
    data = json.loads((exp.parent / "data" / data_name / "manifest.json").read_text())  # where the run's tree is now
    plan = exp / "budget.json"
    return {"command": command, "test_top1": rounds[-1]["test_top1"], "images_trained": images_trained(exp, last_round),
            "wall_seconds": wall_s, "seconds": round(sum(r["seconds"] for r in rounds) + (data.get("seconds") or 0), 1),
            "rounds": rounds, "budget_plan": json.loads(plan.read_text()) if plan.is_file() else None}


def plot(points: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    minutes = [p["budget_s"] / 60 for p in points]
    ax.plot(minutes, [p["noisy_student"]["test_top1"] for p in points], "o-", label="Noisy Student (labels + pool)")
    ax.plot(minutes, [p["labels_only"]["test_top1"] for p in points], "s--", label="labels only, at least as many images")
    ax.set_xlabel("time budget (minutes, 2-core CPU)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_xticks(minutes)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["20m", "60m"])
    ap.add_argument("--round", type=int, default=2, help="the Noisy Student run's last round")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--wall", nargs="*", default=[], metavar="NAME=SECONDS",
                    help="wall seconds of a run made outside this script (kept in the file)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipeline.config import parse_duration

    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    old = {p["budget"]: p for p in json.loads(OUT.read_text())["points"]} if OUT.is_file() else {}
    given = {name: float(s) for name, s in (w.split("=", 1) for w in args.wall)}
    points = []
    for budget in args.budgets:
        ns, lo = f"cifar10-{budget}", f"cifar10-labels-only-{budget}"
        walls = {ns: run(ns, args.round, [f"budget={budget}"], args.runs_dir)}
        epochs = twin_epochs(args.runs_dir / ns, args.round)
        walls[lo] = run(lo, 0, [f"teacher.epochs={epochs}"], args.runs_dir)
        commands = {ns: f"make iterate CONFIG=configs/cifar10.yaml ROUND={args.round} BUDGET={budget} ARGS=name={ns}",
                    lo: f'make iterate CONFIG=configs/cifar10.yaml ROUND=0 ARGS="name={lo} teacher.epochs={epochs}"'}
        prev = old.get(budget, {})
        point = {"budget": budget, "budget_s": parse_duration(budget)}
        for key, name, k in (("noisy_student", ns, args.round), ("labels_only", lo, 0)):
            wall = walls[name] if walls[name] is not None else given.get(name, prev.get(key, {}).get("wall_seconds"))
            point[key] = summary(args.runs_dir / name, k, commands[name], wall)
        wall = point["noisy_student"]["wall_seconds"]
        point["noisy_student"]["under_budget_s"] = None if wall is None else round(point["budget_s"] - wall, 1)
        point["gain_top1"] = round(point["noisy_student"]["test_top1"] - point["labels_only"]["test_top1"], 2)
        earlier = prev if all(w is None for w in walls.values()) else {}  # a point made before keeps its record
        point["machine"] = earlier.get("machine") or machine()
        point["code_version"] = earlier.get("code_version") or code
        points.append(point)
    out = {"what": __doc__.split("\n\n")[0], "command": "python bench/cifar10_budget_curve.py --budgets "
           + " ".join(args.budgets), "points": points}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    plot(points, OUT.with_suffix(".png"))
    print(json.dumps([{k: p[k] for k in ("budget", "gain_top1")} for p in points]))


if __name__ == "__main__":
    main()
