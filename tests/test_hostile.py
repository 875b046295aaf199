"""Fault injection, hostile files: nothing a user's data or config names is unpickled, executed by a
shell or written outside where we write."""

from __future__ import annotations

import functools
import http.server
import io
import pickle
import re
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_image, stage

from pipeline.config import ConfigError
from pipeline.data.remote import fetch_command
from pipeline.data.shards import ShardError, iter_samples, write_shard
from pipeline.data.stream import StreamSpec, eval_batches
from pipeline.data.transforms import eval_transform


def _png(label: int = 0, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(label, np.random.default_rng(seed)).save(buf, format="PNG")
    return buf.getvalue()


class _Boom:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_pipe_urls_never_reach_a_shell(tmp_path):
    marker = tmp_path / "PWNED"
    spec = f"pipe:touch {marker}_{{1..2}}.tar"
    r = stage("prepare_data.py", f"runs_dir={tmp_path}", f"data.unlabeled={spec}", check=False)
    assert r.returncode == 2 and "'pipe:' commands are refused" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("PWNED*"))
    with pytest.raises(ConfigError, match="refused"):
        list(iter_samples(f"pipe:touch {marker}.tar"))
    assert not list(tmp_path.glob("PWNED*"))


def test_remote_urls_use_a_fixed_command_with_the_url_as_one_argument():
    url = "https://example.com/a b/shard-000001.tar'; rm -rf / #"
    argv = fetch_command(url)
    assert argv[0] == "curl" and argv[-1] == url and argv[-2] == "--"
    s3 = fetch_command("s3://bucket/x-000001.tar")
    assert s3[:3] == ["aws", "s3", "cp"] and "s3://bucket/x-000001.tar" in s3 and s3[-1] == "-"
    assert fetch_command("gs://b/x.tar")[-1] == "gs://b/x.tar"
    assert fetch_command("/data/x.tar") is None and fetch_command("file:///data/x.tar") is None
    with pytest.raises(ConfigError, match="unsupported scheme 'ftp'"):
        fetch_command("ftp://host/x.tar")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_http_shards_stream_through_curl(tmp_path):
    write_shard(tmp_path / "s-000000.tar", [{"__key__": f"k{i}", "png": _png(i % 4, i), "cls": str(i % 4)}
                                            for i in range(6)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert [s["__key__"] for s in iter_samples(f"{base}/s-000000.tar")] == [f"k{i}" for i in range(6)]
        with pytest.raises(ShardError, match="curl exited with 22"):
            list(iter_samples(f"{base}/missing-000000.tar"))
        # a pool in a bucket: indexed where it is (streamed once to count it), never copied
        from pipeline.data.sources import index_pool

        entries, skipped, usable = index_pool(f"{base}/{{s,missing}}-000000.tar")
        assert [(e["url"], e["samples"], e["sha256"]) for e in entries] == [(f"{base}/s-000000.tar", 6, None)]
        assert usable == 6 and not list(tmp_path.glob("cache*"))
        (miss,) = skipped
        assert miss.where == "missing-000000.tar" and "curl exited with 22" in miss.reason
    finally:
        server.shutdown()
        server.server_close()


def test_pickle_members_of_a_shard_are_never_unpickled(tmp_path):
    target = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(target))
    shard = tmp_path / "evil-000000.tar"
    write_shard(shard, [{"__key__": "a", "png": _png(), "cls": "1", "pyd": payload, "pickle": payload},
                        {"__key__": "b", "pyd": payload, "cls": "2"}])
    spec_batches = list(eval_batches([str(shard)], "L", eval_transform(16), 4, 0))
    assert sum(len(x) for x, _ in spec_batches) == 1  # "b" has no image: skipped, its payload untouched
    assert not target.exists()
    StreamSpec(shards=[str(shard)], mode="L", transform=eval_transform(16))  # picklable spec, no payloads in it


def test_archive_members_outside_the_tree_are_never_read_or_written(tmp_path):
    from pipeline.data.archives import archive_members
    from pipeline.data.bad_samples import Tally
    from pipeline.data.sources import archive_source

    arc = tmp_path / "pool.tar"
    with tarfile.open(arc, "w") as tf:
        for name in ("ok/a.png", "../escape.png", "/abs.png", "ok/../../up.png"):
            data = _png()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("ok/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    unused = Tally()
    assert [n for n, _, _ in archive_members(arc, unused)] == ["ok/a.png"]
    assert unused.reasons == {"archive member with an unsafe name": 3, "archive member that is a link or device": 1}
    src = archive_source(arc, labeled=False)
    assert len(src) == 1 and src.origin(0) == "ok/a.png" and src.unused.reasons == unused.reasons
    assert not (tmp_path.parent / "escape.png").exists() and not Path("/abs.png").exists()


def test_model_directories_load_safetensors_only(tmp_path):
    from pipeline.modeling.models import load_model_dir

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"architecture": "resnet10t", "num_classes": 4}')
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(tmp_path / "unpickled")))
    with pytest.raises(ConfigError, match="needs config.json and model.safetensors"):
        load_model_dir(d)
    # a pickle under the safetensors name is refused as weights, never unpickled
    (d / "model.safetensors").write_bytes(pickle.dumps(_Boom(tmp_path / "unpickled")))
    with pytest.raises(ConfigError, match=r"model.safetensors: cannot be loaded as resnet10t weights in safetensors"):
        load_model_dir(d)
    assert not (tmp_path / "unpickled").exists()


UNSAFE = [
    (r"\bpickle\.loads?\(", "pickle"),
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
    (r"yaml\.load\(", "yaml.load (use safe_load)"),
    (r"shell=True", "a shell"),
    (r"os\.system\(|os\.popen\(", "a shell"),
    (r"(?<![.\w])(eval|exec)\(", "eval/exec"),
    (r"register_for_checkpointing", "accelerate's pickled custom checkpoints"),
    (r"wds\.gopen|gopen\(", "webdataset's opener (runs pipe: URLs in a shell)"),
    (r"\.extractall\(", "archive extraction"),
]


@pytest.mark.parametrize("pattern,what", UNSAFE)
def test_the_code_has_no_unsafe_call(pattern, what):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "pipeline").rglob("*.py")) + sorted(
        (ROOT / "stages").glob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert not hits, f"{what}: {hits}"
