"""The shard reader against Python's tarfile on archives other tools write (GNU, pax, gzip)."""

import gzip
import io
import tarfile

import pytest

from pipeline.data.shards import ShardError, iter_samples, write_shard


def _tar(path, fmt, members, compress=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "elsewhere"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def _by_tarfile(path):
    """What tarfile reads: regular members grouped by key the way webdataset does."""
    out = []
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
            ext = base.split(".", 1)[1].lower()
            if not out or out[-1]["__key__"] != key:
                out.append({"__key__": key})
            out[-1][ext] = tf.extractfile(m).read()
    return out


LONG = "d" * 120 + "/" + "k" * 90  # past ustar's 100-byte name field and its prefix rules
MEMBERS = [("a.png", tarfile.REGTYPE, b"x" * 700), ("a.cls", tarfile.REGTYPE, b"3"),
           ("dir", tarfile.DIRTYPE, b""), ("link.png", tarfile.SYMTYPE, b""),
           (f"{LONG}.png", tarfile.REGTYPE, b"y" * 513), (f"{LONG}.cls", tarfile.REGTYPE, b"1"),
           ("sub/é-ü.jpg", tarfile.REGTYPE, b"z" * 512), ("empty.txt", tarfile.REGTYPE, b"")]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [False, True])
def test_reader_reads_what_tarfile_reads(tmp_path, fmt, compress):
    path = _tar(tmp_path / "s.tar", fmt, MEMBERS, compress)
    got = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(path)]
    assert got == _by_tarfile(path)
    assert [s["__key__"] for s in got] == ["a", LONG, "sub/é-ü", "empty"]


def test_reader_refuses_damaged_headers_and_cut_archives(tmp_path):
    path = tmp_path / "s.tar"
    info = write_shard(path, [{"__key__": f"k{i}", "png": b"p" * 600, "cls": "1"} for i in range(3)])
    data = path.read_bytes()
    assert info["samples"] == 3 and len(list(iter_samples(path))) == 3
    bad = bytearray(data)
    bad[2560 + 10] ^= 0xFF  # the second sample's first header (a sample: 2 headers + 1024 + 512 data); k0
    # is then not yielded either: more of its members could have followed
    (tmp_path / "bad.tar").write_bytes(bad)
    with pytest.raises(ShardError, match="before its first sample: bad checksum"):
        list(iter_samples(tmp_path / "bad.tar"))
    for cut, reason in ((2560 + 512 + 100, "unexpected end of data"), (2 * 2560, "no end-of-archive")):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match=reason):
            list(iter_samples(tmp_path / "cut.tar"))


def test_our_shards_read_unchanged_by_webdataset(tmp_path):
    """Shards we write are plain webdataset shards: ``webdataset.WebDataset`` reads back the same
    keys and the same bytes per member as our reader does, in the same order."""
    import webdataset as wds

    samples = [{"__key__": f"unlabeled_{i:08d}", "jpg": bytes([i]) * (100 + i), "cls": str(i % 3),
                "src.txt": f"train/{i}.jpg"} for i in range(7)]
    path = tmp_path / "unlabeled-000000.tar"
    write_shard(path, samples)
    ours = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in iter_samples(path)]
    theirs = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
              for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
    assert ours == theirs and [s["__key__"] for s in ours] == [s["__key__"] for s in samples]
    assert theirs[3]["jpg"] == samples[3]["jpg"] and theirs[3]["cls"] == b"0" and theirs[3]["src.txt"] == b"train/3.jpg"
