from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from pipeline.config import load_config
from pipeline.data.dataset import PreparedData
from pipeline.data.prepare import load_manifest, prepare
from pipeline.data.shards import write_shard
from pipeline.data.stream import ShardStream, StreamSpec, assign, epoch_batches
from pipeline.data.transforms import eval_transform


def test_assign_covers_everything_once():
    shards = list(range(7))
    for consumers in (1, 2, 3, 7):
        got = [assign(shards, c, consumers) for c in range(consumers)]
        flat = sorted(s for part, mod, _ in got for s in part)
        assert flat == shards and all(mod == 1 for _, mod, _ in got)
    # fewer shards than consumers: everyone reads every shard, keeps its residue
    got = [assign([0, 1], c, 4) for c in range(4)]
    assert all(part == [0, 1] and mod == 4 for part, mod, _ in got)
    assert sorted(rem for _, _, rem in got) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def prepared(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loaders")
    cfg = load_config(None, tiny_overrides(tiny_data, tmp / "runs"))
    out = prepare(cfg)
    return out, load_manifest(out)


def _keys(spec, epoch, world=1):
    out = []
    for rank in range(world):
        spec.rank, spec.world = rank, world
        stream = ShardStream(spec, epoch, batch_size=3, drop_last=False)
        out.append([int(y) for b in stream if b.x is not None for y in b.y])
    return out


def test_stream_is_seeded_per_epoch_and_split_by_rank(prepared):
    out, m = prepared
    shards = [str(p) for p in PreparedData(out, m).shards("unlabeled")]
    labels = {p: None for p in shards}
    spec = StreamSpec(shards=shards, mode="L", transform=eval_transform(16), seed=3,
                      targets=lambda s: _all_targets(s, labels))
    a, b, c = _keys(spec, 0), _keys(spec, 0), _keys(spec, 1)
    assert a == b and a != c
    ranks = _keys(spec, 0, world=2)
    assert sum(len(r) for r in ranks) == m["splits"]["unlabeled"]["count"]
    assert all(len(r) > 0 for r in ranks)


def _all_targets(shard, _):
    from pipeline.data.shards import iter_samples

    return {s["__key__"]: (1, int(s["__key__"].split("_")[1])) for s in iter_samples(shard)}


def test_epoch_batches_gives_exact_steps_even_from_tiny_shares(tmp_path):
    import io

    import numpy as np
    from conftest import make_image

    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        buf = io.BytesIO()
        make_image(i % 4, rng).save(buf, format="PNG")
        samples.append({"__key__": f"s_{i}", "png": buf.getvalue(), "cls": str(i % 4)})
    write_shard(tmp_path / "x-000000.tar", samples)
    spec = StreamSpec(shards=[str(tmp_path / "x-000000.tar")], mode="L", transform=eval_transform(16))
    batches = list(epoch_batches(spec, 0, steps=4, batch_size=4, workers=0))
    assert len(batches) == 4 and all(x.shape == (4, 1, 16, 16) and x.dtype == torch.uint8 for x, _ in batches)


def test_written_shards_are_deterministic(tmp_path):
    s = [{"__key__": "a_1", "png": b"123", "cls": "2"}]
    r1 = write_shard(tmp_path / "a.tar", s)
    r2 = write_shard(tmp_path / "b.tar", s)
    assert r1["sha256"] == r2["sha256"] and r1["samples"] == 1
    with pytest.raises(ValueError, match="must not contain"):
        write_shard(tmp_path / "c.tar", [{"__key__": "a.b", "png": b"1"}])
    assert not Path(tmp_path / "c.tar").exists()
