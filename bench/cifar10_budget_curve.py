"""What more time buys on CIFAR-10: the config's recipe under each time budget against its
labels-only twin (round 0 alone, the same teacher recipe, the same budget, so it trains at least
as many images), both through ``make iterate``'s own entry point on this machine.

Runs what is missing (runs/cifar10-<budget>, runs/cifar10-labels-only-<budget>; a finished run is
only read), then writes bench/results/cifar10_budget_curve.json and its plot (.png beside it).

    python bench/cifar10_budget_curve.py --budgets 20m 60m
"""

from __future__ import annotations

import argparse
import json
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


def run(name: str, last_round: int, budget: str, runs_dir: Path) -> float | None:
    """Run (or resume) one budgeted experiment; its wall seconds, or None when it had finished before."""
    if (runs_dir / name / f"round-{last_round}" / "metrics.json").is_file():
        return None
    start = time.time()
    subprocess.run([sys.executable, "stages/iterate.py", "--config", "configs/cifar10.yaml", f"round={last_round}",
                    f"budget={budget}", f"name={name}", f"runs_dir={runs_dir}", "progress=false"], cwd=ROOT, check=True)
    return round(time.time() - start, 1)


def summary(exp: Path, last_round: int, budget: str, wall_s: float | None) -> dict:
    """Each round's accuracy and cost, the images trained, and the wall time against the budget."""
    rounds, images = [], 0
    for k in range(last_round + 1):
        d = exp / f"round-{k}"
        m, card = json.loads((d / "metrics.json").read_text()), json.loads((d / "card.json").read_text())
        images += sum(t["bad_samples"]["used"] for t in card["train"])
        rounds.append({"round": k, "val_top1": m["val_top1"], "test_top1": m["test_top1"],
                       "epochs": card["train"][0]["epochs"], "precision": card["train"][0]["precision"],
                       "seconds": m["seconds"]})
    data_dir = ROOT / json.loads((exp / "round-0" / "card.json").read_text())["parents"]["data_dir"]
    data = json.loads((data_dir / "manifest.json").read_text())
    command = f"make iterate CONFIG=configs/cifar10.yaml ROUND={last_round} BUDGET={budget} ARGS=name={exp.name}"
    return {"command": command, "test_top1": rounds[-1]["test_top1"], "images_trained": images,
            "wall_seconds": wall_s, "seconds": round(sum(r["seconds"] for r in rounds) + (data.get("seconds") or 0), 1),
            "rounds": rounds, "budget_plan": json.loads((exp / "budget.json").read_text())}


def plot(points: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    minutes = [p["budget_s"] / 60 for p in points]
    ax.plot(minutes, [p["noisy_student"]["test_top1"] for p in points], "o-", label="Noisy Student (labels + pool)")
    ax.plot(minutes, [p["labels_only"]["test_top1"] for p in points], "s--", label="labels only, same budget")
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
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipeline.config import parse_duration

    old = {p["budget"]: p for p in json.loads(OUT.read_text())["points"]} if OUT.is_file() else {}
    points = []
    for budget in args.budgets:
        ns, lo = f"cifar10-{budget}", f"cifar10-labels-only-{budget}"
        walls = {name: run(name, k, budget, args.runs_dir) for name, k in ((ns, args.round), (lo, 0))}
        prev = old.get(budget, {})
        point = {"budget": budget, "budget_s": parse_duration(budget)}
        for key, name, k in (("noisy_student", ns, args.round), ("labels_only", lo, 0)):
            wall = walls[name] if walls[name] is not None else prev.get(key, {}).get("wall_seconds")
            point[key] = summary(args.runs_dir / name, k, budget, wall)
            point[key]["under_budget_s"] = None if wall is None else round(point["budget_s"] - wall, 1)
        point["gain_top1"] = round(point["noisy_student"]["test_top1"] - point["labels_only"]["test_top1"], 2)
        points.append(point)
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    out = {"what": __doc__.split("\n\n")[0], "machine": machine(), "code_version": code.stdout.strip(),
           "command": "python bench/cifar10_budget_curve.py --budgets " + " ".join(args.budgets), "points": points}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    plot(points, OUT.with_suffix(".png"))
    print(json.dumps([{k: p[k] for k in ("budget", "gain_top1")} for p in points]))


if __name__ == "__main__":
    main()
