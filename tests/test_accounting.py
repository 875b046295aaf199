"""Every input is accounted for, whatever the layout: used, skipped as bad (with its reason) or
passed over on purpose (counted by reason in the manifest's ``unused``). And no input is read past
its size limit (``data.max_member_bytes``), compressed or not."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NUM_CLASSES, make_image, stage
from PIL import Image

LIMIT = 4000  # data.max_member_bytes in these tests: a 16 px PNG is ~350 bytes, a 64 px noise PNG ~12 KB


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB"))


def _labeled_files(per_class: int, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"class_{c}/{i:03d}.png": _png(make_image(c, rng)) for c in range(NUM_CLASSES) for i in range(per_class)}


# what each injected file is expected to become: (used | bad | unused, reason fragment)
LABELED_EXTRAS = {
    "notes.txt": (b"not an image", "unused", "not an image"),
    "class_0/.DS_Store": (b"\0\0", "unused", "hidden file"),
    "top.png": (None, "unused", "outside a class folder"),
    "class_1/big.png": ("big", "bad", "over data.max_member_bytes"),
    "class_2/broken.png": (b"\x89PNG\r\n\x1a\n not really", "bad", ""),
}
POOL_EXTRAS = {
    "README.md": (b"# pool", "unused", "not an image"),
    "sub/.hidden.png": (None, "unused", "hidden file"),
    "sub/deeper/big.jpg": ("big", "bad", "over data.max_member_bytes"),
    "x/broken.png": (b"broken", "bad", ""),
}


def _content(spec, i: int) -> bytes:
    if spec == "big":
        return _noise(64, i)
    if spec == "odd":
        return _png(Image.new("RGB", (24, 24), (250, 20, 20)))
    return spec if spec is not None else _png(make_image(0, np.random.default_rng(i)))


def _materialise(files: dict[str, bytes], root: Path, layout: str, links: bool = False) -> Path:
    """``files`` as a directory, a .tar or a .tar.gz (with, for archives, a link and an unsafe member)."""
    if layout == "folder":
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root
    path = root.with_suffix(".tar" if layout == "tar" else ".tar.gz")
    with tarfile.open(path, "w" if layout == "tar" else "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if links:
            link = tarfile.TarInfo("class_0/link.png")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)
            info = tarfile.TarInfo("../escape.png")
            data = _content(None, 99)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _pool_shards(root: Path, gz: bool) -> tuple[str, int, dict]:
    """Two webdataset shards: 12 good samples, a sample without an image, one with an oversized image,
    a metadata member of no sample and a link. Returns (pattern, inputs, expected tallies)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    ext = ".tar.gz" if gz else ".tar"
    for s in range(2):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
            _member(tf, "__meta__.json", b"{}")
            for i in range(6):
                _member(tf, f"s{s}_{i}.png", _png(make_image(i % NUM_CLASSES, rng)))
                _member(tf, f"s{s}_{i}.json", b'{"source": "web"}')
            if s == 0:
                _member(tf, "s0_noimg.txt", b"a caption without its image")
                _member(tf, "s0_big.jpg", _noise(64, 3))
            else:  # a link with a long target (GNU: a 'K' header, then the link), a sample whose other member is too big
                link = tarfile.TarInfo("s1_link.png")
                link.type, link.linkname = tarfile.SYMTYPE, "/" + "x" * 150
                tf.addfile(link)
                _member(tf, "s1_npy.png", _png(make_image(0, rng)))
                _member(tf, "s1_npy.npy", bytes(LIMIT + 1))
        data = raw.getvalue()
        (root / f"pool-{s:06d}{ext}").write_bytes(gzip.compress(data) if gz else data)
    # inputs: 12 good + 3 bad samples + 2 metadata members + 1 link
    return f"{root}/pool-{{000000..000001}}{ext}", 18, {"used": 12, "bad": 3, "unused": 3}


def _prepare(tmp_path: Path, source: Path, test: Path, unlabeled: str, *extra: str) -> dict:
    runs = tmp_path / "runs"
    r = stage("prepare_data.py", f"runs_dir={runs}", f"data.source={source}", f"data.test_source={test}",
              f"data.unlabeled={unlabeled}", "data.labeled_per_class=4", "data.val_per_class=2",
              "data.shard_size=20", "data.max_bad_share=0.3", f"data.max_member_bytes={LIMIT}", *extra)
    (manifest,) = (runs / "data").glob("*/manifest.json")
    return json.loads(manifest.read_text()) | {"_log": r.stdout + r.stderr}


def _accounted(m: dict) -> dict:
    used = sum(s["count"] for s in m["splits"].values())
    return {"used": used, "bad": m["bad_samples"]["skipped"], "unused": m["unused"]["count"]}


@pytest.mark.parametrize("labeled_layout,pool_layout", [
    ("folder", "rest"), ("tar", "folder"), ("tar.gz", "tar"), ("folder", "shards"), ("tar", "shards.gz"),
])
def test_every_input_is_used_skipped_or_counted_as_unused_whatever_the_layout(tmp_path, labeled_layout, pool_layout):
    """inputs = used + bad + unused, each extra named by its reason. Where the training images past the
    labeled split are not the pool, which of them are read depends on the split, so only the sum is exact."""
    labeled = _labeled_files(12, 0)
    expect = {"used": len(labeled), "bad": 0, "unused": 0}
    for i, (name, (spec, fate, _)) in enumerate(LABELED_EXTRAS.items()):
        labeled[name] = _content(spec, i)
        expect[fate] += 1
    links = labeled_layout != "folder"
    expect["unused"] += 2 if links else 0  # the link and the unsafe member
    source = _materialise(labeled, tmp_path / "train", labeled_layout, links=links)
    test_files = _labeled_files(3, 1) | {"class_3/odd.png": _content("odd", 0)}  # RGB 24 px in an L 16 px set
    test = _materialise(test_files, tmp_path / "test", "folder")
    expect["used"] += len(test_files)
    extra, fates = [], list(LABELED_EXTRAS.values())
    if pool_layout == "rest":
        unlabeled = "rest"
    elif pool_layout.startswith("shards"):
        unlabeled, _, pool_expect = _pool_shards(tmp_path / "pool", gz=pool_layout.endswith("gz"))
        expect = {k: v + pool_expect[k] for k, v in expect.items()}
    else:
        pool = {f"p/{i:03d}.png": _content(None, 100 + i) for i in range(10)}
        expect["used"] += len(pool)
        for i, (name, (spec, fate, _)) in enumerate(POOL_EXTRAS.items()):
            pool[name] = _content(spec, 200 + i)
            expect[fate] += 1
        fates += list(POOL_EXTRAS.values())
        unlabeled = str(_materialise(pool, tmp_path / "pool", pool_layout))
        extra = ["data.max_unlabeled=8"]  # of 11 listed pool images: 3 left out by the cap, counted
    m = _prepare(tmp_path, source, test, unlabeled, *extra)
    got = _accounted(m)
    assert sum(got.values()) == sum(expect.values()), (got, expect, m["unused"]["reasons"])
    if pool_layout == "rest":
        assert got == expect, (m["unused"]["reasons"], m["bad_samples"]["reasons"])
    else:
        reasons = m["unused"]["reasons"]
        assert reasons["training image past data.labeled_per_class + data.val_per_class (data.unlabeled is not rest)"]
        assert reasons.get("pool image past data.max_unlabeled", 0) == (3 if extra else 0)
    reasons = " ".join(m["unused"]["reasons"]) + " " + " ".join(m["bad_samples"]["reasons"])
    for _, _, fragment in fates:
        assert fragment in reasons
    if pool_layout.startswith("shards"):  # the same counts whether the shards are read by headers or whole
        assert m["unused"]["reasons"]["tar member of no sample"] == 2
        assert m["unused"]["reasons"]["tar member that is not a regular file (link, device...)"] == 1
        pool_bad = sum(e["count"] for e in m["bad_samples"]["examples"] if e["shard"].startswith("pool-"))
        assert m["splits"]["unlabeled"]["count"] == 12 and pool_bad == 3, m["bad_samples"]["examples"]
    assert "inputs not used" in m["_log"]
    assert m["conversions"]["reasons"] == {"mode RGB -> L and size other than 16 x 16": 1}, m["conversions"]
    assert m["image"]["mode"] == "L" and m["image"]["size"] == [16, 16]


def test_an_oversized_member_is_passed_over_without_being_held_in_memory(tmp_path):
    """A gzip shard of ~100 KB holding a 96 MB member: read in 1 MiB pieces, never whole."""
    from pipeline.data.bad_samples import Skip
    from pipeline.data.limits import Limits, use
    from pipeline.data.shards import read_shard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        _member(tf, "a.png", _png(make_image(0, np.random.default_rng(0))))
        info = tarfile.TarInfo("bomb.png")
        info.size = 96 * 2**20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
        _member(tf, "c.png", _png(make_image(1, np.random.default_rng(1))))
    shard = tmp_path / "bomb.tar.gz"
    shard.write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))
    del raw
    assert shard.stat().st_size < 2**20
    use(Limits(max_member_bytes=8 * 2**20))
    try:
        tracemalloc.start()
        out = list(read_shard(shard))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        use(Limits())
    assert [s["__key__"] for s in out if not isinstance(s, Skip)] == ["a", "c"]
    (skip,) = [s for s in out if isinstance(s, Skip)]
    assert skip.key == "bomb" and "100663296 bytes is over data.max_member_bytes (8388608)" in skip.reason
    assert peak < 8 * 2**20, peak


def test_a_sample_of_many_members_each_under_the_limit_is_not_held_whole(tmp_path):
    from pipeline.data.bad_samples import Skip
    from pipeline.data.limits import Limits, use
    from pipeline.data.shards import read_shard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        _member(tf, "k.png", _png(make_image(0, np.random.default_rng(0))))
        for i in range(5):
            _member(tf, f"k.x{i:03d}", bytes(3000))
        _member(tf, "j.png", _png(make_image(1, np.random.default_rng(1))))
    shard = tmp_path / "many.tar.gz"
    shard.write_bytes(gzip.compress(raw.getvalue()))
    use(Limits(max_member_bytes=8000))
    try:
        out = list(read_shard(shard))
    finally:
        use(Limits())
    assert [s["__key__"] for s in out if not isinstance(s, Skip)] == ["j"]
    (skip,) = [s for s in out if isinstance(s, Skip)]
    assert skip.key == "k" and skip.reason.startswith("its members together: ") and "8000" in skip.reason


def test_an_oversized_pool_member_is_a_counted_skip_through_pseudo_label(tiny_data, tmp_path):
    """In a pool of existing shards read in place: counted by prepare, skipped by pseudo_label."""
    from conftest import tiny_overrides

    pattern, _, _ = _pool_shards(tmp_path / "pool", gz=True)
    ov = [*tiny_overrides(tiny_data, tmp_path / "runs", name="big"), f"data.unlabeled={pattern}",
          f"data.max_member_bytes={LIMIT}", "data.max_bad_share=0.2", "teacher.epochs=1"]
    stage("iterate.py", "round=0", *ov)
    r = stage("pseudo_label.py", "round=1", *ov)
    assert "s0_big" in r.stderr and "over data.max_member_bytes" in r.stderr
    labels = tmp_path / "runs" / "big" / "pseudo_labels" / "round=1"
    assert json.loads((labels / "_manifest.json").read_text())["stats"]["skipped"] == 3  # no image, the big image, the big .npy beside an image
    named = json.loads(pq.read_metadata(labels / "pool-000000.parquet").metadata[b"skipped"])  # each file names its own
    assert {x["key"]: x["reason"] for x in named}["s0_big"].endswith("over data.max_member_bytes (4000)")
    # predict over a folder: the README is counted as not used, the oversized image skipped and listed
    pin = tmp_path / "pin"
    _materialise({"README.md": b"# images", "a.png": _content(None, 1), "sub/big.png": _content("big", 2)}, pin, "folder")
    out = tmp_path / "p.csv"
    r = stage("predict.py", f"model={tmp_path / 'runs' / 'big' / 'round-0'}", f"input={pin}", f"out={out}",
              f"data.max_member_bytes={LIMIT}", "data.max_bad_share=0.6")
    assert "1 inputs not used (1 file that is not an image (by its name))" in r.stderr
    assert len(out.read_text().splitlines()) == 2
    assert "sub/big.png," in (tmp_path / "p.csv.skipped.csv").read_text()


def test_a_large_pool_read_in_place_counts_in_the_share_its_skips_are_judged_against(tmp_path):
    """3 samples without an image among 203 pool samples: 1.3 % of the data, under a 5 % limit, though
    more than 5 % of the 36 labeled and test images that prepare writes."""
    from pipeline.data.shards import write_shard

    rng = np.random.default_rng(0)
    pool = tmp_path / "pool"
    pool.mkdir()
    for s in range(2):
        samples = [{"__key__": f"s{s}_{i}", "png": _png(make_image(i % NUM_CLASSES, rng))} for i in range(100)]
        samples += [{"__key__": f"s{s}_bad{i}", "txt": b"no image"} for i in range(1 + s)]
        write_shard(pool / f"pool-{s:06d}.tar", samples)
    source = _materialise(_labeled_files(6, 0), tmp_path / "train", "folder")
    test = _materialise(_labeled_files(3, 1), tmp_path / "test", "folder")
    runs = tmp_path / "runs"
    stage("prepare_data.py", f"runs_dir={runs}", f"data.source={source}", f"data.test_source={test}",
          f"data.unlabeled={pool}/pool-{{000000..000001}}.tar", "data.labeled_per_class=4",
          "data.val_per_class=2", "data.max_bad_share=0.05")
    (manifest,) = (runs / "data").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["bad_samples"]["skipped"] == 3 and m["splits"]["unlabeled"]["count"] == 200


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "CMYK"])
def test_the_header_reader_names_the_mode_and_size_as_pil_does(mode):
    """Conversions are counted from PNG/JPEG headers read by hand (PIL's open costs ~10x more)."""
    from pipeline.data.images import header_mode_size

    for fmt in ("PNG", "JPEG"):
        img = Image.new(mode, (13, 7))
        if fmt == "JPEG" and mode not in ("L", "RGB", "CMYK"):
            img = img.convert("L" if mode in ("LA", "I;16") else "RGB")
        if fmt == "PNG" and mode == "CMYK":
            continue
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        pil = Image.open(io.BytesIO(buf.getvalue()))
        assert header_mode_size(buf.getvalue()) == (pil.mode, pil.size), (mode, fmt)
    assert header_mode_size(b"GIF89a....") is None
