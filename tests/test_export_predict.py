"""ONNX export and batch prediction through the real stage scripts, on a tiny model trained here."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, ROOT, SIZE, make_image

from pipeline.artifacts import sha256_file
from pipeline.config import ConfigError

pytest.importorskip("onnxruntime")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
LABELS = ["bar_top", "bar_left", "bar_bottom", "bar_right"]  # make_image's classes 0..3
BAD = ("broken.png", "empty.png", "truncated.png")


def stage(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _images(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % NUM_CLASSES
    return torch.from_numpy(np.stack([np.asarray(make_image(int(c), rng)) for c in y])).unsqueeze(1), y


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A resnet10t that tells make_image's four bars apart (a few seconds of training)."""
    from pipeline.data.transforms import normalize
    from pipeline.modeling.models import create_model, save_model_dir

    torch.manual_seed(0)
    x, y = _images(np.random.default_rng(0), 256)
    mean, std = [x.float().div(255).mean().item()], [x.float().div(255).std().item()]
    model = create_model("resnet10t", num_classes=NUM_CLASSES, in_chans=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        idx = torch.randint(0, len(y), (32,))
        loss = F.cross_entropy(model(normalize(x[idx], torch.tensor(mean), torch.tensor(std))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = tmp_path_factory.mktemp("model") / "round-0"
    save_model_dir(model.eval(), d, LABELS, mean, std, SIZE, 1)
    (d / "card.json").write_text(json.dumps({"round": 0, "made_by": "test_export_predict"}))
    return d


@pytest.fixture(scope="module")
def exported(model_dir) -> dict:
    first = ok(stage("export.py", f"model={model_dir}"))
    out = model_dir / "onnx"
    mtime = (out / "model.onnx").stat().st_mtime_ns
    again = ok(stage("export.py", f"model={model_dir}"))
    return {"out": out, "first": first, "again": again, "mtime": mtime}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """Good images of known class (one RGB, one of another size) and three bad files."""
    from PIL import Image

    d = tmp_path_factory.mktemp("predict") / "images"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(7)
    truth = {}
    for i in range(8):
        p = d / ("sub" if i % 2 else ".") / f"gray_{i}.png"
        make_image(i % NUM_CLASSES, rng).save(p)
        truth[p] = i % NUM_CLASSES
    truth[d / "colour.png"] = 1
    make_image(1, rng).convert("RGB").save(d / "colour.png")
    truth[d / "bigger.png"] = 2
    make_image(2, rng).resize((2 * SIZE, 2 * SIZE), Image.NEAREST).save(d / "bigger.png")
    buf = io.BytesIO()
    make_image(3, rng).save(buf, format="PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "broken.png").write_bytes(b"this is not an image")
    (d / "empty.png").write_bytes(b"")
    return {"dir": d, "truth": {str(p.resolve()): c for p, c in truth.items()}}


def _read(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [{"path": r["path"], "label": r["label"], "confidence": float(r["confidence"]),
                     "topk_labels": r["topk_labels"].split(";"),
                     "topk_probs": [float(p) for p in r["topk_probs"].split(";")]} for r in csv.DictReader(f)]
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def predictions(model_dir, exported, images, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("preds")
    runs = {}
    for backend, model in (("torch", model_dir), ("onnx", exported["out"])):
        for fmt, topk in (("csv", "3"), ("parquet", "5")):
            path = out / f"{backend}.{fmt}"
            r = ok(stage("predict.py", f"model={model}", f"input={images['dir']}", f"out={path}", f"topk={topk}",
                         "batch_size=4", "data.max_bad_share=0.5"))
            runs[backend, fmt] = {"rows": _read(path), "run": r, "path": path}
    return runs


# ---------------------------------------------------------------- export


def test_export_writes_checked_onnx_with_config_and_card(model_dir, exported):
    out = exported["out"]
    rec = json.loads((out / "export.json").read_text())
    assert rec["check"]["tolerance"] == 1e-4 and 0 <= rec["check"]["max_abs_diff"] <= 1e-4
    assert rec["check"]["batch_sizes"] == [1, 8, 32]
    assert rec["input"]["name"] == "input" and rec["input"]["shape"] == ["batch", 1, SIZE, SIZE]
    assert rec["source"]["sha256"]["model.safetensors"] == sha256_file(model_dir / "model.safetensors")
    for name in ("config.json", "card.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()
    assert {"torch", "onnx", "onnxruntime"} <= set(rec["versions"]) and rec["opset"] >= 17
    assert "exported" in exported["first"].stdout


def test_onnx_matches_pytorch_at_any_batch_size(model_dir, exported):
    from pipeline.modeling.models import load_model_dir
    from pipeline.serve.export import ort_session

    model, _ = load_model_dir(model_dir)
    sess = ort_session(exported["out"] / "model.onnx")
    assert sess.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
    for b in (1, 5):
        x = torch.randn(b, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ref = model(x).numpy()
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        assert got.shape == (b, NUM_CLASSES) and np.abs(got - ref).max() <= 1e-4


def test_export_rerun_skips(exported):
    assert "up to date" in exported["again"].stdout
    assert (exported["out"] / "model.onnx").stat().st_mtime_ns == exported["mtime"]


def test_export_of_a_non_model_dir_is_one_line_exit_2(images):
    r = stage("export.py", f"model={images['dir']}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: not a model directory")


def test_export_refuses_a_graph_outside_tolerance(model_dir, tmp_path, monkeypatch):
    import pipeline.serve.export as ex

    monkeypatch.setattr(ex, "check_onnx", lambda *a, **k: 0.5)
    with pytest.raises(ConfigError, match="exceeds tolerance"):
        ex.export_model_dir(model_dir, tmp_path / "x", exporter="torchscript")
    assert not (tmp_path / "x" / "model.onnx").exists() and not (tmp_path / "x" / "export.json").exists()


def test_missing_onnx_packages_say_how_to_install(exported, monkeypatch):
    from pipeline.serve.predict import load_classifier

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'noisy-student\[onnx\]'"):
        load_classifier(exported["out"] / "model.onnx")


# ---------------------------------------------------------------- predict


def test_every_good_image_gets_a_row_and_bad_ones_are_listed(predictions, images):
    good = set(images["truth"])
    for (backend, fmt), p in predictions.items():
        rows = p["rows"]
        assert len(rows) == len(good), (backend, fmt)
        assert {str(Path(r["path"]).resolve()) for r in rows} == good
        with open(p["path"].with_name(p["path"].name + ".skipped.csv"), newline="") as f:
            skipped = list(csv.DictReader(f))
        assert sorted(Path(s["path"]).name for s in skipped) == sorted(BAD) and all(s["error"] for s in skipped)
        err = p["run"].stderr
        assert all(f"skipped bad image {images['dir'] / b}" in err for b in BAD)
        assert "skipped 3 bad image(s)" in p["run"].stdout


def test_labels_topk_and_probabilities(predictions, images):
    for (_, fmt), p in predictions.items():
        k = 3 if fmt == "csv" else NUM_CLASSES  # topk=5 is capped at the number of classes
        for r in p["rows"]:
            assert r["label"] in LABELS and len(r["topk_labels"]) == len(r["topk_probs"]) == k
            assert r["topk_labels"][0] == r["label"] and r["topk_probs"][0] == pytest.approx(r["confidence"])
            probs = r["topk_probs"]
            assert sorted(probs, reverse=True) == probs and sum(probs) <= 1 + 1e-5
        # the trained model knows the bars, RGB and resized images included
        right = sum(LABELS[images["truth"][str(Path(r["path"]).resolve())]] == r["label"] for r in p["rows"])
        assert right >= len(p["rows"]) - 1


def test_pytorch_and_onnx_agree(predictions):
    for fmt in ("csv", "parquet"):
        a = {r["path"]: r for r in predictions["torch", fmt]["rows"]}
        b = {r["path"]: r for r in predictions["onnx", fmt]["rows"]}
        assert a.keys() == b.keys()
        for path in a:
            assert a[path]["label"] == b[path]["label"]
            assert a[path]["confidence"] == pytest.approx(b[path]["confidence"], abs=1e-4)


def test_archives_shards_and_onnx_files_as_inputs(model_dir, exported, images, tmp_path, capsys):
    from pipeline.data.shards import write_shard
    from pipeline.serve.predict import predict

    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(images["dir"], arcname="images")
    s = predict(exported["out"] / "model.onnx", str(archive), tmp_path / "a.parquet", max_warnings=1)
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert s["backend"] == "onnx" and s["images"] == len(rows) == len(images["truth"]) and s["skipped"] == 3
    assert all(r["path"].startswith("images/") for r in rows)
    err = capsys.readouterr().err
    assert err.count("skipped bad image") == 1 and "2 more bad images not shown" in err

    good = sorted(Path(p) for p in images["truth"])
    for i in range(2):
        write_shard(tmp_path / f"pool-{i:06d}.tar",
                    [{"__key__": f"s{i}_{j}", "png": p.read_bytes()} for j, p in enumerate(good)])
    out = tmp_path / "s.csv"
    (tmp_path / "s.csv.skipped.csv").write_text("path,error\nstale,left over\n")
    s = predict(model_dir, str(tmp_path / "pool-{000000..000001}.tar"), out)
    rows = _read(out)
    assert s["skipped"] == 0 and len(rows) == 2 * len(good) and rows[0]["path"] == "pool-000000.tar/s0_0"
    assert not (tmp_path / "s.csv.skipped.csv").exists()  # no bad images: no stale list left behind


def test_predict_user_errors(model_dir, images, tmp_path):
    from pipeline.serve.predict import predict

    with pytest.raises(ConfigError, match="must end in .csv or .parquet"):
        predict(model_dir, str(images["dir"]), tmp_path / "p.txt")
    with pytest.raises(ConfigError, match="neither a model directory"):
        predict(images["dir"], str(images["dir"]), tmp_path / "p.csv")
    with pytest.raises(ConfigError, match="shard not found"):
        predict(model_dir, str(tmp_path / "none-{000000..000001}.tar"), tmp_path / "p.csv")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cnn32_with_its_flip_average_exports_with_a_dynamic_batch(tmp_path):
    """cnn32 averages each image with its mirror image in eval mode; its ONNX graph keeps the
    dynamic batch axis and matches PyTorch at any batch size."""
    from pipeline.modeling.models import create_model, load_model_dir, save_model_dir
    from pipeline.serve.export import export_model_dir, ort_session

    torch.manual_seed(0)
    model = create_model("noisy_student_cnn32_s", 4, 3, channels=(8, 16, 16)).eval()
    save_model_dir(model, tmp_path / "m", [f"c{i}" for i in range(4)], [0.5] * 3, [0.25] * 3, 32, 3)
    record, worked = export_model_dir(tmp_path / "m")
    assert worked and record["check"]["max_abs_diff"] <= 1e-4
    back, _ = load_model_dir(tmp_path / "m")
    sess = ort_session(tmp_path / "m" / "onnx" / "model.onnx")
    for b in (1, 3):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ref = back(x).numpy()
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        assert got.shape == (b, 4) and np.abs(got - ref).max() <= 1e-4


def test_a_stopped_predict_leaves_the_earlier_output_and_its_list_as_they_were(model_dir, images, tmp_path):
    out = tmp_path / "p.csv"
    args = (f"model={model_dir}", f"input={images['dir']}", f"out={out}", "batch_size=4")
    ok(stage("predict.py", *args, "data.max_bad_share=0.5"))
    skipped = out.with_name("p.csv.skipped.csv")
    before = out.read_bytes(), skipped.read_bytes()
    r = stage("predict.py", *args, "data.max_bad_share=0.01")
    failed = out.with_name("p.csv.failed-skipped.csv")
    assert r.returncode == 2 and str(failed) in r.stderr and "images are bad" in r.stderr
    assert (out.read_bytes(), skipped.read_bytes()) == before  # the earlier run's output and list, untouched
    with open(failed, newline="") as f:
        assert sorted(Path(row["path"]).name for row in csv.DictReader(f)) == sorted(BAD)
    ok(stage("predict.py", *args, "data.max_bad_share=0.5"))
    assert not failed.exists()  # the list of a stopped run goes once a run finishes
