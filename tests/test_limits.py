"""Size limits come from the config that is passed down: a library call from Python reads under its
config's limits, and a DataLoader worker under its stream's, however it was started."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_image, tiny_overrides
from torch.utils.data import DataLoader

from pipeline.data.bad_samples import SkipLog
from pipeline.data.limits import Limits, current, use
from pipeline.data.shards import write_shard
from pipeline.data.stream import ShardStream, StreamSpec, counted
from pipeline.data.transforms import eval_transform
from pipeline.errors import DataError


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    make_image(i % 4, np.random.default_rng(i)).save(buf, format="PNG")
    return buf.getvalue()


def test_rounds_iterate_from_python_reads_under_its_configs_limits(tiny_data, tmp_path):
    from pipeline import rounds
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare

    base = tiny_overrides(tiny_data, tmp_path / "runs") + ["teacher.epochs=1", "teacher.workers=1"]
    prepare(load_config(None, base))  # under the default limits: every 16 x 16 image is in the shards
    low = load_config(None, [*base, "data.max_image_pixels=100"])  # a runtime key: the same prepared data
    try:
        with pytest.raises(DataError, match=r"16 x 16 pixels is over data.max_image_pixels \(100\)"):
            rounds.iterate(low, 0)  # no command layer: the call itself applies its config's limits
        assert current() == Limits.of(low.data)
    finally:
        use(Limits())


def test_a_worker_started_by_spawn_reads_under_its_streams_limits(tmp_path):
    shard = tmp_path / "s-000000.tar"
    write_shard(shard, [{"__key__": f"k{i}", "png": _png(i), "cls": str(i % 4)} for i in range(4)])
    use(Limits(max_image_pixels=100))
    try:
        spec = StreamSpec(shards=[str(shard)], mode="L", transform=eval_transform(16), shuffle=False)
    finally:
        use(Limits())  # this process reads under the defaults again; a spawned worker imports them
    loader = DataLoader(ShardStream(spec, 0, 2, drop_last=False), batch_size=None, num_workers=1,
                        multiprocessing_context="spawn")
    log = SkipLog("test", 1.0, quiet=True)
    assert list(counted(loader, log)) == []
    assert log.skipped == 4 and all("over data.max_image_pixels (100)" in e["reason"] for e in log.examples)
