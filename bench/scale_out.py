"""Scale-out: pseudo_label and one student epoch with 1 process and with 2 processes through
``accelerate launch`` on CPU, on one prepared experiment (synthetic 28x28 images, resnet10t).

    python bench/scale_out.py [--pool 20000]

The 2-process run labels the same shards split by rank; the benchmark checks that both runs give
the same keys and hard labels (probabilities within 1e-5) and records each stage's img/s. On a
2-core machine two processes share the cores the one process already used (one thread each,
against two threads in one process), so the figures show what the split costs, not how far it
scales. Writes
bench/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import labeled_and_test, pool_shards, run_stage, save

SIZE = 28
LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def labels_of(pl_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, hard labels and probabilities of a pseudo-label directory, sorted by key."""
    t = pq.read_table(sorted(pl_dir.glob("*.parquet"))).sort_by("key")
    return (t.column("key").to_pylist(), t.column("label").to_numpy(),
            np.asarray(t.column("probs").to_pylist(), np.float32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=20000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ns-bench-scale-"))
    try:
        labeled, test = labeled_and_test(tmp, 50, 20, SIZE)
        pattern = pool_shards(tmp / "pool", args.pool, SIZE, 2500)
        cfg = tmp / "scale.yaml"
        runs = tmp / "runs"
        cfg.write_text(f"""runs_dir: {runs}
data: {{source: {labeled}, test_source: {test}, unlabeled: "{pattern}", labeled_per_class: null,
        shard_size: 2500}}
model: {{arch: resnet10t, students: [resnet10t]}}
teacher: {{epochs: 2, batch_size: 64, workers: 0}}
student: {{epochs: 1, batch_size: 32, unlabeled_ratio: 7, workers: 0, init_from_teacher: true}}
pseudo_label: {{batch_size: 512, workers: 1}}
""")
        log = tmp / "scale.log"
        base = ["--config", str(cfg)]
        run_stage(["stages/prepare_data.py", *base, "name=p1"], log)
        run_stage(["stages/train.py", *base, "name=p1", "role=teacher"], log)
        shutil.copytree(runs / "p1" / "round-0", runs / "p2" / "round-0")
        env = {"ACCELERATE_USE_CPU": "1"}
        result: dict = {"pool": args.pool, "image_size": SIZE, "arch": "resnet10t"}
        for procs, name in ((1, "p1"), (2, "p2")):
            pre = [] if procs == 1 else [sys.executable, *LAUNCH]
            for stage, extra in (("pseudo_label", ["stages/pseudo_label.py"]),
                                 ("student_epoch", ["stages/train.py", "role=student"])):
                argv = [*pre, *extra, *base, f"name={name}", "round=1"]
                wall = run_stage(argv, log, env if procs > 1 else None)
                rd = runs / name / "round-1"
                if stage == "pseudo_label":
                    img_s = json.loads((runs / name / "pseudo_labels" / "round=1" / "_manifest.json").read_text()
                                       )["stats"]["img_s"]
                else:
                    img_s = json.loads((rd / "card.json").read_text())["train"][0]["img_s"]
                result.setdefault(stage, {})[f"{procs}_proc"] = {"img_s": img_s, "wall_seconds": wall["seconds"]}
                print(f"{stage} with {procs} process(es): {img_s} img/s, {wall['seconds']} s wall", flush=True)
        k1, y1, p1 = labels_of(runs / "p1" / "pseudo_labels" / "round=1")
        k2, y2, p2 = labels_of(runs / "p2" / "pseudo_labels" / "round=1")
        same_keys = k1 == k2
        result["labels"] = {"samples": len(k1), "same_keys": same_keys,
                            "same_hard_labels": bool(same_keys and np.array_equal(y1, y2)),
                            "max_prob_diff": float(np.abs(p1 - p2).max()) if same_keys else None}
        for stage in ("pseudo_label", "student_epoch"):
            r = result[stage]
            r["speedup"] = round(r["2_proc"]["img_s"] / r["1_proc"]["img_s"], 3)
        result["note"] = ("2 processes on 2 cores: accelerate launch gives each rank 1 thread (OMP_NUM_THREADS=1), "
                          "the single process runs 2; the cores are the same, so this shows the split costs "
                          "nothing, not how far it scales: that needs more devices")
        print(json.dumps(result["labels"]))
        save("scale_out", result)
        if not result["labels"]["same_hard_labels"]:
            raise SystemExit("1 and 2 processes gave different pseudo labels")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
