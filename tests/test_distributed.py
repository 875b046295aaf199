"""pseudo_label under `accelerate launch` with 2 CPU processes equals a 1-process run."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "1"}


def _run(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _table(exp):
    files = sorted((exp / "pseudo_labels" / "round=1").glob("unlabeled-*.parquet"))
    tables = [pq.read_table(f) for f in files]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    probs = np.concatenate([np.asarray(t.column("probs").to_pylist()) for t in tables])
    return [f.name for f in files], keys, labels, probs


@pytest.mark.skipif(shutil.which("accelerate") is None and not (ROOT / ".venv" / "bin" / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_processes_label_like_one(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    one = tiny_overrides(tiny_data, runs, name="one") + ["teacher.epochs=3"]
    two = tiny_overrides(tiny_data, runs, name="two") + ["teacher.epochs=3"]
    _run([sys.executable, str(ROOT / "stages" / "iterate.py"), "round=0", *one])
    shutil.copytree(runs / "one" / "round-0", runs / "two" / "round-0")
    _run([sys.executable, str(ROOT / "stages" / "pseudo_label.py"), "round=1", *one])
    r = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(ROOT / "stages" / "pseudo_label.py"), "round=1", *two])
    assert "pseudo-labeled 200 samples (200 now on 2 process(es)" in r.stdout + r.stderr
    f1, k1, l1, p1 = _table(runs / "one")
    f2, k2, l2, p2 = _table(runs / "two")
    assert f1 == f2 and len(f1) == 4
    assert k1 == k2 and len(set(k1)) == 200
    assert (l1 == l2).all()
    assert np.abs(p1 - p2).max() <= 1e-5


def test_two_process_training_round(tiny_data, tmp_path):
    """teacher and student train under `accelerate launch` with 2 CPU processes (DDP, split shards);
    a non-finite gradient on rank 1 alone makes both ranks skip that step (one verdict for all)."""
    ov = tiny_overrides(tiny_data, tmp_path / "runs", name="ddp") + ["teacher.epochs=2", "student.epochs=1",
                                                                 "student.threshold=0"]
    r = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(ROOT / "stages" / "iterate.py"), "round=1", *ov], env={"NS_FAILPOINT": "nonfinite_grad:2@1"})
    assert "| 1 | resnet10t |" in r.stdout
    import json

    card = json.loads((tmp_path / "runs" / "ddp" / "round-1" / "card.json").read_text())
    assert card["metrics"]["test_samples"] == 80  # every test image counted once across the 2 ranks
    teacher = json.loads((tmp_path / "runs" / "ddp" / "round-0" / "card.json").read_text())["train"][0]
    assert teacher["nonfinite_steps"] == 1 and teacher["precision_steps"] == {"fp32": teacher["steps"]}  # rank 0's count
    assert (r.stdout + r.stderr).count("non-finite step in fp32") == 1  # logged by the main process only


def test_two_process_evaluation_equals_one(tiny_data, tmp_path):
    """evaluate under `accelerate launch` with 2 processes gives the 1-process results (gathered, no padding)."""
    import json

    runs = tmp_path / "runs"
    ov = tiny_overrides(tiny_data, runs, name="ev") + ["teacher.epochs=2"]
    _run([sys.executable, str(ROOT / "stages" / "iterate.py"), "round=0", *ov])
    for d in ("a", "b"):
        shutil.copytree(runs / "ev" / "round-0", tmp_path / d)
    ev = ["evaluate.subset=null", "evaluate.chunk=16", "evaluate.frames=3"]
    _run([sys.executable, str(ROOT / "stages" / "evaluate.py"), *ov, *ev, f"models={tmp_path / 'a'}"])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          str(ROOT / "stages" / "evaluate.py"), *ov, *ev, f"models={tmp_path / 'b'}"])

    def result(d, kind):
        return json.loads(next((tmp_path / d / "eval").glob(f"{kind}-*.json")).read_text())

    a, b = result("a", "clean"), result("b", "clean")
    assert a["samples"] == b["samples"] == 80
    assert a["confusion"] == b["confusion"] and a["top1"] == b["top1"]
    assert abs(a["nll"] - b["nll"]) < 1e-5 and abs(a["ece"] - b["ece"]) < 1e-5
    a, b = result("a", "corruptions"), result("b", "corruptions")
    assert a["samples"] == b["samples"] == 80 and a["errors"] == b["errors"]
    assert result("a", "perturbations")["flip_rate"] == result("b", "perturbations")["flip_rate"]
