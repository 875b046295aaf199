"""Accuracy spread: the default experiment (`make iterate ROUND=2`) for several seeds of the
labeled split, so a gain can be told from noise.

    python bench/accuracy_seeds.py [--seeds 0 1 2] [--round 2]

Seed s runs as experiment ``fashion_mnist`` (s = 0, the default run, reused when finished) or
``fashion_mnist_seed<s>`` with ``data.seed=s seed=s`` (another labeled split, another training
order). Finished rounds are reused, so an interrupted benchmark resumes. Writes
bench/results/accuracy_seeds.json: per round, each seed's test top-1 and its mean and sample std.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import ROOT, run_stage, save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--round", type=int, default=2)
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    args = ap.parse_args()
    stem = ROOT.joinpath(args.config).stem
    per_seed = {}
    for s in args.seeds:
        name = stem if s == 0 else f"{stem}_seed{s}"
        t0 = time.time()
        run_stage(["stages/iterate.py", "--config", args.config, f"round={args.round}", f"name={name}",
                   f"data.seed={s}", f"seed={s}"], ROOT / "runs" / f"accuracy_seeds-{name}.log")
        rounds = []
        for k in range(args.round + 1):
            card = json.loads((ROOT / "runs" / name / f"round-{k}" / "card.json").read_text())
            m = card["metrics"]
            rounds.append({"round": k, "model": m["model"], "test_top1": round(m["test_top1"], 2),
                           "pseudo_label_acc": None if m.get("pseudo_label_acc") is None
                           else round(m["pseudo_label_acc"], 2), "seconds": m.get("seconds")})
        per_seed[s] = {"experiment": name, "rounds": rounds, "wall_seconds_this_run": round(time.time() - t0, 1)}
        print(f"seed {s}: " + ", ".join(f"round {r['round']} {r['test_top1']}" for r in rounds), flush=True)
    summary = []
    for k in range(args.round + 1):
        tops = [per_seed[s]["rounds"][k]["test_top1"] for s in args.seeds]
        summary.append({"round": k, "test_top1": tops, "mean": round(statistics.mean(tops), 2),
                        "std": round(statistics.stdev(tops), 2) if len(tops) > 1 else None})
    gains = [per_seed[s]["rounds"][-1]["test_top1"] - per_seed[s]["rounds"][0]["test_top1"] for s in args.seeds]
    result = {"rounds": summary, "gain_last_round": {"per_seed": [round(g, 2) for g in gains],
                                                      "mean": round(statistics.mean(gains), 2),
                                                      "std": round(statistics.stdev(gains), 2) if len(gains) > 1 else None},
              "seeds": per_seed, "config": args.config}
    for r in summary:
        print(f"round {r['round']}: {r['mean']} +- {r['std']}")
    save("accuracy_seeds", result)


if __name__ == "__main__":
    main()
