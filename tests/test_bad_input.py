"""Fault injection, bad input: broken samples are skipped with a count and a warning naming shard and
key; past ``data.max_bad_share`` the stage stops with one line; mismatched pseudo labels stop the
student before its first step; user errors are one line, never a traceback."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, make_folder, make_image, stage, tiny_overrides
from PIL import Image

from pipeline.config import ConfigError, PseudoLabelConfig
from pipeline.data.bad_samples import Skip, SkipLog
from pipeline.data.dataset import Preprocessing
from pipeline.data.images import BadImage, decode_image
from pipeline.data.shards import ShardError, iter_samples, write_shard
from pipeline.data.stream import StreamSpec, epoch_batches, eval_batches
from pipeline.data.transforms import eval_transform
from pipeline.errors import DataError
from pipeline.pseudo import labeling
from pipeline.pseudo import pseudo_labels as pl


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _zero_size_png() -> bytes:
    """A PNG whose header declares a 0 x 0 image (decoders refuse it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


GOOD = 12


@pytest.fixture()
def bad_shard(tmp_path) -> Path:
    """12 good samples and one of each bad kind, labeled (.cls)."""
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"good_{i:02d}", "png": _png(make_image(i % NUM_CLASSES, rng)), "cls": str(i % 4)}
               for i in range(GOOD)]
    deep = Image.fromarray((np.arange(16 * 16).reshape(16, 16) * 200).astype(np.uint16))  # 16-bit: converted
    rgba = Image.new("RGBA", (20, 12), (200, 100, 50, 128))  # other size and channels: converted
    samples += [
        {"__key__": "conv_16bit", "png": _png(deep), "cls": "1"},
        {"__key__": "conv_rgba", "png": _png(rgba), "cls": "2"},
        {"__key__": "bad_bytes", "png": b"this is not an image", "cls": "0"},
        {"__key__": "bad_empty", "png": b"", "cls": "0"},
        {"__key__": "bad_zero", "png": _zero_size_png(), "cls": "0"},
        {"__key__": "bad_nolabel", "png": _png(make_image(0, rng))},
        {"__key__": "bad_text", "txt": b"a caption, no image", "cls": "3"},
    ]
    path = tmp_path / "labeled-000000.tar"
    write_shard(path, samples)
    return path


BAD_KEYS = {"bad_bytes", "bad_empty", "bad_zero", "bad_nolabel", "bad_text"}


def test_decode_image_converts_or_refuses_with_a_reason():
    deep = Image.fromarray((np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16))
    for img in (deep, Image.new("RGBA", (10, 12)), Image.new("P", (10, 12)), Image.new("CMYK", (10, 12))):
        for mode in ("L", "RGB"):
            out = decode_image(_png(img) if img.mode != "CMYK" else _jpeg(img), mode)
            assert out.mode == mode and out.size == (10, 12)
    for data, why in ((b"", "empty"), (b"junk", "not a recognised image"), (_zero_size_png(), "")):
        with pytest.raises(BadImage, match=why):
            decode_image(data, "L")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_stream_skips_bad_samples_counts_and_names_them(bad_shard, capsys):
    log = SkipLog("train", limit=0.5)
    spec = StreamSpec(shards=[str(bad_shard)], mode="L", transform=eval_transform(16), shuffle=False)
    batches = list(epoch_batches(spec, 0, steps=3, batch_size=7, workers=0, log=log))
    assert [x.shape for x, _ in batches] == [(7, 1, 16, 16)] * 3  # full batches: 14 usable, then a new pass
    assert log.skipped == 5 and {e["key"] for e in log.examples} == BAD_KEYS
    err = capsys.readouterr().err
    for key in BAD_KEYS:
        assert f"skipped {bad_shard.name} {key}" in err
    assert log.metrics()["reasons"]["no label (.cls)"] == 1


def test_skips_past_the_limit_stop_the_stage(bad_shard):
    log = SkipLog("evaluate", limit=0.01)
    list(eval_batches([str(bad_shard)], "L", eval_transform(16), 7, 0, log=log))
    with pytest.raises(DataError, match=r"5 of 19 samples are bad .*data.max_bad_share=0.01"):
        log.check()
    with pytest.raises(DataError, match="limit"):  # with a known total it stops as soon as it passes it
        SkipLog("x", 0.01, expected=100, quiet=True).extend([Skip("s", str(i), "bad") for i in range(2)])


def test_skips_reach_the_main_process_from_dataloader_workers(bad_shard):
    log = SkipLog("evaluate", limit=0.5, quiet=True)
    got = list(eval_batches([str(bad_shard)], "L", eval_transform(16), 5, workers=2, log=log))
    assert sum(len(x) for x, _ in got) == GOOD + 2 and log.skipped == 5 and log.used == GOOD + 2


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_and_empty_shards_are_skipped_with_their_lost_samples(bad_shard, tmp_path):
    good = tmp_path / "g-000000.tar"
    write_shard(good, [{"__key__": f"k{i}", "png": _png(make_image(0, np.random.default_rng(i))), "cls": "0"}
                       for i in range(10)])
    cut = tmp_path / "g-000001.tar"
    shutil.copy(good, cut)
    _truncate(cut, good.stat().st_size // 2 + 100)  # mid-member
    empty_tar, zero = tmp_path / "g-000002.tar", tmp_path / "g-000003.tar"
    with tarfile.open(empty_tar, "w"):
        pass
    zero.write_bytes(b"")
    with pytest.raises(ShardError, match="damaged after sample k"):
        list(iter_samples(cut))
    rows = {p.name: 10 for p in (good, cut, empty_tar, zero)}
    log = SkipLog("evaluate", limit=1.0, quiet=True)
    got = list(eval_batches([str(p) for p in (good, cut, empty_tar, zero)], "L", eval_transform(16), 4, 0, log=log,
                            rows=rows))
    read = sum(len(x) for x, _ in got)
    assert 10 < read < 20 and log.used == read
    assert log.skipped == 40 - read  # every sample the manifest promised is either read or counted lost
    reasons = {e["shard"]: e["reason"] for e in log.examples}
    assert reasons[cut.name].startswith("damaged tar") and reasons[zero.name] == "damaged tar: empty file"
    assert "ends early (0 of 10" in reasons[empty_tar.name]


def test_robustness_subset_reads_a_damaged_test_set_through_the_same_reader(tmp_path):
    from pipeline.evaluate.evaluation import TestSet, load_subset

    good = tmp_path / "test-000000.tar"
    write_shard(good, [{"__key__": f"k{i}", "png": _png(make_image(i % 4, np.random.default_rng(i))),
                        "cls": str(i % 4)} for i in range(10)])
    cut = tmp_path / "test-000001.tar"
    shutil.copy(good, cut)
    _truncate(cut, good.stat().st_size // 2 + 100)
    test = TestSet("test", [good, cut], [10, 10], [f"c{i}" for i in range(4)], "0" * 64)
    images, labels = load_subset(test, Preprocessing("L", 16, (0.5,), (0.5,)), None, 0)
    assert 10 < len(images) < 20 and images.shape[1:] == (1, 16, 16)  # the good shard and the cut one's head
    assert labels[:10].tolist() == [i % 4 for i in range(10)]


def test_pseudo_label_skips_bad_samples_and_records_them(bad_shard, tmp_path):
    from accelerate import Accelerator

    unl = tmp_path / "unlabeled-000000.tar"
    shutil.copy(bad_shard, unl)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    out = tmp_path / "pl"
    prep = Preprocessing.of("L", 16, [0.5], [0.5])
    res = labeling.label_shards(model, [unl], out, shard_rows={unl.name: 19}, teacher_sha256="t" * 64,
                          class_names=["a", "b", "c"], prep=prep, opts=PseudoLabelConfig(batch_size=4, workers=0),
                          accelerator=Accelerator(cpu=True), progress=False, max_bad_share=0.5)
    f = out / pl.parquet_name(unl)
    meta = pl.read_meta(f)
    assert meta["rows"] == 15 and {s["key"] for s in meta["skipped"]} == BAD_KEYS - {"bad_nolabel"}
    assert pl.validates(f, 19, "t" * 64, ["a", "b", "c"])  # rows + skipped = the shard: a rerun skips it
    assert res["bad_samples"]["skipped"] == 4
    assert pl.write_manifest(out, [unl], tmp_path, "t" * 64, ["a", "b", "c"], {}, "d")["stats"]["skipped"] == 4
    keys = [s["__key__"] for s in iter_samples(unl)]
    assert pl.check(out, {unl.name: 19}, "t" * 64, ["a", "b", "c"], shard_keys={unl.name: keys})


def test_pseudo_labels_with_other_keys_are_refused(tmp_path):
    shard = "unlabeled-000000.tar"
    names = ["a", "b", "c"]
    probs = np.asarray([[1, 0, 0], [0, 1, 0]], np.float32)
    pl.write_parquet(tmp_path / pl.parquet_name(shard), shard, ["k1", "zz"], probs, "t" * 64, names)
    pl.write_manifest(tmp_path, [tmp_path / shard], tmp_path, "t" * 64, names, {}, "d")
    with pytest.raises(ConfigError, match="keys the shard lacks, e.g. 'zz'"):
        pl.check(tmp_path, {shard: 2}, "t" * 64, names, shard_keys={shard: ["k1", "k2"]})
    pl.write_parquet(tmp_path / pl.parquet_name(shard), shard, ["k1", "k1"], probs, "t" * 64, names)
    pl.write_manifest(tmp_path, [tmp_path / shard], tmp_path, "t" * 64, names, {}, "d")
    with pytest.raises(ConfigError, match="lack keys of the shard, e.g. 'k2'"):
        pl.check(tmp_path, {shard: 2}, "t" * 64, names, shard_keys={shard: ["k1", "k2"]})
    with pytest.raises(ConfigError, match="have 3 classes, the data has 4"):
        pl.check(tmp_path, {shard: 2}, "t" * 64, names + ["d"])
    (tmp_path / pl.parquet_name(shard)).write_bytes(b"changed")  # no longer the file the manifest lists
    with pytest.raises(ConfigError, match="does not match its manifest"):
        pl.check(tmp_path, {shard: 2}, "t" * 64, names)


# ---------------------------------------------------------------- through the stage scripts


@pytest.fixture(scope="module")
def dirty_folder(tmp_path_factory) -> Path:
    """The tiny dataset plus 2 bad images of 242 (0.8 %): under the default 1 % limit."""
    root = make_folder(tmp_path_factory.mktemp("dirty") / "train", 60, 0)
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "class_1" / "empty.png").write_bytes(b"")
    return root


def test_prepare_skips_bad_images_with_a_count(dirty_folder, tiny_data, tmp_path):
    ov = tiny_overrides({"train": dirty_folder, "test": tiny_data["test"]}, tmp_path / "runs")
    r = stage("prepare_data.py", *ov)
    assert "skipped class_0/broken.png" in r.stderr and "skipped class_1/empty.png" in r.stderr
    (data,) = (tmp_path / "runs" / "data").iterdir()
    m = json.loads((data / "manifest.json").read_text())
    assert m["bad_samples"]["skipped"] == 2 and m["bad_samples"]["used"] == 240 + 80
    assert sum(s["count"] for s in m["splits"].values()) == 240 + 80
    assert sum(s["samples"] for s in m["splits"]["unlabeled"]["shards"]) == m["splits"]["unlabeled"]["count"]
    r = stage("prepare_data.py", *ov, "data.max_bad_share=0.005", "data.seed=1", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()[-1]) < 400
    assert "error: prepare: 2 of 322 samples are bad" in r.stderr and "data.max_bad_share=0.005" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def student_ready(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("badpl") / "runs"
    ov = tiny_overrides(tiny_data, runs, name="ok") + ["teacher.epochs=2"]
    stage("iterate.py", "round=0", *ov)
    stage("pseudo_label.py", "round=1", *ov)
    return runs, ov


def test_student_refuses_pseudo_labels_of_other_keys_before_training(student_ready):
    runs, ov = student_ready
    bad = runs / "badkeys"
    shutil.copytree(runs / "ok", bad)
    pl_dir = bad / "pseudo_labels" / "round=1"
    f = pl_dir / "unlabeled-000001.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(f)
    keys = t.column("key").to_pylist()
    t = t.set_column(0, "key", pa.array(["pool_99999999"] + keys[1:]))  # same row count, one foreign key
    pq.write_table(t, f)
    manifest = json.loads((pl_dir / "_manifest.json").read_text())
    from pipeline.artifacts import sha256_file

    for e in manifest["files"]:
        e["sha256"] = sha256_file(pl_dir / e["file"])
    (pl_dir / "_manifest.json").write_text(json.dumps(manifest))
    r = stage("train.py", "role=student", "round=1", *[o for o in ov if not o.startswith("name=")], "name=badkeys",
              check=False)
    assert r.returncode == 2 and "error: pseudo labels for unlabeled-000001.tar have keys the shard lacks" in r.stderr
    assert not (bad / "round-1" / "state").exists()  # not a single step


def test_a_prepared_shard_changed_afterwards_is_named(student_ready):
    runs, ov = student_ready
    (data,) = (runs / "data").iterdir()
    shard = data / "unlabeled-000002.tar"
    saved = shard.read_bytes()
    try:
        _truncate(shard, len(saved) - 1024)
        r = stage("pseudo_label.py", "round=1", *[o for o in ov if not o.startswith("name=")], "name=other",
                  check=False)
        assert r.returncode == 2 and f"shard {shard} is missing or does not match its manifest" in r.stderr
        stage("prepare_data.py", *ov)  # prepare rebuilds exactly the damaged shard
        assert shard.read_bytes() == saved
    finally:
        shard.write_bytes(saved)


@pytest.mark.parametrize("args,fragment", [
    (["teacher.epochs=0"], "teacher.epochs: must be >= 1"),
    (["student.lr=-0.1"], "student.lr: must be > 0"),
    (["student.threshold=1.5"], "student.threshold: must be <= 1"),
    (["data.max_bad_share=2"], "data.max_bad_share: must be <= 1"),
    (["teacher.mixed_precision=maybe"], "teacher.mixed_precision: expected one of"),
    (["--config", "configs/none.yaml"], "config file not found"),
    (["data.unlabeled=/no/such/dir"], "data.unlabeled '/no/such/dir' is not"),
])
def test_user_errors_exit_2_with_one_line(args, fragment, tmp_path):
    r = stage("prepare_data.py", f"runs_dir={tmp_path}", *args, check=False)
    assert r.returncode == 2 and fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", ["train.py", "pseudo_label.py", "iterate.py", "distill.py", "evaluate.py",
                                    "export.py", "predict.py"])
def test_every_stage_reads_the_config_the_same_way(script, tmp_path):
    """The config errors above, in every other stage: one line, exit 2, before any work."""
    for args, fragment in [(["teacher.lr=nan"], "teacher.lr: must be a finite number"),
                           (["student.threshold=1.5"], "student.threshold: must be <= 1"),
                           (["--config", "configs/none.yaml"], "config file not found"),
                           (["distill.name=/abs"], "distill.name: '/abs' must be a plain directory name")]:
        r = stage(script, f"runs_dir={tmp_path}", *args, check=False)
        assert r.returncode == 2 and fragment in r.stderr, (script, args, r.stderr[-1000:])
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("script,args,fragment", [
    ("pseudo_label.py", ["round=1"], "teacher model not found or unfinished"),
    ("train.py", ["role=student", "round=1"], "needs the finished round 0 model"),
    ("evaluate.py", ["models=/no/such/model"], "/no/such/model"),
    ("distill.py", ["distill.teacher=/no/such/model"], "/no/such/model"),
    ("export.py", ["model=/no/such/model"], "/no/such/model"),
    ("predict.py", ["model=/no/such/model", "input=.", "out=p.csv"], "model: not found: /no/such/model"),
])
def test_missing_model_directories_are_one_line(student_ready, script, args, fragment):
    runs, ov = student_ready
    r = stage(script, *args, *[o for o in ov if not o.startswith("name=")], "name=nothing", check=False)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
