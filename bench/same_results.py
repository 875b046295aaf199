"""Same results before and after a refactor: a tiny seeded teacher -> pseudo-label -> student run
through the stage scripts (one process, one thread, no workers: deterministic on one machine), and
the sha256 of every file it makes that holds a result (weights, Parquet pseudo labels).

    python bench/same_results.py --save before.json     # with the code as it was
    python bench/same_results.py --check before.json    # after the change: exit 1 on any difference

A one-off check for changes that must not move a number (issue 15), not a test: the hashes hold on
one machine and one set of library versions only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, labeled_and_test

RESULT_FILES = ("round-*/model.safetensors", "pseudo_labels/round=*/*.parquet")


def run(tmp: Path) -> dict[str, str]:
    train, test = labeled_and_test(tmp / "data", per_class=30, test_per_class=6, size=16)
    ov = [f"runs_dir={tmp / 'runs'}", "name=same", f"data.source={train}", f"data.test_source={test}",
          "data.labeled_per_class=8", "data.shard_size=60", "model.arch=resnet10t", "model.students=[resnet10t]",
          "teacher.epochs=6", "teacher.batch_size=16", "teacher.workers=0", "student.epochs=2",
          "student.batch_size=8", "student.unlabeled_ratio=2", "student.workers=0", "student.randaugment.n=1",
          "student.init_from_teacher=false", "pseudo_label.batch_size=32", "pseudo_label.workers=0",
          "evaluate.workers=0", "teacher.mixed_precision=no", "student.mixed_precision=no",
          "pseudo_label.mixed_precision=no"]  # fp32: bf16 on CPU is not bitwise reproducible (docs/reliability.md)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for script, *args in (("prepare_data.py",), ("train.py", "role=teacher"), ("pseudo_label.py", "round=1"),
                          ("train.py", "role=student", "round=1")):
        r = subprocess.run([sys.executable, str(ROOT / "stages" / script), *args, *ov], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    exp = tmp / "runs" / "same"
    files = sorted(p for pattern in RESULT_FILES for p in exp.glob(pattern))
    return {str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = ap.add_mutually_exclusive_group(required=True)
    side.add_argument("--save", help="write the hashes here")
    side.add_argument("--check", help="compare with hashes saved by --save")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ns-same-") as tmp:
        hashes = run(Path(tmp))
    print(json.dumps(hashes, indent=2))
    if args.save:
        Path(args.save).write_text(json.dumps(hashes, indent=2) + "\n")
        return
    before = json.loads(Path(args.check).read_text())
    differ = sorted(k for k in set(before) | set(hashes) if before.get(k) != hashes.get(k))
    print("identical" if not differ else f"DIFFERENT: {', '.join(differ)}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
