import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_folder, tiny_overrides
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data.bad_samples import Skip
from pipeline.data.dataset import PreparedData, data_dir
from pipeline.data.prepare import load_manifest, prepare
from pipeline.data.shards import iter_samples, read_shard
from pipeline.data.sources import index_pool
from pipeline.errors import DataError


def _cfg(tiny_data, tmp_path, *extra):
    return load_config(None, tiny_overrides(tiny_data, tmp_path / "runs") + list(extra))


def _all_samples(paths):
    return [s for p in paths for s in iter_samples(p)]


def test_split_is_stratified_and_keys_unique(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, "data.val_per_class=5")
    out = prepare(cfg)
    m = load_manifest(out, verify="sha256")
    assert m["splits"]["labeled"]["per_class"] == [10, 10, 10, 10]
    assert m["splits"]["val"]["per_class"] == [5, 5, 5, 5]
    assert m["splits"]["unlabeled"]["count"] == 4 * 60 - 60
    assert m["splits"]["test"]["count"] == 80
    assert m["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    keys = []
    for split in ("labeled", "val", "unlabeled", "test"):
        samples = _all_samples(PreparedData(out, m).shards(split))
        assert len(samples) == m["splits"][split]["count"]
        keys += [s["__key__"] for s in samples]
        has_label = all("cls" in s for s in samples)
        assert has_label == (split != "unlabeled")
    assert len(keys) == len(set(keys))
    # shards hold at most shard_size samples, the manifest lists their hashes
    assert all(s["samples"] <= 50 for s in m["splits"]["unlabeled"]["shards"])
    assert len(m["splits"]["unlabeled"]["shards"]) == 4
    # true labels of the pool are kept aside, not in the shards
    truth = pq.read_table(out / "unlabeled-truth.parquet")
    assert truth.num_rows == 180


def test_original_bytes_kept_for_encoded_sources(tiny_data, tmp_path):
    src = make_folder(tmp_path / "jpgs", 12, 3, ext="jpg")
    cfg = _cfg(tiny_data, tmp_path, f"data.source={src}", "data.labeled_per_class=2")
    out = prepare(cfg)
    m = load_manifest(out)
    originals = {p.read_bytes() for p in src.rglob("*.jpg")}
    samples = _all_samples(PreparedData(out, m).shards("labeled") + PreparedData(out, m).shards("unlabeled"))
    assert samples and all("jpg" in s and s["jpg"] in originals for s in samples)


def test_same_config_does_no_work_and_other_config_other_dir(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    out = prepare(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare(cfg) == out
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    other = _cfg(tiny_data, tmp_path, "data.seed=1")
    assert data_dir(other) != out
    # same seed, same split: byte-identical shards
    again = _cfg(tiny_data, tmp_path / "again")
    out2 = prepare(again)
    assert load_manifest(out2)["splits"]["labeled"]["shards"] == load_manifest(out)["splits"]["labeled"]["shards"]


def test_interrupted_prepare_resumes(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    out = prepare(cfg)
    full = load_manifest(out)
    (out / "manifest.json").unlink()
    (out / "unlabeled-000003.tar").unlink()
    (out / ".tmp-unlabeled-000003.tar.xyz").write_bytes(b"half")
    prepare(cfg)
    assert load_manifest(out, verify="sha256")["splits"] == full["splits"]
    assert not list(out.glob(".tmp-*"))


def test_archive_source_reads_members_without_extracting(tiny_data, tmp_path):
    arc = tmp_path / "train.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(tiny_data["train"], arcname="train")
        evil = tarfile.TarInfo("../../evil/x.png")
        data = (tiny_data["train"] / "class_0" / "0000.png").read_bytes()
        evil.size = len(data)
        tf.addfile(evil, io.BytesIO(data))
        link = tarfile.TarInfo("train/class_0/link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    cfg = _cfg(tiny_data, tmp_path, f"data.source={arc}")
    out = prepare(cfg)
    m = load_manifest(out)
    assert m["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert m["splits"]["labeled"]["count"] + m["splits"]["unlabeled"]["count"] == 240
    assert not (tmp_path.parent / "evil").exists() and not Path("evil").exists()


def test_unlabeled_directory_any_layout(tiny_data, tmp_path):
    pool = tmp_path / "pool" / "deep" / "er"
    pool.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(pool / f"{i}.png")
    cfg = _cfg(tiny_data, tmp_path, f"data.unlabeled={tmp_path / 'pool'}")
    out = prepare(cfg)
    m = load_manifest(out)
    samples = _all_samples(PreparedData(out, m).shards("unlabeled"))
    assert len(samples) == 7 and all("cls" not in s for s in samples)
    origins = pq.read_table(out / "sources.parquet").to_pylist()
    pool_origins = sorted(o["origin"] for o in origins if o["split"] == "unlabeled")
    assert len(pool_origins) == 7 and all(o.startswith("deep/er/") for o in pool_origins)


def test_unlabeled_from_existing_shards(tiny_data, tmp_path):
    first = prepare(_cfg(tiny_data, tmp_path))
    pattern = str(first / "unlabeled-{000000..000003}.tar")
    cfg = _cfg(tiny_data, tmp_path, f"data.unlabeled={pattern}", "data.seed=5")
    out = prepare(cfg)
    assert load_manifest(out)["splits"]["unlabeled"]["count"] == 200


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("NS_DATA_ROOT", str(tmp_path / "nothing"))
    cfg = load_config(None, ["data.source=CIFAR100", f"data.root={tmp_path / 'r'}", "data.download=false",
                             f"runs_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        prepare(cfg)
    msg = str(e.value)
    assert "CIFAR100 not found" in msg and str(tmp_path / "r") in msg and "data.root" in msg


def test_fashion_mnist_found_in_shared_data(tmp_path):
    from pipeline.data.sources import data_roots, torchvision_source

    if not any((r / "FashionMNIST" / "raw").is_dir() for r in data_roots(None)):
        pytest.skip("../shared/data not present")
    src = torchvision_source("FashionMNIST", False, None, download=False)
    assert len(src) == 10000 and src.class_names[0] == "T-shirt/top"
    data, ext = src.get(0)
    assert ext == "png" and Image.open(io.BytesIO(data)).size == (28, 28)


def test_torchvision_name_falls_back_to_an_imagefolder_archive(tiny_data, tmp_path):
    """CIFAR10 without torchvision's files but with ``<root>/cifar10/{train,test}.tar.gz`` (the offline
    layout of ../shared/data): the archives are read and nothing is downloaded."""
    import tarfile

    from pipeline.data.sources import torchvision_source

    (tmp_path / "cifar10").mkdir()
    for split in ("train", "test"):
        with tarfile.open(tmp_path / "cifar10" / f"{split}.tar.gz", "w:gz") as tf:
            tf.add(tiny_data[split], arcname=split)
    src = torchvision_source("CIFAR10", True, str(tmp_path), download=False)
    assert src.name.endswith("train.tar.gz") and len(src) == 240 and src.class_names[0] == "class_0"
    assert len(torchvision_source("CIFAR10", False, str(tmp_path), download=False)) == 80


def test_cifar10_found_in_shared_data():
    from pipeline.data.sources import archive_mirror, data_roots, torchvision_source

    if archive_mirror("CIFAR10", False, None) is None or any(
            (r / "cifar-10-batches-py").is_dir() for r in data_roots(None)):
        pytest.skip("../shared/data/cifar10 not present")
    src = torchvision_source("CIFAR10", False, None, download=False)
    assert len(src) == 10000 and src.class_names[:2] == ["airplane", "automobile"]
    data, ext = src.get(0)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (32, 32)


def test_manifest_records_source_and_seed(tiny_data, tmp_path):
    out = prepare(_cfg(tiny_data, tmp_path))
    m = json.loads((out / "manifest.json").read_text())
    assert m["seed"] == 0 and m["config"]["source"].endswith("train")
    assert m["image"]["mode"] == "L" and m["image"]["size"] == [16, 16]
    assert all(len(s["sha256"]) == 64 for s in m["splits"]["test"]["shards"])


def _pool_tars(root: Path) -> tuple[str, dict[str, bytes]]:
    """Three pool shards in the forms users have: plain USTAR with extra members per sample, GNU
    long names, and a gzipped pax archive; one sample has no image. Returns (pattern, origin -> bytes)."""
    import gzip

    rng = np.random.default_rng(3)
    want = {}

    def png(i):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    root.mkdir(parents=True)
    forms = [(tarfile.USTAR_FORMAT, False, "k"), (tarfile.GNU_FORMAT, False, "long-" + "x" * 120),
             (tarfile.PAX_FORMAT, True, "päx-" + "y" * 110)]
    for s, (fmt, gz, stem) in enumerate(forms):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=fmt) as tf:
            for i in range(5):
                key = f"{stem}{i}"
                data = png(i)
                add(tf, f"{key}.json", b"{}")  # a member before the image: the offset is the image's
                add(tf, f"{key}.png", data)
                add(tf, f"{key}.cls", b"1")
                want[f"pool-{s:06d}.tar/{key}"] = data
            add(tf, "noimage.txt", b"no picture here")
        body = raw.getvalue()
        (root / f"pool-{s:06d}.tar").write_bytes(gzip.compress(body) if gz else body)
    return str(root / "pool-{000000..000002}.tar"), want


def _pool_reads(data: PreparedData) -> tuple[dict, list]:
    """What the stages read of the pool: {shard name/key: image bytes}, and the skips."""
    got, skips = {}, []
    for shard, rows in zip(data.shards("unlabeled"), data.rows("unlabeled").values(), strict=True):
        for s in read_shard(shard, rows):
            if isinstance(s, Skip):
                skips.append(s)
            else:
                got[f"{Path(shard).name}/{s['__key__']}"] = s["png"]
    return got, skips


def test_a_pool_of_existing_shards_is_used_in_place(tiny_data, tmp_path):
    """Plain, GNU and PAX tars and a gzipped one: indexed where they are, nothing copied; the stages
    read the original keys and bytes."""
    pattern, want = _pool_tars(tmp_path / "pool")
    cfg = _cfg(tiny_data, tmp_path, f"data.unlabeled={pattern}", "data.max_bad_share=0.1")
    out = prepare(cfg)
    m = load_manifest(out)
    split = m["splits"]["unlabeled"]
    assert split["in_place"] and split["count"] == 15 and m["bad_samples"]["skipped"] == 3
    assert [s["url"] for s in split["shards"]] == [str(tmp_path / "pool" / f"pool-{i:06d}.tar") for i in range(3)]
    assert [s["samples"] for s in split["shards"]] == [6, 6, 6]  # 5 images and one sample without
    assert not list(out.glob("unlabeled-*")) and not list(out.glob(".tmp-*"))
    got, skips = _pool_reads(PreparedData.open(cfg))
    assert got == want and [s.reason for s in skips] == ["no image member (has: txt)"] * 3
    (tmp_path / "pool" / "pool-000001.tar").write_bytes(b"changed")  # not ours to rebuild: named
    with pytest.raises(DataError, match="pool-000001.tar is missing or does not match its manifest: a pool shard"):
        PreparedData.open(cfg)


def test_a_damaged_pool_shard_keeps_the_samples_before_the_damage(tiny_data, tmp_path):
    pattern, want = _pool_tars(tmp_path / "pool")
    first = tmp_path / "pool" / "pool-000000.tar"
    data = first.read_bytes()
    first.write_bytes(data[:len(data) // 2])  # cut in the middle of the shard
    entries, skipped, usable = index_pool(pattern)
    assert 10 < usable < 15 and entries[0]["samples"] < 6
    assert any(s.reason.startswith("damaged tar") and s.where == "pool-000000.tar" for s in skipped)
    out = prepare(_cfg(tiny_data, tmp_path, f"data.unlabeled={pattern}", "data.max_bad_share=0.5"))
    got, skips = _pool_reads(PreparedData(out, load_manifest(out)))
    assert len(got) == usable and set(got) < set(want)
    assert not any("ends early" in s.reason for s in skips)  # the manifest's count is what can be read
