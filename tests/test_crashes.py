"""Fault injection, crashes: each stage is SIGKILLed at a named point (``NS_FAILPOINT``), then rerun.

The rerun must complete, redo no finished work beyond the last checkpoint, and give what an
uninterrupted run gives (shards byte for byte; pseudo labels: same keys and labels, probabilities
within 1e-5; training: the same weights and losses, so the data order after resume is the same).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, STAGE_ENV, run_script, stage, tiny_overrides
from safetensors.numpy import load_file

from pipeline.failpoints import POINTS


def killed(script: str, point: str, *args: str) -> subprocess.CompletedProcess:
    """Run a stage with a failpoint armed; assert it died by SIGKILL there."""
    assert point.split(":")[0] in POINTS
    r = run_script(script, *args, env={"NS_FAILPOINT": point})
    assert r.returncode == -9, f"{script} was not killed at {point} ({r.returncode}):\n{r.stderr[-3000:]}"
    return r


def _no_tmp_looks_finished(directory: Path) -> None:
    """Leftovers of the killed write exist only under temporary names."""
    for p in directory.rglob("*"):
        if p.is_file() and p.name.startswith(".tmp-"):
            continue
        if p.suffix == ".tar":  # a finished-looking shard must be a complete one
            from pipeline.data.shards import iter_samples

            assert sum(1 for _ in iter_samples(p)) > 0


# ---------------------------------------------------------------- prepare


def test_prepare_killed_mid_shard_resumes_to_identical_shards(tiny_data, tmp_path):
    ov = tiny_overrides(tiny_data, tmp_path / "a")
    killed("prepare_data.py", "shard_write:120", *ov)  # 50 samples a shard: dies inside the third
    (data,) = (tmp_path / "a" / "data").iterdir()
    assert not (data / "manifest.json").exists()
    assert len(list(data.glob("*.tar"))) == 2 and list(data.glob(".tmp-*"))
    _no_tmp_looks_finished(data)
    before = {p.name: p.stat().st_mtime_ns for p in data.glob("*.tar")}
    stage("prepare_data.py", *ov)
    assert {p.name: p.stat().st_mtime_ns for p in data.glob("*.tar") if p.name in before} == before
    assert not list(data.glob(".tmp-*"))
    stage("prepare_data.py", *tiny_overrides(tiny_data, tmp_path / "b"))
    (ref,) = (tmp_path / "b" / "data").iterdir()
    got, want = json.loads((data / "manifest.json").read_text()), json.loads((ref / "manifest.json").read_text())
    assert got["splits"] == want["splits"]  # every shard's sha256 and count
    assert got["origins"] == want["origins"] and got["unlabeled_truth"] == want["unlabeled_truth"]


# ---------------------------------------------------------------- train


# fp32: oneDNN's bf16 backward on CPU is not bitwise reproducible (tiny gradient noise that AdamW
# turns into lr-sized steps), fp32 is
TEACHER = ["teacher.mixed_precision=no", "student.mixed_precision=no", "distill.mixed_precision=no",
           "teacher.epochs=4", "teacher.ema=true", "teacher.ema_decay=0.9", "teacher.crop_pad=2",
           "teacher.hflip=true", "teacher.randaugment.enabled=true", "teacher.drop_rate=0.2"]


@pytest.fixture(scope="module")
def teacher_ref(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("crash") / "runs"
    ov = tiny_overrides(tiny_data, runs, name="ref") + TEACHER
    stage("prepare_data.py", *ov)
    stage("train.py", "role=teacher", *ov)
    return runs, runs / "ref" / "round-0"


def _same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-6, err_msg=k)
    ha = [e["loss"] for e in json.loads((a / "card.json").read_text())["train"][0]["history"]]
    hb = [e["loss"] for e in json.loads((b / "card.json").read_text())["train"][0]["history"]]
    assert ha == hb


# 40 labeled images, batch 16: 2 steps an epoch, 4 epochs
@pytest.mark.parametrize("point,resumed_from", [
    ("train_step:3", "train-e0000"),       # mid-epoch: the epoch is redone from the last checkpoint
    ("epoch_end:2", "train-e0001"),        # between epochs
    ("checkpoint_write:3", "train-e0001"),  # inside the third checkpoint: the second is the last whole one
])
def test_training_killed_resumes_to_the_uninterrupted_result(teacher_ref, tiny_data, point, resumed_from):
    runs, ref = teacher_ref
    name = "k" + point.split(":")[0].replace("_", "")
    ov = tiny_overrides(tiny_data, runs, name=name) + TEACHER
    killed("train.py", point, "role=teacher", *ov)
    out = runs / name / "round-0"
    assert not (out / "card.json").exists()
    states = sorted(p.name for p in (out / "state").iterdir())
    assert states[-1] == resumed_from or states[-1].startswith(".tmp-")
    assert not list((out / "state").rglob("custom_checkpoint*"))  # nothing a resume would unpickle
    r = stage("train.py", "role=teacher", *ov)
    assert f"resuming train from {resumed_from}" in r.stdout + r.stderr
    assert not (out / "state").exists()
    _same_model(out, ref)


def test_student_killed_mid_epoch_resumes_to_the_same_model(teacher_ref, tiny_data):
    """Noised student (RandAugment, dropout, stochastic depth, pseudo-labeled stream) resumes exactly."""
    import shutil

    runs, ref = teacher_ref
    for name in ("sref", "skill"):
        shutil.copytree(ref, runs / name / "round-0")
    ov = lambda name: tiny_overrides(tiny_data, runs, name=name) + TEACHER + [  # noqa: E731
        "student.epochs=3", "student.threshold=0", "student.balance=false"]  # 200 pseudo-labeled samples
    stage("pseudo_label.py", "round=1", *ov("sref"))
    stage("train.py", "role=student", "round=1", *ov("sref"))
    stage("pseudo_label.py", "round=1", *ov("skill"))
    killed("train.py", "train_step:20", "role=student", "round=1", *ov("skill"))  # 12 steps an epoch
    r = stage("train.py", "role=student", "round=1", *ov("skill"))
    assert "resuming train from train-e0000" in r.stdout + r.stderr
    _same_model(runs / "skill" / "round-1", runs / "sref" / "round-1")


def test_same_seed_and_config_give_the_same_first_epoch_losses(teacher_ref, tiny_data):
    """With the tests' fp32 (bf16 on CPU is not bitwise reproducible: docs/reliability.md)."""
    runs, _ = teacher_ref
    hist = []
    for name in ("det1", "det2"):
        ov = tiny_overrides(tiny_data, runs, name=name) + ["teacher.epochs=2"]
        stage("train.py", "role=teacher", *ov)
        hist.append(json.loads((runs / name / "round-0" / "card.json").read_text())["train"][0]["history"])
    assert hist[0][0]["loss"] == hist[1][0]["loss"]


# ---------------------------------------------------------------- pseudo_label


def _labels(pl_dir: Path):
    import pyarrow as pa

    t = pa.concat_tables([pq.read_table(f) for f in sorted(pl_dir.glob("unlabeled-*.parquet"))])
    return t.column("key").to_pylist(), t.column("label").to_pylist(), np.asarray(t.column("probs").to_pylist())


@pytest.mark.parametrize("point", ["pseudo_label_batch:3", "parquet_write:2"])
def test_pseudo_label_killed_resumes_per_shard(teacher_ref, tiny_data, point):
    import shutil

    runs, ref = teacher_ref
    name = "pl" + point.split(":")[0].replace("_", "")
    ov = tiny_overrides(tiny_data, runs, name=name) + TEACHER
    shutil.copytree(ref, runs / name / "round-0")
    killed("pseudo_label.py", point, "round=1", *ov)
    pl = runs / name / "pseudo_labels" / "round=1"
    finished = {p.name: p.stat().st_mtime_ns for p in pl.glob("unlabeled-*.parquet")}
    assert len(finished) == 1 and not (pl / "_manifest.json").exists()  # batch 32, 50 rows a shard
    stage("pseudo_label.py", "round=1", *ov)
    assert {name: (pl / name).stat().st_mtime_ns for name in finished} == finished  # not redone
    assert not list(pl.glob(".tmp-*"))
    refdir = runs / "ref" / "pseudo_labels" / "round=1"
    if not (refdir / "_manifest.json").exists():
        stage("pseudo_label.py", "round=1", *tiny_overrides(tiny_data, runs, name="ref") + TEACHER)
    (k1, l1, p1), (k2, l2, p2) = _labels(pl), _labels(refdir)
    assert k1 == k2 and l1 == l2
    np.testing.assert_allclose(p1, p2, atol=1e-5)


# ---------------------------------------------------------------- evaluate, predict


def test_evaluate_killed_before_writing_a_result_reruns_cleanly(teacher_ref, tiny_data, tmp_path):
    runs, ref = teacher_ref
    ov = tiny_overrides(tiny_data, runs, name="ref") + TEACHER
    args = [f"models={ref}", f"out={tmp_path / 'ev'}", "evaluate.robustness=false", *ov]
    shutil.rmtree(ref / "eval", ignore_errors=True)  # the clean pass training cached: evaluate makes it anew
    killed("evaluate.py", "eval_result:1", *args)
    assert not list((ref / "eval").glob("*.json"))  # nothing half-written looks like a result
    stage("evaluate.py", *args)
    results = [json.loads(p.read_text()) for p in (ref / "eval").glob("*.json")]
    assert results and all(r["samples"] == 80 for r in results if r["kind"] == "clean")


def test_predict_killed_leaves_no_output_and_reruns_to_the_same_rows(teacher_ref, tiny_data, tmp_path):
    runs, ref = teacher_ref
    args = [f"model={ref}", f"input={tiny_data['test']}", "batch_size=16"]
    killed("predict.py", "predict_batch:2", *args, f"out={tmp_path / 'p.csv'}")
    assert not (tmp_path / "p.csv").exists()  # only a temporary file, never a short finished one
    stage("predict.py", *args, f"out={tmp_path / 'p.csv'}")
    stage("predict.py", *args, f"out={tmp_path / 'q.csv'}")
    assert (tmp_path / "p.csv").read_text() == (tmp_path / "q.csv").read_text()
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 81


# ---------------------------------------------------------------- distill


def test_distill_killed_mid_epoch_resumes(teacher_ref, tiny_data):
    runs, ref = teacher_ref
    ov = tiny_overrides(tiny_data, runs, name="ref") + TEACHER + [
        f"distill.teacher={ref}", "distill.arch=resnet10t", "distill.epochs=2", "distill.batch_size=32",
        "distill.workers=0", "distill.labels_only=false", "distill.name=kd", "distill.warmup_epochs=0"]
    killed("distill.py", "train_step:9", *ov)  # 240 images, batch 32: 7 steps an epoch
    r = stage("distill.py", *ov)
    assert "resuming distill from distill-e0000" in r.stdout + r.stderr
    card = json.loads((runs / "ref" / "distilled" / "kd" / "card.json").read_text())
    assert len(card["train"][0]["history"]) == 2


# ---------------------------------------------------------------- 2 ranks, one dies


def test_two_ranks_one_killed_fails_fast_and_the_rerun_resumes(teacher_ref, tiny_data):
    runs, _ = teacher_ref
    ov = tiny_overrides(tiny_data, runs, name="ddp") + TEACHER + ["teacher.batch_size=8"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "stages" / "train.py"), "role=teacher", *ov]
    env = {**STAGE_ENV, "ACCELERATE_USE_CPU": "1", "NS_DIST_TIMEOUT": "60"}
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**env, "NS_FAILPOINT": "train_step:3@1"})  # rank 1 dies in epoch 2
    assert r.returncode != 0 and time.time() - t0 < 240
    assert "train.py" in r.stderr and ("exitcode" in r.stderr or "Signal 9" in r.stderr or "SIGKILL" in r.stderr)
    state = runs / "ddp" / "round-0" / "state"
    assert (state / "train-e0000").is_dir()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming train from train-e0000" in r.stdout + r.stderr
    assert (runs / "ddp" / "round-0" / "card.json").is_file()


def test_failpoints_are_inert_without_the_variable(monkeypatch):
    from pipeline import failpoints

    monkeypatch.delenv("NS_FAILPOINT", raising=False)
    monkeypatch.setattr(failpoints, "_counts", {})
    for name in POINTS:
        failpoints.hit(name)  # would SIGKILL the test process if armed
    assert failpoints._counts == {}  # nothing armed, nothing counted
    monkeypatch.setenv("NS_FAILPOINT", "train_step:2@5")
    monkeypatch.setenv("RANK", "0")
    failpoints.hit("train_step")
    failpoints.hit("train_step")  # another rank's point: still alive, and not counted here
    assert failpoints._counts == {}
    monkeypatch.setenv("RANK", "5")
    assert [failpoints.due("train_step") for _ in range(3)] == [False, True, False]  # its rank: the 2nd hit
