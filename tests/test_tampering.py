"""Reliability, second pass: nothing adopted unchecked, one line for every user-caused failure.

Each fault is injected through the stage entry points (a subprocess, as a user runs them)."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import stage, tiny_overrides

from pipeline.artifacts import sha256_file
from pipeline.config import ConfigError, load_config
from pipeline.modeling import models
from pipeline.pseudo import pseudo_labels as pl


def _last(r) -> str:
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def _with_probs(table: pa.Table, probs: np.ndarray) -> pa.Table:
    col = pa.FixedSizeListArray.from_arrays(pa.array(probs.astype(np.float32).ravel()), probs.shape[1])
    return table.set_column(table.schema.get_field_index("probs"), "probs", col)


def test_edited_pseudo_labels_are_labeled_again_or_refused_never_adopted(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    ov = [*tiny_overrides(tiny_data, runs, name="t"), "teacher.epochs=1", "student.epochs=1"]
    stage("prepare_data.py", *ov)
    stage("train.py", "role=teacher", *ov)
    stage("pseudo_label.py", "round=1", *ov)
    d = runs / "t" / "pseudo_labels" / "round=1"
    f, other = d / "unlabeled-000000.parquet", d / "unlabeled-000001.parquet"
    t = pq.read_table(f)
    nan = _with_probs(t, np.full((t.num_rows, 4), np.nan))
    pq.write_table(nan, f)  # NaN probabilities, same schema and metadata
    r = stage("train.py", "role=student", "round=1", *ov, check=False)
    assert r.returncode == 2 and str(f) in _last(r) and "does not match its manifest" in _last(r), r.stderr[-2000:]
    before = other.stat().st_mtime_ns
    r = stage("pseudo_label.py", "round=1", *ov)  # labels exactly that shard again, with a warning naming it
    assert f"{f} does not match its manifest" in r.stderr and other.stat().st_mtime_ns == before
    assert pl.content_problem(f, 4) is None and pq.read_table(f).column("key") == t.column("key")
    # the same edit with a manifest edited to match: the content check names file and row
    pq.write_table(nan, f)
    m = json.loads((d / pl.MANIFEST).read_text())
    for e in m["files"]:
        if e["file"] == f.name:
            e["sha256"] = sha256_file(f)
    (d / pl.MANIFEST).write_text(json.dumps(m))
    r = stage("train.py", "role=student", "round=1", *ov, check=False)
    assert r.returncode == 2 and _last(r).endswith(f"{f}: row 0: probabilities are not finite; rerun "
                                                   "stages/pseudo_label.py"), r.stderr[-2000:]


def test_pseudo_label_content_is_checked_column_by_column(tmp_path):
    keys = [f"k{i}" for i in range(5)]
    probs = np.random.default_rng(0).dirichlet(np.ones(4), 5).astype(np.float32)
    f = tmp_path / "u-000000.parquet"
    pl.write_parquet(f, "u-000000.tar", keys, probs, "t" * 64, ["a", "b", "c", "d"])
    assert pl.content_problem(f, 4) is None
    t = pq.read_table(f)
    one_class = t.set_column(t.schema.get_field_index("label"), "label", pa.array(np.zeros(5, np.int32)))
    first = int(np.flatnonzero(probs.argmax(1) != 0)[0])  # relabelled to one class: the first row it changed
    cases = {
        f"row {first}: label is not the most probable class": one_class,
        "row 0: probabilities do not sum to 1": _with_probs(t, probs * 0.5),
        "row 0: confidence is not the largest probability": t.set_column(
            t.schema.get_field_index("confidence"), "confidence", pa.array(np.full(5, 0.01, np.float32))),
        "schema is": t.rename_columns(["key", "shard", "label", "confidence", "p", "teacher_sha256"]),
    }
    for reason, table in cases.items():
        pq.write_table(table, f)
        assert reason in (pl.content_problem(f, 4) or ""), reason
    pl.write_parquet(f, "u-000000.tar", keys, probs[:, :3] / probs[:, :3].sum(1, keepdims=True), "t" * 64, list("abc"))
    assert "expected 4 classes" in pl.content_problem(f, 4)


@pytest.mark.parametrize("override,fragment", [
    ("teacher.lr=nan", "teacher.lr: must be a finite number, got nan"),
    ("student.threshold=.inf", "student.threshold: must be a finite number, got inf"),
    ("distill.temperature=-.inf", "distill.temperature: must be a finite number"),
    ("distill.name=/tmp/elsewhere", "distill.name: '/tmp/elsewhere' must be a plain directory name"),
    ("distill.name=../up", "distill.name: '../up' must be a plain directory name"),
])
def test_floats_are_finite_and_output_names_stay_inside_runs(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "model"
    models.save_model_dir(models.create_model("resnet10t", 4, 1).eval(), d, list("abcd"), [0.5], [0.25], 16, 1)
    return d


def _damage(d, kind: str, target) -> None:
    w, c = d / models.WEIGHTS, d / models.TIMM_CONFIG
    if kind == "truncated weights":
        w.write_bytes(w.read_bytes()[:1000])
    elif kind == "garbage weights":
        w.write_bytes(b"\x00garbage" * 100)
    elif kind == "a pickle named model.safetensors":
        w.write_bytes(pickle.dumps(_Boom(target)))
    elif kind == "unknown architecture":
        c.write_text(json.dumps({**json.loads(c.read_text()), "architecture": "resnet_nonexistent"}))
    elif kind == "invalid json":
        c.write_text("{ not json")


class _Boom:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("kind,names", [("truncated weights", "model.safetensors"),
                                        ("garbage weights", "model.safetensors"),
                                        ("unknown architecture", "config.json")])
def test_every_loader_names_the_damaged_file(model_dir, tmp_path, kind, names):
    """The loader every stage uses (the two stage runs below go through predict, export and evaluate)."""
    _damage(model_dir, kind, tmp_path / "unpickled")
    with pytest.raises(ConfigError) as e:
        models.load_model_dir(model_dir)
    assert str(e.value).startswith(str(model_dir / names))


@pytest.mark.parametrize("kind,script,args,names", [
    ("a pickle named model.safetensors", "predict.py", ["input={images}", "out={out}"], "model.safetensors"),
    ("invalid json", "export.py", [], "config.json"),
    ("unknown architecture", "evaluate.py", ["test={images}"], "config.json"),
])
def test_a_damaged_model_directory_is_one_line_naming_the_file(model_dir, tmp_path, tiny_data, kind, script, args,
                                                               names):
    target = tmp_path / "unpickled"
    _damage(model_dir, kind, target)
    filled = [a.format(images=tiny_data["test"], out=tmp_path / "p.csv") for a in args]
    r = stage(script, f"model={model_dir}" if script != "evaluate.py" else f"models={model_dir}", *filled,
              f"runs_dir={tmp_path / 'runs'}", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(model_dir / names) in _last(r), _last(r)
    assert not target.exists()  # no pickle ever runs


def test_a_result_is_keyed_by_the_weights_in_the_file_not_by_the_card(model_dir):
    from pipeline.evaluate import evaluation

    (model_dir / models.CARD).write_text(json.dumps({"files": {models.WEIGHTS: "0" * 64}}))
    first = evaluation.load(model_dir).sha256
    assert first == sha256_file(model_dir / models.WEIGHTS)
    torch.manual_seed(1)
    shutil.copy(model_dir / models.TIMM_CONFIG, model_dir / "keep.json")
    models.save_model_dir(models.create_model("resnet10t", 4, 1).eval(), model_dir, list("abcd"), [0.5], [0.25], 16, 1)
    assert evaluation.load(model_dir).sha256 not in (first, "0" * 64)


def test_a_full_disk_or_a_read_only_folder_is_one_line_naming_the_path_and_a_rerun_resumes(tiny_data, tmp_path):
    """Injected at the writes themselves (CI runs as root, so file modes would not stop it)."""
    runs = tmp_path / "runs"
    ov = [*tiny_overrides(tiny_data, runs, name="env"), "teacher.epochs=1"]
    r = stage("prepare_data.py", *ov, env={"NS_FAILPOINT": "shard_write:3:enospc"}, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "/labeled-000000.tar: no space left on device" in _last(r), r.stderr[-2000:]
    stage("prepare_data.py", *ov)
    r = stage("train.py", "role=teacher", *ov, env={"NS_FAILPOINT": "checkpoint_write:1:enospc"}, check=False)
    assert r.returncode == 2 and "round-0/state/.tmp-train-e0000: no space left on device" in _last(r), r.stderr[-2000:]
    stage("train.py", "role=teacher", *ov)
    r = stage("pseudo_label.py", "round=1", *ov, env={"NS_FAILPOINT": "parquet_write:2:eacces"}, check=False)
    assert r.returncode == 2 and "unlabeled-000001.parquet: permission denied" in _last(r), r.stderr[-2000:]
    out = tmp_path / "preds.csv"
    model = runs / "env" / "round-0"
    (tmp_path / f".tmp-{out.name}.killed").write_text("a killed run's partial file")
    r = stage("predict.py", f"model={model}", f"input={tiny_data['test']}", f"out={out}", "batch_size=8",
              env={"NS_FAILPOINT": "predict_batch:1:enospc"}, check=False)
    assert r.returncode == 2 and f"{out}: no space left on device" in _last(r), r.stderr[-2000:]
    stage("predict.py", f"model={model}", f"input={tiny_data['test']}", f"out={out}")
    assert out.is_file() and not list(tmp_path.glob(".tmp-*")) and not list(runs.rglob(".tmp-*"))
    ev = [f"models={model}", f"out={tmp_path / 'ev'}", "evaluate.robustness=false", *ov]
    shutil.rmtree(model / "eval", ignore_errors=True)
    r = stage("evaluate.py", *ev, env={"NS_FAILPOINT": "eval_result:1:enospc"}, check=False)
    assert r.returncode == 2 and "round-0/eval/clean-" in _last(r) and ": no space left on device (rerun" in _last(r)
    stage("evaluate.py", *ev)
    assert list((model / "eval").glob("clean-*.json"))
    r = stage("export.py", f"model={model}", env={"NS_FAILPOINT": "onnx_write:1:enospc"}, check=False)
    assert r.returncode == 2 and "round-0/onnx/.tmp-model.onnx" in _last(r), r.stderr[-2000:]
    assert ": no space left on device (rerun" in _last(r) and "Traceback" not in r.stderr
    stage("export.py", f"model={model}")
    assert (model / "onnx" / "model.onnx").is_file()
    kd = [*ov, f"distill.teacher={model}", "distill.arch=resnet10t", "distill.epochs=1", "distill.batch_size=32",
          "distill.workers=0", "distill.name=kd"]
    r = stage("distill.py", *kd, env={"NS_FAILPOINT": "checkpoint_write:1:enospc"}, check=False)
    assert r.returncode == 2 and "distilled/kd/state/.tmp-distill-e0000: no space left" in _last(r), r.stderr[-2000:]
    stage("distill.py", *kd)
    assert (runs / "env" / "distilled" / "kd" / "card.json").is_file()
    assert not list(runs.rglob(".tmp-*"))
    # what SIGKILLed writes leave (a file, a half-written model directory) goes on the next run of
    # every stage, even one with nothing left to do
    (data,) = (runs / "data").iterdir()
    places = [data, model, runs / "env" / "pseudo_labels" / "round=1", model / "eval", runs / "env" / "distilled" / "kd"]
    for d in places:
        (d / ".tmp-killed.abc").write_bytes(b"partial")
        (d / ".tmp-model-xyz").mkdir()
        (d / ".tmp-model-xyz" / "model.safetensors").write_bytes(b"partial")
    # out= folders a user chooses (predict's, evaluate's, export's) may hold other files: only our own names go
    for d, name in [(tmp_path, "preds.csv"), (tmp_path / "ev", "report.md"), (model / "onnx", "model.onnx")]:
        (d / f".tmp-{name}.abc").write_bytes(b"partial")
        (d / ".tmp-not-ours").write_bytes(b"a user's file")
        places.append(d)
    for script, *args in [("prepare_data.py",), ("train.py", "role=teacher"), ("pseudo_label.py", "round=1"),
                          ("evaluate.py", *ev[:3]), ("distill.py", *kd[len(ov):])]:
        stage(script, *args, *ov)
    stage("export.py", f"model={model}")
    stage("predict.py", f"model={model}", f"input={tiny_data['test']}", f"out={tmp_path / 'preds.csv'}")
    left = [p for d in places for p in d.glob(".tmp-*")]
    assert sorted(left) == sorted(d / ".tmp-not-ours" for d in places[-3:]), left


def _huge_png_header(w: int = 20000, h: int = 20000) -> bytes:
    """A small PNG whose header claims ``w`` x ``h`` pixels (a decompression bomb's first bytes)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_an_image_over_the_pixel_limit_is_a_counted_skip_and_one_odd_image_does_not_set_the_shape(tmp_path):
    from conftest import make_folder
    from PIL import Image

    from pipeline.data.images import BadImage, decode_image, decode_tensor
    from pipeline.data.limits import Limits, use
    from pipeline.data.prepare import load_manifest, prepare

    with pytest.raises(BadImage, match="20000 x 20000 pixels is over data.max_image_pixels"):
        decode_tensor(_huge_png_header(), "L")
    try:
        use(Limits(max_image_pixels=100))
        with pytest.raises(BadImage, match="16 x 16 pixels is over data.max_image_pixels \\(100\\)"):
            buf = __import__("io").BytesIO()
            Image.new("RGB", (16, 16)).save(buf, format="BMP")  # the PIL path
            decode_image(buf.getvalue(), "L")
    finally:
        use(Limits())
    train, test = make_folder(tmp_path / "train", 30, 0), make_folder(tmp_path / "test", 5, 1)
    (train / "class_0" / "bomb.png").write_bytes(_huge_png_header())
    Image.new("RGB", (64, 64), (200, 10, 10)).save(train / "class_1" / "odd.png")
    for seed in range(3):  # whichever image a seed puts first, the majority decides
        cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", f"data.source={train}", f"data.test_source={test}",
                                 "data.labeled_per_class=10", "data.shard_size=50", f"data.seed={seed}",
                                 "data.max_bad_share=0.1"])
        m = load_manifest(prepare(cfg))
        assert m["image"]["mode"] == "L" and m["image"]["size"] == [16, 16]
        reasons = [e["reason"] for e in m["bad_samples"]["examples"]]
        assert any("20000 x 20000 pixels is over data.max_image_pixels" in r for r in reasons), reasons
