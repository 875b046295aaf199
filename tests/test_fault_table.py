"""One table of damaged inputs, run through every consumer of the sample path (a training stream, the
teacher's labeling pass, evaluation's clean pass and robustness subset, predict): each meets the
same skip, with the same reason, and counts the same samples used and lost."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image

from pipeline.config import PseudoLabelConfig
from pipeline.data.bad_samples import SkipLog
from pipeline.data.dataset import Preprocessing
from pipeline.data.limits import Limits, use
from pipeline.data.shards import write_shard
from pipeline.data.stream import ShardStream, StreamSpec, counted, eval_batches
from pipeline.data.transforms import eval_transform
from pipeline.evaluate.evaluation import TestSet, load_subset
from pipeline.modeling.models import create_model, save_model_dir
from pipeline.pseudo import labeling
from pipeline.serve.predict import predict

N = 8  # samples a shard's manifest promises
SIZE = 16
LIMIT = 64 * 1024  # data.max_member_bytes for the table: far above a 16 px PNG, below the big member
PREP = Preprocessing.of("L", SIZE, [0.5], [0.5])
CLASSES = ["a", "b", "c"]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    make_image(i % 3, np.random.default_rng(i)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(replace: dict[int, dict] | None = None) -> list[dict]:
    out = [{"__key__": f"k{i}", "png": _png(i), "cls": str(i % 3)} for i in range(N)]
    for i, sample in (replace or {}).items():
        out[i] = {"__key__": f"k{i}", **sample}
    return out


def _truncated(d: Path) -> Path:
    path = d / "x-000000.tar"
    write_shard(path, _samples())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 5 // 8 + 100])  # mid-member
    return path


def _bad_bytes(d: Path) -> Path:
    write_shard(d / "x-000000.tar", _samples({3: {"png": b"this is not an image", "cls": "0"}}))
    return d / "x-000000.tar"


def _oversized(d: Path) -> Path:
    big = np.random.default_rng(0).integers(0, 255, 2 * LIMIT, dtype=np.uint8).tobytes()
    write_shard(d / "x-000000.tar", _samples({5: {"png": big, "cls": "1"}}))
    return d / "x-000000.tar"


def _no_image(d: Path) -> Path:
    write_shard(d / "x-000000.tar", _samples({2: {"cls": "2"}}))
    return d / "x-000000.tar"


def _damaged_gzip(d: Path) -> Path:
    write_shard(d / "plain.tar", _samples())
    packed = bytearray(gzip.compress((d / "plain.tar").read_bytes(), compresslevel=1))
    (d / "plain.tar").unlink()
    mid = len(packed) * 5 // 8
    packed[mid:mid + 16] = bytes(16)  # a stretch of the deflate stream zeroed
    path = d / "x-000000.tar.gz"
    path.write_bytes(bytes(packed))
    return path


# fault -> (builder, the start of the reason every consumer gives)
FAULTS = {
    "truncated tar": (_truncated, "damaged tar"),
    "bad image bytes": (_bad_bytes, "not a recognised image format"),
    "oversized member": (_oversized, "member png"),
    "missing image member": (_no_image, "no image member"),
    "damaged gzip": (_damaged_gzip, "damaged tar"),
}


def _summary(metrics: dict) -> tuple[int, int, list[str]]:
    return metrics["used"], metrics["skipped"], sorted(e["reason"] for e in metrics["examples"])


def _training(shard: Path) -> tuple:
    log = SkipLog("train", 1.0, quiet=True)
    spec = StreamSpec(shards=[str(shard)], mode="L", transform=eval_transform(SIZE), rows={shard.name: N})
    list(counted(ShardStream(spec, 0, 3, drop_last=False), log))
    return _summary(log.metrics())


def _labeling(shard: Path, tmp: Path) -> tuple:
    from accelerate import Accelerator

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, len(CLASSES)))
    res = labeling.label_shards(model, [shard], tmp / "pl", shard_rows={shard.name: N}, teacher_sha256="t" * 64,
                                class_names=CLASSES, prep=PREP, opts=PseudoLabelConfig(batch_size=3, workers=0),
                                accelerator=Accelerator(cpu=True), progress=False, max_bad_share=1.0)
    return _summary(res["bad_samples"])


def _evaluation(shard: Path) -> tuple:
    log = SkipLog("evaluate", 1.0, quiet=True)
    list(eval_batches([str(shard)], "L", eval_transform(SIZE), 3, 0, log=log, rows={shard.name: N}))
    images, _ = load_subset(TestSet("test", [shard], [N], CLASSES, "0" * 64), PREP, None, 0)
    assert len(images) == log.used  # the robustness subset leaves out exactly what the clean pass skipped
    return _summary(log.metrics())


def _predict(shard: Path, tmp: Path, model_dir: Path) -> tuple:
    pattern = str(shard.with_name(shard.name.replace("000000", "{000000..000000}")))
    res = predict(model_dir, pattern, tmp / "p.csv", max_bad_share=1.0, progress=False,
                  limits=Limits(max_member_bytes=LIMIT))
    return _summary(res["bad_samples"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model") / "m"
    model = create_model("resnet10t", num_classes=len(CLASSES), in_chans=1).eval()
    save_model_dir(model, d, CLASSES, [0.5], [0.5], SIZE, 1)
    return d


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_consumer_meets_a_damaged_input_the_same_way(fault, tmp_path, model_dir):
    build, reason = FAULTS[fault]
    shard = build(tmp_path)
    use(Limits(max_member_bytes=LIMIT))
    try:
        got = {"training": _training(shard), "labeling": _labeling(shard, tmp_path),
               "evaluation": _evaluation(shard)}
        pred = _predict(shard, tmp_path, model_dir)
    finally:
        use(Limits())
    used, skipped, reasons = got["training"]
    assert 0 < used < N and used + skipped == N, (fault, got)  # every promised sample used or counted lost
    assert reasons and all(r.startswith(reason) for r in reasons), (fault, reasons)
    assert got["labeling"] == got["evaluation"] == got["training"], (fault, got)
    # predict reads shards without a manifest: a damaged tail it cannot size is one lost record
    assert pred[0] == used and pred[2] == reasons, (fault, pred)
    assert pred[1] == (1 if fault in ("truncated tar", "damaged gzip") else skipped), (fault, pred)
