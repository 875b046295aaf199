"""Pseudo labels: the un-noised teacher labels unlabeled shards, one Parquet file per shard.

``unlabeled-000042.tar`` gets ``pseudo_labels/unlabeled-000042.parquet`` with that shard's rows in
the shard's order (key, shard, label, confidence, probs) and file metadata naming the teacher
(sha256 of its weights) and the class names. Ranks split the work by shard and a finished shard
is a finished file, so a killed job resumes by skipping files that validate.

The student side reads only the small columns across all files to filter and balance, producing
per-shard repeat counts; each shard's probabilities are read when its shard is streamed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from . import failpoints, precision
from .artifacts import atomic_path, clean_tmp, code_version, read_json, sha256_file, write_json_atomic
from .bad_samples import Skip, SkipLog
from .config import ConfigError, StudentConfig
from .images import BadImage
from .shards import ShardError, image_bytes, iter_samples
from .transforms import to_input

MANIFEST = "manifest.json"


def parquet_name(shard: str | Path) -> str:
    return Path(shard).name.rsplit(".tar", 1)[0] + ".parquet"


def schema(num_classes: int) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("label", pa.int32()),
                      ("confidence", pa.float32()), ("probs", pa.list_(pa.float32(), num_classes))])


def write_parquet(path: Path, shard: str, keys: list[str], probs: np.ndarray, teacher_sha256: str,
                  class_names: list[str], tta: bool = False, skipped: list[Skip] | None = None,
                  dtype: str = "fp32") -> None:
    """One shard's pseudo labels, written atomically (probs: float32 [n, C], softmax at T=1).

    ``dtype``: the precision the teacher's forward pass ran in (fp32, bf16, fp16), recorded.

    ``skipped``: the shard's samples that could not be labeled (bad images); their keys and the
    reason go into the file's metadata, so rows + skipped always account for the whole shard.
    """
    n, c = probs.shape if probs.size else (0, len(class_names))
    probs = probs.astype(np.float32, copy=False).reshape(n, c)
    label = probs.argmax(1).astype(np.int32) if n else np.zeros(0, np.int32)
    conf = probs.max(1) if n else np.zeros(0, np.float32)
    flat = pa.array(probs.reshape(-1), pa.float32())
    table = pa.table([pa.array(keys, pa.string()), pa.array([Path(shard).name] * n, pa.string()),
                      pa.array(label), pa.array(conf, pa.float32()),
                      pa.FixedSizeListArray.from_arrays(flat, c)], schema=schema(c))
    meta = {b"teacher_sha256": teacher_sha256.encode(), b"class_names": json.dumps(class_names).encode(),
            b"tta": b"hflip" if tta else b"none", b"precision": dtype.encode(),
            b"skipped": json.dumps([{"key": s.key, "reason": s.reason, "count": s.count}
                                    for s in skipped or []]).encode()}
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=65536)
        failpoints.hit("parquet_write")


def read_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    skipped = json.loads(md.get(b"skipped", b"[]").decode())
    return {"teacher_sha256": md.get(b"teacher_sha256", b"").decode(),
            "class_names": json.loads(md.get(b"class_names", b"null").decode()),
            "tta": md.get(b"tta", b"none").decode() == "hflip",
            "precision": md.get(b"precision", b"fp32").decode(),
            "rows": pq.ParquetFile(path).metadata.num_rows, "skipped": skipped,
            "skipped_count": sum(int(x.get("count", 1)) for x in skipped)}


def validates(path: Path, rows: int, teacher_sha256: str, class_names: list[str], tta: bool = False) -> bool:
    """A finished file for this shard and this teacher (used to skip work on rerun)."""
    if not path.is_file():
        return False
    try:
        meta = read_meta(path)
    except (OSError, pa.ArrowException, ValueError):
        return False
    return (meta["rows"] + meta["skipped_count"] == rows and meta["teacher_sha256"] == teacher_sha256
            and meta["class_names"] == class_names and meta["tta"] == tta)


class _ShardBatches(IterableDataset):
    """Batches of one shard at a time, tagged (shard index, keys, images, is last batch, skips).

    A bad sample (no image, undecodable, a damaged shard's lost tail) is not labeled; it travels
    as a ``Skip`` with the batch so the writer can record it in the shard's file and count it.
    """

    def __init__(self, shards: list[str], mode: str, transform, batch_size: int, rows: dict[str, int]):
        self.shards, self.mode, self.transform, self.batch_size = shards, mode, transform, batch_size
        self.rows = rows

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        indices = list(range(len(self.shards)))[wid::n]
        for si in indices:
            name = Path(self.shards[si]).name
            raw: list[tuple[str, bytes]] = []
            skips: list[Skip] = []
            pos = 0
            try:
                for sample in iter_samples(self.shards[si]):
                    pos += 1
                    data = image_bytes(sample)
                    if data is None:
                        skips.append(Skip(name, sample["__key__"], "no image member"))
                        continue
                    raw.append((sample["__key__"], data))
                    if len(raw) == self.batch_size:
                        keys, imgs = self._decode(raw, name, skips)
                        if keys:
                            yield si, keys, torch.stack(imgs), False, skips
                            skips = []
                        raw = []
            except ShardError as e:
                skips.append(Skip(name, f"after {e.after}" if e.after else "-", f"damaged tar: {e.reason}",
                                  max(1, self.rows.get(name, pos) - pos)))
            else:
                if pos < self.rows.get(name, pos):
                    skips.append(Skip(name, "-", f"shard ends early ({pos} of {self.rows[name]} samples)",
                                      self.rows[name] - pos))
            keys, imgs = self._decode(raw, name, skips)
            yield si, keys, torch.stack(imgs) if imgs else torch.zeros(0, dtype=torch.uint8), True, skips

    def _decode(self, raw: list[tuple[str, bytes]], name: str, skips: list[Skip]) -> tuple[list[str], list]:
        """Decode a batch read beforehand: reading and decoding in separate loops is faster than
        alternating them (each keeps its code and data in cache)."""
        keys, imgs = [], []
        for key, data in raw:
            try:
                imgs.append(to_input(data, self.mode, self.transform))
            except (BadImage, OSError, ValueError) as e:
                skips.append(Skip(name, key, str(e)))
                continue
            keys.append(key)
        return keys, imgs


def label_shards(model: torch.nn.Module, shards: list[Path], out_dir: Path, *, shard_rows: dict[str, int],
                 teacher_sha256: str, class_names: list[str], prep: dict, batch_size: int, workers: int,
                 accelerator, progress: bool = True, tta: bool = False, max_bad_share: float = 0.01,
                 mixed_precision: str = "auto", channels_last: bool = False, compile: bool | str = False) -> dict:
    """Label this rank's unfinished shards; returns this rank's {"samples", "seconds", "precision"}.

    ``tta``: average the softmax of each image and its mirror image (flip test-time augmentation,
    no noise): on Fashion-MNIST it made the round-0 teacher's test top-1 +0.5 points better.
    ``mixed_precision`` (``precision.resolve``), ``channels_last`` and ``compile`` change speed;
    the precision used is recorded in each file.
    """
    from .transforms import eval_transform, normalize

    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        clean_tmp(out_dir)
    accelerator.wait_for_everyone()
    mine = [s for s in sorted(shards)][accelerator.process_index::accelerator.num_processes]
    todo = [str(s) for s in mine if not validates(out_dir / parquet_name(s), shard_rows[Path(s).name],
                                                  teacher_sha256, class_names, tta)]
    device = accelerator.device
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision.compile_model(model, compile)
    dtype = precision.resolve(mixed_precision, device, inference=True)
    mean = torch.tensor(prep["mean"], device=device)
    std = torch.tensor(prep["std"], device=device)
    total = sum(shard_rows[Path(s).name] for s in todo)
    log = SkipLog("pseudo_label" + (f" (rank {accelerator.process_index})" if accelerator.num_processes > 1 else ""),
                  max_bad_share, expected=total)
    done, t0 = 0, time.time()
    if todo:
        ds = _ShardBatches(todo, prep["mode"], eval_transform(prep["size"]), batch_size, shard_rows)
        loader = DataLoader(ds, batch_size=None, num_workers=min(workers, len(todo)),
                            pin_memory=torch.cuda.is_available())
        pending: dict[int, tuple[list, list, list]] = {}
        autocast = precision.autocast(dtype, device)
        bar = tqdm(total=total, desc=f"pseudo-label rank {accelerator.process_index}", unit="img",
                   disable=not progress, smoothing=0.1)
        with torch.inference_mode(), autocast:
            for si, keys, imgs, last, skips in loader:
                keys_acc, probs_acc, skips_acc = pending.setdefault(si, ([], [], []))
                skips_acc.extend(skips)
                log.extend(skips)
                if len(keys):
                    x = normalize(imgs.to(device, non_blocking=True), mean, std, channels_last)
                    p = torch.softmax(model(x).float(), dim=1)
                    if tta:
                        p = (p + torch.softmax(model(x.flip(3)).float(), dim=1)) / 2
                    probs_acc.append(p.cpu().numpy())
                    keys_acc.extend(keys)
                    done += len(keys)
                    log.use(len(keys))
                    bar.update(len(keys))
                    failpoints.hit("pseudo_label_batch")
                if last:
                    keys_acc, probs_acc, skips_acc = pending.pop(si)
                    probs = np.concatenate(probs_acc) if probs_acc else np.zeros((0, len(class_names)), np.float32)
                    write_parquet(out_dir / parquet_name(todo[si]), todo[si], keys_acc, probs,
                                  teacher_sha256, class_names, tta, skips_acc, dtype)
        bar.close()
    log.check()
    return {"samples": done, "seconds": time.time() - t0, "bad_samples": log.metrics(), "precision": dtype}


def summarize(out_dir: Path, shards: list[Path], num_classes: int, truth_path: Path | None) -> dict:
    """Stats over all files: count, class histogram, mean confidence, accuracy if truth kept aside.

    Reads one shard's file at a time; the truth (key, label) is joined in Arrow, never as Python
    objects, so memory stays small next to the pool.
    """
    truth = None
    if truth_path is not None and truth_path.is_file():
        truth = pq.read_table(truth_path, columns=["key", "label"]).rename_columns(["key", "true"])
    hist = np.zeros(num_classes, np.int64)
    n, conf_sum = 0, 0.0
    thresholds = (0.3, 0.5, 0.7, 0.9)
    hits = np.zeros(1 + len(thresholds), np.int64)  # correct: all known, then at each threshold
    seen = np.zeros(1 + len(thresholds), np.int64)
    for s in sorted(shards):
        t = pq.read_table(out_dir / parquet_name(s), columns=["key", "label", "confidence"])
        labels, conf = t.column("label").to_numpy(), t.column("confidence").to_numpy()
        hist += np.bincount(labels, minlength=num_classes)
        n += len(labels)
        conf_sum += float(conf.sum(dtype=np.float64))
        if truth is not None and len(labels):
            j = t.join(truth, "key", join_type="inner")
            ok = j.column("label").to_numpy() == j.column("true").to_numpy()
            jc = j.column("confidence").to_numpy()
            for i, thr in enumerate((0.0, *thresholds)):
                sel = jc >= thr
                hits[i] += int(ok[sel].sum())
                seen[i] += int(sel.sum())
    stats = {"samples": n, "mean_confidence": conf_sum / n if n else None, "class_histogram": hist.tolist()}
    if seen[0]:
        stats["accuracy"] = float(hits[0] / seen[0] * 100)
        stats["accuracy_at_threshold"] = {str(thr): float(hits[i + 1] / seen[i + 1] * 100) if seen[i + 1] else None
                                          for i, thr in enumerate(thresholds)}
    return stats


def write_manifest(out_dir: Path, shards: list[Path], teacher_dir: Path, teacher_sha256: str,
                   class_names: list[str], stats: dict, data_manifest_sha: str, tta: bool = False) -> dict:
    files = []
    for s in sorted(shards):
        meta = read_meta(out_dir / parquet_name(s))
        files.append({"file": parquet_name(s), "shard": Path(s).name, "rows": meta["rows"],
                      "skipped": meta["skipped_count"], "precision": meta["precision"], "sha256": sha256_file(out_dir / parquet_name(s))})
    stats = {**stats, "skipped": sum(f["skipped"] for f in files)}  # bad samples, named in each file's metadata
    manifest = {"kind": "pseudo_labels", "teacher": str(teacher_dir), "teacher_sha256": teacher_sha256,
                "class_names": class_names, "tta": "hflip" if tta else "none",
                "data_manifest_sha256": data_manifest_sha, "files": files,
                "stats": stats, "code_version": code_version()}
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def check(out_dir: Path, shard_rows: dict[str, int], teacher_sha256: str, class_names: list[str],
          tta: bool = False, shard_keys: Mapping[str, list[str]] | Iterable[tuple[str, list[str]]] | None = None
          ) -> dict:
    """Raise ConfigError unless the pseudo labels match these shards, this teacher and these classes.

    Checks the manifest and every file it lists against its sha256; with ``shard_keys`` (shard ->
    its keys in order, a mapping or a stream of pairs) also that each file holds exactly that
    shard's keys, bad samples aside. A stream is read once, one shard at a time.
    """
    mpath = out_dir / MANIFEST
    if not mpath.is_file():
        raise ConfigError(f"pseudo labels not found: {mpath} (run stages/pseudo_label.py first)")
    manifest = read_json(mpath)
    if manifest["teacher_sha256"] != teacher_sha256:
        raise ConfigError(f"pseudo labels in {out_dir} were made by another teacher "
                          f"(teacher_sha256 {manifest['teacher_sha256'][:12]}, expected {teacher_sha256[:12]})")
    if len(manifest["class_names"]) != len(class_names):
        raise ConfigError(f"pseudo labels in {out_dir} have {len(manifest['class_names'])} classes, "
                          f"the data has {len(class_names)}")
    if manifest["class_names"] != class_names:
        raise ConfigError(f"pseudo labels in {out_dir} have classes {manifest['class_names']}, "
                          f"the data has {class_names}")
    if (manifest.get("tta", "none") == "hflip") != tta:
        raise ConfigError(f"pseudo labels in {out_dir} were made with pseudo_label.tta={not tta}; this run asks "
                          f"{tta}: delete them or give a new name=...")
    listed = {f["shard"]: f for f in manifest["files"]}
    for shard, rows in shard_rows.items():
        f = listed.get(shard)
        if f is None:
            raise ConfigError(f"pseudo labels in {out_dir} lack shard {shard}")
        if f["rows"] + f.get("skipped", 0) != rows:
            raise ConfigError(f"pseudo labels for {shard} have {f['rows']} rows, the shard has {rows}")
        path = out_dir / f["file"]
        if not path.is_file() or sha256_file(path) != f["sha256"]:
            raise ConfigError(f"pseudo-label file {path} is missing or does not match its manifest (sha256): "
                              f"delete {out_dir} and rerun stages/pseudo_label.py")
    extra = sorted(set(listed) - set(shard_rows))
    if extra:
        raise ConfigError(f"pseudo labels in {out_dir} list shards the data lacks: {extra[:3]}")
    pairs = shard_keys.items() if isinstance(shard_keys, Mapping) else shard_keys or ()
    for shard, keys in pairs:
        if shard in shard_rows:
            _check_keys(out_dir / listed[shard]["file"], shard, keys)
    return manifest


def _check_keys(path: Path, shard: str, keys: list[str]) -> None:
    """The file's keys are the shard's keys, less the bad samples its metadata names."""
    meta = read_meta(path)
    have = pq.read_table(path, columns=["key"]).column("key").to_pylist()
    named = {x["key"] for x in meta["skipped"]}
    unnamed = sum(int(x.get("count", 1)) for x in meta["skipped"] if x["key"] not in keys)
    want, have_set = set(keys), set(have)
    extra = [k for k in have if k not in want]
    if extra:
        raise ConfigError(f"pseudo labels for {shard} have keys the shard lacks, e.g. {extra[0]!r} "
                          f"({len(extra)} in all): they were made for other data")
    missing = [k for k in keys if k not in have_set and k not in named]
    if len(missing) > unnamed or len(have) != len(have_set):
        raise ConfigError(f"pseudo labels for {shard} lack keys of the shard, e.g. {missing[0]!r} "
                          f"({len(missing)} in all)" if missing else f"pseudo labels for {shard} repeat keys")


class StudentTargets:
    """Filtered, class-balanced pseudo-label targets, served per shard to the student's stream.

    Holds one small array of repeat counts per shard, aligned with the rows of its Parquet file
    (2 bytes per pool image, no keys); a shard's keys and probabilities are read when a
    DataLoader worker opens that shard. Picklable.
    """

    def __init__(self, out_dir: Path, repeats: dict[str, np.ndarray], soft: bool, temperature: float,
                 num_classes: int):
        self.out_dir, self.repeats = out_dir, repeats
        self.soft, self.temperature, self.num_classes = soft, temperature, num_classes

    def __call__(self, shard: str) -> dict[str, tuple[int, torch.Tensor]]:
        want = self.repeats.get(Path(shard).name)
        if want is None or not want.any():
            return {}
        table = pq.read_table(self.out_dir / parquet_name(shard), columns=["key", "probs"])
        if table.num_rows != len(want):
            raise ValueError(f"pseudo labels of {shard} changed while training ({table.num_rows} rows, "
                             f"expected {len(want)})")
        rows = np.flatnonzero(want)
        keys = table.column("key").take(pa.array(rows)).to_pylist()
        probs = np.asarray(table.column("probs").combine_chunks().flatten()).reshape(table.num_rows, -1)[rows]
        targets = soft_targets(probs, self.temperature) if self.soft else np.eye(
            self.num_classes, dtype=np.float32)[probs.argmax(1)]
        return {k: (int(want[r]), torch.from_numpy(targets[j])) for j, (k, r) in enumerate(zip(keys, rows, strict=True))}

    @property
    def total(self) -> int:
        return int(sum(int(r.sum()) for r in self.repeats.values()))


def soft_targets(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Re-temper softmax probabilities: p^(1/T), renormalised (T=1 leaves them as they are)."""
    if temperature == 1.0:
        return probs.astype(np.float32)
    logp = np.log(np.clip(probs, 1e-12, None)) / temperature
    logp -= logp.max(1, keepdims=True)
    e = np.exp(logp)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def select(labels: np.ndarray, confidence: np.ndarray, num_classes: int, threshold: float, balance: bool,
           per_class: int | None) -> tuple[np.ndarray, dict]:
    """Repeat count per row: drop below ``threshold``; when balancing, every class gets ``per_class``
    rows (default: the mean kept count), duplicating short classes and keeping the most
    confident rows of long ones."""
    kept = confidence >= threshold
    repeats = kept.astype(np.int64)
    counts = np.bincount(labels[kept], minlength=num_classes)
    info = {"kept": int(kept.sum()), "kept_share": float(kept.mean()) if len(kept) else 0.0,
            "kept_per_class": counts.tolist()}
    if balance and kept.any():
        target = per_class or int(round(counts[counts > 0].mean()))
        repeats[:] = 0
        for c in np.flatnonzero(counts):
            idx = np.flatnonzero(kept & (labels == c))
            idx = idx[np.argsort(-confidence[idx], kind="stable")]
            if len(idx) >= target:
                repeats[idx[:target]] = 1
            else:
                repeats[idx] = target // len(idx)
                repeats[idx[: target % len(idx)]] += 1
        info["per_class_target"] = target
        info["empty_classes"] = np.flatnonzero(counts == 0).tolist()
    info["samples"] = int(repeats.sum())
    return repeats, info


def student_targets(out_dir: Path, shards: list[Path], cfg: StudentConfig, num_classes: int) -> tuple[
        StudentTargets, dict]:
    """Select (threshold, balance) over the whole pool's small columns; repeat counts per shard."""
    names = [Path(s).name for s in sorted(shards)]
    labels, conf, sizes = [], [], []
    for name in names:
        t = pq.read_table(out_dir / parquet_name(name), columns=["label", "confidence"])
        labels.append(t.column("label").to_numpy())
        conf.append(t.column("confidence").to_numpy())
        sizes.append(t.num_rows)
    labels_all = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    conf_all = np.concatenate(conf) if conf else np.zeros(0, np.float32)
    repeats, info = select(labels_all, conf_all, num_classes, cfg.threshold, cfg.balance, cfg.per_class)
    if info["samples"] == 0:
        raise ConfigError(f"student.threshold={cfg.threshold} keeps no pseudo-labeled sample")
    parts = np.split(repeats.astype(np.uint16), np.cumsum(sizes)[:-1]) if sizes else []
    return StudentTargets(out_dir, dict(zip(names, parts, strict=True)), cfg.soft, cfg.temperature,
                          num_classes), info
