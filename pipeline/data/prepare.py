"""The prepare stage: a source becomes labeled / val / unlabeled / test shards plus a manifest.

The output directory is named after a hash of the data config, so the same config finds its
finished shards and does nothing, and a different one never mixes with them. Samples are
shuffled (seeded) before sharding so every shard is a random slice of its split.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline.artifacts import (
    TMP_PREFIX,
    atomic_path,
    clean_tmp,
    code_version,
    read_json,
    sha256_file,
    short_hash,
    write_json_atomic,
)
from pipeline.config import Config, ConfigError
from pipeline.data import limits
from pipeline.data.bad_samples import Skip, SkipLog, Tally
from pipeline.data.dataset import MANIFEST, ORIGINS, TRUTH, data_dir, data_identity, shard_matches
from pipeline.data.image_folder import CLASS_RULE
from pipeline.data.images import BadImage, decode_image, header_mode_size
from pipeline.data.shards import image_bytes, iter_samples, write_shard
from pipeline.data.sources import (
    Source,
    index_pool,
    is_shard_pattern,
    is_torchvision_name,
    labeled_source,
    unlabeled_source,
)
from pipeline.errors import DataError
from pipeline.tracking import bar
from pipeline.tracking import log as tlog

SPLITS = ("labeled", "val", "unlabeled", "test")


def load_manifest(directory: Path, verify: str = "size") -> dict | None:
    """The data manifest if it exists and its shards match (``size`` or full ``sha256``)."""
    mpath = directory / MANIFEST
    if not mpath.is_file():
        return None
    manifest = read_json(mpath)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if not shard_matches(directory, shard, verify):
                return None
    return manifest


_ORIGINS_SCHEMA = pa.schema([("key", pa.string()), ("split", pa.string()), ("shard", pa.string()),
                             ("origin", pa.string())])
_TRUTH_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int32())])


def _table_writer(stack: ExitStack, path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A Parquet writer to a temp file that becomes ``path`` when ``stack`` closes without error."""
    tmp = stack.enter_context(atomic_path(path))
    writer = pq.ParquetWriter(tmp, schema)
    stack.callback(writer.close)  # runs before the rename
    return writer


def _stratified(labels: np.ndarray, per_class: int | None, val_per_class: int, rng: np.random.Generator,
                num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of (labeled, val, rest): per class, ``val_per_class`` then ``per_class`` at random."""
    lab, val, rest = [], [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        need = val_per_class + (per_class or 0)
        if len(idx) < need or (per_class is None and len(idx) <= val_per_class):
            raise ConfigError(f"data.labeled_per_class: class {c} has {len(idx)} images, "
                              f"fewer than the {need} asked for (val_per_class included)")
        val.append(idx[:val_per_class])
        take = idx[val_per_class:] if per_class is None else idx[val_per_class:need]
        lab.append(take)
        rest.append(idx[val_per_class + len(take):])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(lab), cat(val), cat(rest)


def _subset(idx: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    idx = idx.copy()
    rng.shuffle(idx)
    return idx if cap is None else idx[:cap]


def _plan(cfg: Config) -> tuple[dict[str, tuple[Source, np.ndarray, str]], Source, Tally]:
    """For each split to write: (source, indices in write order, key prefix). A pool of existing
    shards has no entry: it is indexed where it is (``_pool_in_place``). Also what the split and the
    caps leave out, counted."""
    d = cfg.data
    rng = np.random.default_rng(d.seed)
    train = labeled_source(d.source, True, d.root, d.download, d.classes)
    if d.test_source is not None:
        test = labeled_source(d.test_source, False, d.root, d.download, d.classes)
    elif is_torchvision_name(d.source):
        test = labeled_source(d.source, False, d.root, d.download, d.classes)
    else:
        raise ConfigError("data.test_source is required when data.source is a directory or archive")
    if test.class_names != train.class_names:
        raise ConfigError(f"test source classes {test.class_names} differ from training classes")
    labels = np.asarray(train.labels)
    per_class = d.labeled_per_class
    lab, val, rest = _stratified(labels, per_class, d.val_per_class, rng, len(train.class_names))
    plan = {"labeled": (train, _subset(lab, None, rng), "train"),
            "val": (train, _subset(val, None, rng), "train")}
    capped = Tally()
    if d.unlabeled == "rest":
        if len(rest) == 0:
            raise ConfigError("data.unlabeled=rest but no images are left after the labeled split")
        plan["unlabeled"] = (train, _subset(rest, d.max_unlabeled, rng), "train")
        capped.add(train.name, "training image past data.max_unlabeled", len(rest) - len(plan["unlabeled"][1]))
    else:
        capped.add(train.name, "training image past data.labeled_per_class + data.val_per_class "
                               "(data.unlabeled is not rest)", len(rest))
        if not is_shard_pattern(d.unlabeled):
            pool = unlabeled_source(d.unlabeled)
            plan["unlabeled"] = (pool, _subset(np.arange(len(pool)), d.max_unlabeled, rng), "pool")
            capped.add(pool.name, "pool image past data.max_unlabeled", len(pool) - len(plan["unlabeled"][1]))
    plan["test"] = (test, _subset(np.arange(len(test)), d.max_test, rng), "test")
    capped.add(test.name, "test image past data.max_test", len(test) - len(plan["test"][1]))
    return plan, train, capped


def _key(prefix: str, i: int) -> str:
    return f"{prefix}_{i:08d}"


def _read(source: Source, i: int, mode: str | None) -> tuple[bytes, str]:
    """Item ``i``'s bytes, decoded once to prove they are an image when the source needs it."""
    try:
        data, ext = source.get(i)
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if source.verify and mode is not None:
        decode_image(data, mode)
    return data, ext


def _note_conversion(data: bytes, shape: tuple, where: str) -> None:
    """Count an image whose header says another mode or size than the dataset's ``shape`` (mode,
    (h, w), tally): it is converted whenever it is read."""
    mode, (h, w), conversions = shape
    found = header_mode_size(data)
    if found is None:  # not PNG or JPEG: PIL reads the header
        try:
            img = Image.open(io.BytesIO(data))
            found = img.mode, img.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return
    kinds = [f"mode {found[0]} -> {mode}"] if found[0] != mode else []
    kinds += [f"size other than {w} x {h}"] if found[1] != (w, h) else []
    if kinds:  # one count an image
        conversions.add(where, " and ".join(kinds))


def _samples(split: str, source: Source, indices: np.ndarray, prefix: str, written: list, shape: tuple,
             log: SkipLog, shown: tqdm):
    """Shard samples of ``indices``; bad images are skipped into ``log``, the written indices
    appended to ``written``, conversions counted in ``shape``'s tally."""
    for i in indices.tolist():
        shown.update(1)
        try:
            data, ext = _read(source, i, shape[0])
        except BadImage as e:
            log.skip(Skip(source.origin(i), _key(prefix, i), str(e)))
            continue
        if source.verify:
            _note_conversion(data, shape, source.origin(i))
        sample = {"__key__": _key(prefix, i), ext: data}
        if source.labels is not None and split != "unlabeled":  # the pool's labels stay out of shards
            sample["cls"] = str(source.labels[i])
        written.append(i)
        log.use(1)
        yield sample


def _written(path: Path, prefix: str, shape: tuple) -> list[int]:
    """Source indices of the samples in a finished shard (from its keys); their conversions counted."""
    out = []
    for s in iter_samples(path):
        if s["__key__"].startswith(prefix):
            out.append(int(s["__key__"].rsplit("_", 1)[1]))
            data = image_bytes(s)
            if isinstance(data, bytes):  # not a member passed over by a since-lowered data.max_member_bytes
                _note_conversion(data, shape, f"{path.name}/{s['__key__']}")
    return out


def _probe_mode(source: Source, indices: np.ndarray, sample: int = 200) -> tuple[str, tuple[int, int]]:
    """Image mode ("L" or "RGB") and size (h, w) of the dataset: the most common among a seeded
    sample of labeled images (headers only), so one odd image cannot decide them; the others are
    converted when read."""
    modes: Counter = Counter()
    sizes: Counter = Counter()
    pick = indices if len(indices) <= sample else np.random.default_rng(0).choice(indices, sample, replace=False)
    for i in pick.tolist():
        try:
            img = Image.open(io.BytesIO(source.get(i)[0]))  # the header: no pixels decoded
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
        modes["L" if img.mode in ("L", "1", "I;16", "I") else "RGB"] += 1
        sizes[img.size[::-1]] += 1
    if not modes:
        raise DataError(f"{source.name}: none of {len(pick)} sampled labeled images can be read")
    return modes.most_common(1)[0][0], sizes.most_common(1)[0][0]


def _channel_stats(source: Source, indices: np.ndarray, mode: str, limit: int = 5000) -> tuple[list, list]:
    """Per-channel pixel mean and std (in [0, 1]) of up to ``limit`` labeled images (bad ones skipped)."""
    total, sq, n = 0.0, 0.0, 0
    for i in indices[:limit].tolist():
        try:
            a = np.asarray(decode_image(source.get(i)[0], mode), dtype=np.float64) / 255.0
        except (BadImage, OSError):
            continue
        a = a.reshape(-1, 1 if mode == "L" else 3)
        total, sq, n = total + a.sum(0), sq + (a * a).sum(0), n + len(a)
    if n == 0:
        raise DataError(f"{source.name}: no labeled image can be decoded")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 1e-12))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def prepare(cfg: Config) -> Path:
    """Write the shards and manifest for ``cfg.data`` unless a matching manifest already exists."""
    limits.use(limits.Limits.of(cfg.data))
    out = data_dir(cfg)
    clean_tmp(out)  # what a killed run left, finished or not
    if load_manifest(out, verify="sha256") is not None:
        return out
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():  # finished once, damaged since: rebuild what no longer matches
        for split in read_json(out / MANIFEST)["splits"].values():
            for shard in split["shards"]:
                p = out / shard["file"]
                if "url" not in shard and p.is_file() and not shard_matches(out, shard, "sha256"):
                    p.unlink()
    shutil.rmtree(out / f"{TMP_PREFIX}pool", ignore_errors=True)  # copies made by earlier versions
    return _prepare(cfg, out, time.time())


def _prepare(cfg: Config, out: Path, t0: float) -> Path:
    plan, train, unused = _plan(cfg)
    try:
        return _write(cfg, out, plan, train, unused, t0)
    finally:
        for source, _, _ in plan.values():
            source.close()


def _write(cfg: Config, out: Path, plan: dict, train: Source, unused: Tally, t0: float) -> Path:
    mode, image_size = _probe_mode(train, plan["labeled"][1])
    sources = {id(src): src for src, _, _ in plan.values()}.values()
    total = sum(len(ix) for _, ix, _ in plan.values())
    log = SkipLog("prepare", cfg.data.max_bad_share, expected=total + sum(k.count for s in sources for k in s.skipped))
    for source in sources:
        log.extend(source.skipped)
        unused.merge(source.unused)
    shape = (mode, image_size, Tally())
    splits: dict[str, dict] = {}
    num_classes = len(train.class_names)
    size = cfg.data.shard_size
    has_truth = "unlabeled" in plan and plan["unlabeled"][0].labels is not None  # the pool's labels, kept aside
    with ExitStack() as stack:  # origins and truth tables written a shard at a time, renamed at the end
        shown = stack.enter_context(bar(cfg.progress, total=total, desc=f"prepare {out.name}", unit="img"))
        origins = _table_writer(stack, out / ORIGINS, _ORIGINS_SCHEMA)
        truth = _table_writer(stack, out / TRUTH, _TRUTH_SCHEMA) if has_truth else None
        for split, (source, indices, prefix) in plan.items():
            shards, kept = [], []
            for s in range(math.ceil(len(indices) / size)):
                chunk = indices[s * size:(s + 1) * size]
                path = out / f"{split}-{s:06d}.tar"
                entry, written = _shard(path, split, source, chunk, prefix, shape, log, shown)
                if not written:
                    path.unlink(missing_ok=True)
                    continue
                shards.append(entry)
                kept += written
                keys = [_key(prefix, i) for i in written]
                origins.write_table(pa.table({"key": keys, "split": [split] * len(written),
                                              "shard": [path.name] * len(written),
                                              "origin": [source.origin(i) for i in written]}, _ORIGINS_SCHEMA))
                if split == "unlabeled" and truth is not None:  # kept aside, never in shards
                    truth.write_table(pa.table({"key": keys, "label": [source.labels[i] for i in written]},
                                               _TRUTH_SCHEMA))
            per_class = None
            if source.labels is not None:
                per_class = np.bincount(np.asarray(source.labels)[np.asarray(kept, dtype=np.int64)],
                                        minlength=num_classes).tolist()
            splits[split] = {"count": len(kept), "per_class": per_class, "shards": shards,
                             "source": source.name}
        if "unlabeled" not in plan:
            splits["unlabeled"] = _pool_in_place(cfg, log, unused)
        log.check()
    _report(unused, shape[2])
    splits = {k: splits[k] for k in SPLITS if k in splits}
    mean, std = _channel_stats(plan["labeled"][0], plan["labeled"][1], mode)
    manifest = {
        "kind": "data", "config": data_identity(cfg.data), "seed": cfg.data.seed,
        "class_names": train.class_names, "num_classes": num_classes,
        "image": {"mode": mode, "size": list(image_size), "mean": mean, "std": std},
        "splits": splits, "bad_samples": log.metrics(), "unused": unused.metrics(),
        "conversions": shape[2].metrics(), "code_version": code_version(),
        "seconds": round(time.time() - t0, 1),
    }
    manifest["origins"] = {"file": ORIGINS, "sha256": sha256_file(out / ORIGINS)}
    if truth is not None:
        manifest["unlabeled_truth"] = {"file": TRUTH, "sha256": sha256_file(out / TRUTH)}
    write_json_atomic(out / MANIFEST, manifest)
    return out


def _report(unused: Tally, conversions: Tally) -> None:
    """One line each for inputs passed over and images converted (the manifest lists them)."""
    if unused.count:
        tlog.info(f"prepare: {unused.count} inputs not used ({unused.summary()}); listed in the manifest's unused")
    if conversions.count:
        tlog.info(f"prepare: {conversions.count} images differ from the dataset's mode or size and are converted "
                  f"when read ({conversions.summary()}); listed in the manifest's conversions")


def _pool_in_place(cfg: Config, log: SkipLog, unused: Tally) -> dict:
    """The unlabeled split as existing shards, indexed where they are (``sources.index_pool``)."""
    d = cfg.data
    entries, skipped, usable = index_pool(d.unlabeled, d.pool_check == "sha256", d.max_unlabeled, unused)
    if log.expected is not None:  # the pool's samples count in the share its skips are judged against
        log.expected += usable + sum(k.count for k in skipped)
    log.use(usable)
    log.extend(skipped)
    return {"count": usable, "per_class": None, "shards": entries, "source": d.unlabeled, "in_place": True}


def _shard(path: Path, split: str, source: Source, chunk, prefix: str, shape: tuple, log: SkipLog, shown
           ) -> tuple[dict, list[int]]:
    """Write one shard of ``chunk`` (or adopt it, finished by an earlier interrupted run of this same
    config); returns its manifest entry and the source indices it holds."""
    written: list[int] = []
    if not path.is_file():
        return write_shard(path, _samples(split, source, chunk, prefix, written, shape, log, shown)), written
    written = _written(path, prefix, shape)
    log.use(len(written))
    if len(written) < len(chunk):  # bad samples left out when it was written
        log.skip(Skip(path.name, "-", "bad samples left out by an earlier run", len(chunk) - len(written)))
    shown.update(len(chunk))
    return {"file": path.name, "samples": len(written), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}, written


def prepare_test(spec: str, cfg: Config, progress: bool = True) -> tuple[Path, dict]:
    """A test set from anything prepare reads: a prepared data directory (its test split), or a
    torchvision name (its test split), ImageFolder directory or archive written as test shards."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = load_manifest(path)
        if manifest is None:
            raise ConfigError(f"test={spec}: the prepared data there is incomplete or changed")
        return path, manifest
    identity = {"test": spec if is_torchvision_name(spec) else str(path.resolve()), "class_rule": CLASS_RULE,
                "classes": cfg.data.classes,
                "mtime": None if is_torchvision_name(spec) else path.stat().st_mtime_ns if path.exists() else None}
    slug = re.sub(r"[^A-Za-z0-9]+", "_", path.name.split(".")[0]).strip("_").lower()
    out = Path(cfg.runs_dir) / "data" / f"test-{slug or 'data'}-{short_hash(identity)}"
    clean_tmp(out)
    manifest = load_manifest(out)
    if manifest is not None:
        return out, manifest
    source = labeled_source(spec, False, cfg.data.root, cfg.data.download, cfg.data.classes)
    out.mkdir(parents=True, exist_ok=True)
    clean_tmp(out)
    indices = np.arange(len(source))
    mode, image_size = _probe_mode(source, indices)
    shape = (mode, image_size, Tally())
    log = SkipLog("prepare test", cfg.data.max_bad_share, expected=len(indices) + sum(k.count for k in source.skipped))
    log.extend(source.skipped)
    size = cfg.data.shard_size
    shards, written = [], []
    with bar(progress, total=len(indices), desc=f"prepare {out.name}", unit="img") as shown:
        for s in range(math.ceil(len(indices) / size)):
            chunk = indices[s * size:(s + 1) * size]
            shards.append(write_shard(out / f"test-{s:06d}.tar",
                                      _samples("test", source, chunk, "test", written, shape, log, shown)))
    log.check()
    _report(source.unused, shape[2])
    manifest = {"kind": "data", "config": identity, "class_names": source.class_names,
                "num_classes": len(source.class_names),
                "splits": {"test": {"count": len(written), "shards": shards, "source": source.name,
                                    "per_class": np.bincount(np.asarray(source.labels)[np.asarray(written, dtype=np.int64)],
                                                             minlength=len(source.class_names)).tolist()}},
                "bad_samples": log.metrics(), "unused": source.unused.metrics(),
                "conversions": shape[2].metrics(), "code_version": code_version()}
    write_json_atomic(out / MANIFEST, manifest)
    return out, manifest
