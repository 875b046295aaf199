"""Memory against pool size: peak RSS of the pseudo_label stage and of one student epoch with an
unlabeled pool of 10k and of 1M synthetic 16x16 images (timm's 0.37M-parameter ``test_resnet``,
so a million images fit the time).

    python bench/memory.py [--small 10000] [--large 1000000] [--per-class 1000]

The student epoch streams the whole pool (every shard read, every sample looked up in the
selection) and trains on ``--per-class`` pseudo-labeled images per class (``student.per_class``),
so the 1M run's epoch takes about as long as the 10k one's. ``prepare`` builds the pool from
existing shards (read by offset); its growth is reported beside the goal's two stages.

Each stage runs as its own process through its real entry point (``stages/*.py``) on a real
prepared experiment; its peak RSS comes from the kernel (``wait4``: the largest of the process and
its DataLoader workers). Writes bench/results/memory.json: ``rss_growth`` (the larger of the two
stages' large/small peak ratios; goal <= 1.2), each stage's peaks and seconds per pool size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import labeled_and_test, pool_shards, run_stage, save

SIZE = 16
SHARD = 10000


def experiment(tmp: Path, n: int, labeled: Path, test: Path, per_class: int) -> dict:
    pattern = pool_shards(tmp / f"pool-{n}", n, SIZE, SHARD)
    cfg = tmp / f"mem-{n}.yaml"
    cfg.write_text(f"""name: mem-{n}
runs_dir: {tmp / 'runs'}
data: {{source: {labeled}, test_source: {test}, unlabeled: "{pattern}", labeled_per_class: null,
        shard_size: {SHARD}}}
model: {{arch: test_resnet, students: [test_resnet]}}
teacher: {{epochs: 3, batch_size: 64, workers: 0}}
student: {{epochs: 1, batch_size: 32, unlabeled_ratio: 7, workers: 0, init_from_teacher: true, threshold: 0.0,
          balance: true, per_class: {per_class}}}
pseudo_label: {{batch_size: 512, workers: 1}}
""")
    log = tmp / f"mem-{n}.log"
    out = {"pool": n}
    out["prepare"] = run_stage(["stages/prepare_data.py", "--config", str(cfg)], log)
    out["teacher"] = run_stage(["stages/train.py", "--config", str(cfg), "role=teacher"], log)
    out["pseudo_label"] = run_stage(["stages/pseudo_label.py", "--config", str(cfg), "round=1"], log)
    out["student_epoch"] = run_stage(["stages/train.py", "--config", str(cfg), "role=student", "round=1"], log)
    print(f"pool {n}: " + ", ".join(f"{k} {v['peak_rss_mib']} MiB / {v['seconds']} s"
                                    for k, v in out.items() if isinstance(v, dict)), flush=True)
    shutil.rmtree(tmp / f"pool-{n}")
    shutil.rmtree(tmp / "runs", ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--per-class", type=int, default=1000, help="pseudo-labeled images per class the epoch trains on")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ns-bench-mem-"))
    try:
        labeled, test = labeled_and_test(tmp, 20, 10, SIZE)
        small = experiment(tmp, args.small, labeled, test, args.per_class)
        large = experiment(tmp, args.large, labeled, test, args.per_class)
        growth = {k: round(large[k]["peak_rss_mib"] / small[k]["peak_rss_mib"], 3)
                  for k in ("prepare", "pseudo_label", "student_epoch")}
        print(f"rss growth {growth}")
        save("memory", {"rss_growth": max(growth["pseudo_label"], growth["student_epoch"]), "growth": growth,
                        "small": small, "large": large, "image_size": SIZE, "arch": "test_resnet",
                        "student_per_class": args.per_class})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
