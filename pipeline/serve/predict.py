"""Classify a pile of images with a model directory or its ONNX export, into CSV or Parquet.

Images stream from a directory, a ``.tar``/``.tar.gz`` archive or webdataset shards one batch at
a time (memory is bounded by ``batch_size``) and are preprocessed as the model was trained:
decoded to its mode (L or RGB, converting either way), resized to its size, normalised with its
mean/std, all read from the model's ``config.json`` (for ONNX, the copy beside ``model.onnx``).
An image that cannot be decoded (empty, truncated, not an image) is skipped, never fatal: it is
named in a capped number of warning lines and listed with its reason in ``<out>.skipped.csv``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import failpoints
from pipeline.artifacts import atomic_path, clean_tmp_of, read_json, sha256_file
from pipeline.config import ConfigError
from pipeline.data.archives import archive_members
from pipeline.data.bad_samples import Skip, SkipLog, Tally
from pipeline.data.dataset import Preprocessing
from pipeline.data.limits import Limits, use
from pipeline.data.shards import expand_shards
from pipeline.data.sources import (
    folder_source,
    is_archive,
    is_shard_pattern,
    iter_shard_images,
)
from pipeline.data.stream import batched, decode_or_skip
from pipeline.data.transforms import eval_transform, normalize
from pipeline.errors import DataError
from pipeline.modeling.finite import check_outputs
from pipeline.modeling.models import TIMM_CONFIG, WEIGHTS, load_model_dir, preprocessing
from pipeline.serve.export import ort_session, require_onnx
from pipeline.tracking import bar, log

OUT_FORMATS = (".csv", ".parquet")
MAX_WARNINGS = 20  # bad images named one per line; the rest only counted
SKIPPED_SUFFIX = ".skipped.csv"
FAILED_SUFFIX = ".failed-skipped.csv"  # a stopped run's bad images, beside an earlier run's output and list


@dataclass
class Classifier:
    """A model behind one call: normalised float NCHW batch -> logits (numpy float32)."""

    backend: str  # "torch" or "onnx"
    source: str
    sha256: str  # of the weights or the graph, recorded in Parquet metadata
    prep: Preprocessing
    label_names: list[str]
    logits: Callable[[torch.Tensor], np.ndarray]


def _label_names(config: dict, where: Path) -> list[str]:
    n = int(config["num_classes"])
    names = [str(x) for x in config.get("label_names") or range(n)]
    if len(names) != n:
        raise ConfigError(f"{where}: {len(names)} label_names for {n} classes")
    return names


def _torch_classifier(directory: Path) -> Classifier:
    model, config = load_model_dir(directory)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x.to(device)).float().cpu().numpy()

    return Classifier("torch", str(directory), sha256_file(directory / WEIGHTS), preprocessing(config),
                      _label_names(config, directory), run)


def _onnx_classifier(path: Path) -> Classifier:
    require_onnx("onnxruntime")

    config_path = path.parent / TIMM_CONFIG
    if not config_path.is_file():
        raise ConfigError(f"{path}: needs the model's {TIMM_CONFIG} beside it (stages/export.py puts it there)")
    try:
        config = read_json(config_path)
        prep, names = preprocessing(config), _label_names(config, config_path)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"{config_path}: not a model config ({type(e).__name__}: {e})") from None
    try:
        sess = ort_session(path)
    except Exception as e:  # onnxruntime reports bad files with its own exception types
        raise ConfigError(f"cannot load ONNX model {path}: {str(e).splitlines()[0][:200]}") from None
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> np.ndarray:
        return sess.run(None, {name: x.numpy()})[0]

    return Classifier("onnx", str(path), sha256_file(path), prep, names, run)


def load_classifier(spec: str | Path) -> Classifier:
    """A model directory (PyTorch), an ONNX export directory or a ``.onnx`` file (onnxruntime)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".onnx":
        return _onnx_classifier(path)
    if path.is_dir() and (path / WEIGHTS).is_file():
        return _torch_classifier(path)
    if path.is_dir() and (path / "model.onnx").is_file():
        return _onnx_classifier(path / "model.onnx")
    if not path.exists():
        raise ConfigError(f"model: not found: {spec}")
    raise ConfigError(f"model: {spec} is neither a model directory ({TIMM_CONFIG} + {WEIGHTS}), an ONNX export "
                      f"directory (model.onnx + {TIMM_CONFIG}) nor a .onnx file")


# ---------------------------------------------------------------- inputs

Item = tuple[str, bytes] | Skip  # (name, bytes), or why an input could not be read


def _shard_items(pattern: str, unused: Tally) -> Iterator[Item]:
    """Samples of shards; a sample without an image or a damaged shard's lost tail is a ``Skip``."""
    skipped: list[Skip] = []
    for origin, data, _ in iter_shard_images(pattern, skipped, unused):
        yield from (s for s in skipped if s.count)  # an empty shard held no image to count
        skipped.clear()
        yield origin, data
    yield from (s for s in skipped if s.count)


def _folder_items(path: Path, unused: Tally) -> tuple[Iterator[Item], int]:
    src = folder_source(path, labeled=False)
    unused.merge(src.unused)

    def items() -> Iterator[Item]:
        for s in src.skipped:  # over data.max_member_bytes: never read
            yield Skip("", str(path / s.key), s.reason)
        for i in range(len(src)):
            name = str(path / src.origin(i))
            try:
                yield name, src.get(i)[0]
            except OSError as e:
                yield Skip("", name, f"unreadable: {e.strerror or e}")

    return items(), len(src) + len(src.skipped)


def _archive_items(path: Path, unused: Tally) -> Iterator[Item]:
    for name, data, why in archive_members(path, unused):
        yield Skip("", name, why) if why is not None else (name, data)


def open_input(spec: str) -> tuple[Iterator[Item], int | None, Tally]:
    """(items, count when known, what is passed over) for an image directory, an archive or a shard
    brace pattern. The tally fills as the items are read."""
    unused = Tally()
    if is_shard_pattern(spec):
        missing = [u for u in expand_shards(spec) if "://" not in u and not Path(u).is_file()]
        if missing:
            raise ConfigError(f"input: shard not found: {missing[0]}")
        return _shard_items(spec, unused), None, unused
    path = Path(spec).expanduser()
    if is_archive(path):
        if not path.is_file():
            raise ConfigError(f"input: archive not found: {path}")
        return _archive_items(path, unused), None, unused
    if path.is_dir():
        return (*_folder_items(path, unused), unused)
    raise ConfigError(f"input: '{spec}' is not an image directory, a .tar/.tar.gz archive or a shard pattern")


# ---------------------------------------------------------------- outputs


class _CsvRows:
    def __init__(self, path: Path):
        self.f = open(path, "w", newline="")
        self.w = csv.writer(self.f, lineterminator="\n")
        self.w.writerow(["path", "label", "confidence", "topk_labels", "topk_probs"])

    def write(self, paths, labels, conf, topk_labels, topk_probs) -> None:
        for p, lab, c, tl, tp in zip(paths, labels, conf, topk_labels, topk_probs, strict=True):
            self.w.writerow([p, lab, f"{c:.6f}", ";".join(tl), ";".join(f"{x:.6f}" for x in tp)])

    def close(self) -> None:
        self.f.close()


class _ParquetRows:
    SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string()), ("confidence", pa.float32()),
                        ("topk_labels", pa.list_(pa.string())), ("topk_probs", pa.list_(pa.float32()))])

    def __init__(self, path: Path, meta: dict[bytes, bytes], group: int = 65536):
        self.w = pq.ParquetWriter(path, self.SCHEMA.with_metadata(meta))
        self.group = group
        self.pending: list[pa.RecordBatch] = []
        self.rows = 0

    def write(self, paths, labels, conf, topk_labels, topk_probs) -> None:
        n, k = topk_probs.shape
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        probs = pa.ListArray.from_arrays(offsets, pa.array(topk_probs.astype(np.float32).ravel()))
        self.pending.append(pa.record_batch([pa.array(paths, pa.string()), pa.array(labels, pa.string()),
                                             pa.array(np.asarray(conf, np.float32)),
                                             pa.array(topk_labels, pa.list_(pa.string())), probs],
                                            schema=self.SCHEMA))
        self.rows += len(paths)
        if self.rows >= self.group:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.w.write_table(pa.Table.from_batches(self.pending))
        self.pending, self.rows = [], 0

    def close(self) -> None:
        self.flush()
        self.w.close()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _batches(items: Iterator[Item], prep: Preprocessing, batch_size: int,
             on_bad: Callable[[Skip], None]) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(names, uint8 NCHW batch) of the decodable images, through the stream's decode-or-skip and
    batch stages; every input that is not goes to ``on_bad``."""
    raw = (item if isinstance(item, Skip) else (item[1] or b"", item[0], item[0], "") for item in items)
    for b in batched(decode_or_skip(raw, prep.mode, eval_transform(prep.size)), batch_size, drop_last=False):
        for skip in b.skips:
            on_bad(skip)
        if b.x is not None:
            yield b.keys, b.x


class _BadInputs:
    """Predict's bad inputs: counted as every stage counts them (``SkipLog``), named in a capped
    number of warning lines, and listed for ``<out>.skipped.csv``."""

    def __init__(self, max_bad_share: float, max_warnings: int, shown):
        self.rows: list[tuple[str, str]] = []
        self.log = SkipLog("predict", max_bad_share, quiet=True)
        self.max_warnings, self.shown = max_warnings, shown

    def __call__(self, skip: Skip) -> None:
        name = f"{skip.where}/{skip.key}" if skip.where else skip.key
        self.rows.append((name, skip.reason))
        self.log.skip(skip)
        self.shown.update(skip.count)
        if len(self.rows) <= self.max_warnings:
            log.warning(f"warning: skipped bad image {name}: {skip.reason}")

    def check(self, out: Path) -> None:
        """Past the limit: list this run's bad images beside the output and stop with one line."""
        if self.rows and self.log.share > self.log.limit:
            side = _write_skipped(out, self.rows, FAILED_SUFFIX)
            total = self.log.used + self.log.skipped
            raise DataError(f"predict: {self.log.skipped} of {total} images are bad (limit data.max_bad_share="
                            f"{self.log.limit}); first: {self.rows[0][0]}: {self.rows[0][1]}; all listed in {side}")

    def finish(self, out: Path) -> Path | None:
        """The list of a finished run (none when nothing was bad), and what the warnings left out."""
        side = _write_skipped(out, self.rows)
        out.with_name(out.name + FAILED_SUFFIX).unlink(missing_ok=True)  # a stopped earlier run's
        if len(self.rows) > self.max_warnings:
            log.warning(f"warning: {len(self.rows) - self.max_warnings} more bad images not shown")
        if self.rows:
            total = self.log.used + self.log.skipped
            log.warning(f"warning: skipped {self.log.skipped} bad image(s) of {total}; listed in {side}")
        return side if self.rows else None


def _write_skipped(out: Path, bad: list[tuple[str, str]], suffix: str = SKIPPED_SUFFIX) -> Path:
    side = out.with_name(out.name + suffix)
    if not bad:
        side.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
        return side
    with atomic_path(side) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "error"])
        w.writerows(bad)
    return side


def _write_rows(writer, paths: list[str], probs: np.ndarray, names: list[str], k: int) -> None:
    """One batch's rows: the top label and confidence, and the top-``k`` labels and probabilities."""
    if probs.shape[1] != len(names):
        raise ConfigError(f"model: {probs.shape[1]} outputs but {len(names)} label names in its config")
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    writer.write(paths, [names[i] for i in order[:, 0]], top[:, 0], [[names[i] for i in row] for row in order], top)


def predict(model_spec: str | Path, input_spec: str, out: str | Path, *, topk: int = 5, batch_size: int = 256,
            max_warnings: int = MAX_WARNINGS, max_bad_share: float = 1.0, progress: bool = True,
            limits: Limits | None = None) -> dict:
    """Classify every image of ``input_spec`` into ``out`` (.csv or .parquet); return a summary.

    The output is written under a temporary name and renamed when complete; bad images are listed
    in ``<out>.skipped.csv`` (removed when a run has none). More than ``max_bad_share`` of them
    stops the run with a DataError: no output, and an earlier run's output and list untouched; its
    own bad images go to ``<out>.failed-skipped.csv``, which the error line names.
    """
    out = Path(out)
    if out.suffix.lower() not in OUT_FORMATS:
        raise ConfigError(f"out: must end in {' or '.join(OUT_FORMATS)}, got {out}")
    if topk < 1 or batch_size < 1:
        raise ConfigError("topk and batch_size must be >= 1")
    if limits is not None:  # data.max_image_pixels, data.max_member_bytes; else the ones in force
        use(limits)
    clf = load_classifier(model_spec)
    items, total, unused = open_input(input_spec)
    names = clf.label_names
    k = min(topk, len(names))
    mean, std = torch.tensor(clf.prep.mean), torch.tensor(clf.prep.std)
    done, t0 = 0, time.time()
    shown = bar(progress, total=total, desc=f"predict ({clf.backend})", unit="img")
    bad = _BadInputs(max_bad_share, max_warnings, shown)
    clean_tmp_of(out)  # a killed earlier run's partial file
    with atomic_path(out) as tmp:
        meta = {b"model": clf.source.encode(), b"model_sha256": clf.sha256.encode(),
                b"backend": clf.backend.encode(), b"label_names": json.dumps(names).encode()}
        writer = _CsvRows(tmp) if out.suffix.lower() == ".csv" else _ParquetRows(tmp, meta)
        try:
            for paths, x in _batches(items, clf.prep, batch_size, bad):
                logits = clf.logits(normalize(x, mean, std))
                check_outputs(logits, clf.source, "logits")
                _write_rows(writer, paths, _softmax(logits), names, k)
                done += len(paths)
                bad.log.use(len(paths))
                shown.update(len(paths))
                failpoints.hit("predict_batch", out)
            if not done and not bad.rows:
                raise ConfigError(f"input: no images in {input_spec}")
            bad.check(out)  # past the limit an earlier run's output stays as it was
        finally:
            writer.close()
            shown.close()
    side = bad.finish(out)
    if unused.count:
        log.info(f"predict: {unused.count} inputs not used ({unused.summary()})")
    return {"images": done, "skipped": bad.log.skipped, "bad_samples": bad.log.metrics(), "out": str(out),
            "skipped_file": str(side) if side else None,
            "unused": dict(unused.reasons), "backend": clf.backend, "seconds": round(time.time() - t0, 2)}
