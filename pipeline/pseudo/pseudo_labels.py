"""Pseudo labels as stored: one Parquet file per unlabeled shard and a manifest (written by
``labeling.label_shards``, read by ``selection.student_targets``).

``unlabeled-000042.tar`` gets ``unlabeled-000042.parquet`` with that shard's rows in the shard's
order (key, shard, label, confidence, probs, teacher_sha256) and file metadata naming the class
names, the precision and the bad samples skipped. A round's directory is a Hive partition
(``pseudo_labels/round=<k>/``) and the manifest is ``_manifest.json``, so Parquet readers take the
directory, or all rounds above it, as one dataset. Ranks split the work by shard and a finished
shard is a finished file, so a killed job resumes by skipping files that validate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import failpoints
from pipeline.artifacts import atomic_path, code_version, read_json, sha256_file, write_json_atomic
from pipeline.config import ConfigError
from pipeline.data.bad_samples import Skip

MANIFEST = "_manifest.json"  # a leading "_": Parquet readers (pyarrow, pandas, Spark) skip it
BINS = 20  # of the confidence and entropy histograms
THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]  # of the accuracy-by-threshold curve


def parquet_name(shard: str | Path) -> str:
    return Path(shard).name.rsplit(".tar", 1)[0] + ".parquet"


def schema(num_classes: int) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("label", pa.int32()),
                      ("confidence", pa.float32()), ("probs", pa.list_(pa.float32(), num_classes)),
                      ("teacher_sha256", pa.dictionary(pa.int8(), pa.string()))])


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
    teacher = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([teacher_sha256]))
    table = pa.table([pa.array(keys, pa.string()), pa.array([Path(shard).name] * n, pa.string()),
                      pa.array(label), pa.array(conf, pa.float32()),
                      pa.FixedSizeListArray.from_arrays(flat, c), teacher], schema=schema(c))
    meta = {b"teacher_sha256": teacher_sha256.encode(), b"class_names": json.dumps(class_names).encode(),
            b"tta": b"hflip" if tta else b"none", b"precision": dtype.encode(),
            b"skipped": json.dumps([{"key": s.key, "reason": s.reason, "count": s.count}
                                    for s in skipped or []]).encode()}
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=65536)
        failpoints.hit("parquet_write", path)


def read_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    skipped = json.loads(md.get(b"skipped", b"[]").decode())
    return {"teacher_sha256": md.get(b"teacher_sha256", b"").decode(),
            "class_names": json.loads(md.get(b"class_names", b"null").decode()),
            "tta": md.get(b"tta", b"none").decode() == "hflip",
            "precision": md.get(b"precision", b"fp32").decode(),
            "rows": pq.ParquetFile(path).metadata.num_rows, "skipped": skipped,
            "skipped_count": sum(int(x.get("count", 1)) for x in skipped)}


def validates(path: Path, rows: int, teacher_sha256: str, class_names: list[str], tta: bool = False,
              sha256: str | None = None) -> bool:
    """A finished file for this shard and this teacher (used to skip work on rerun): its metadata,
    its content (``content_problem``) and, when a manifest listed it, its sha256."""
    if not path.is_file():
        return False
    try:
        meta = read_meta(path)
    except (OSError, pa.ArrowException, ValueError, json.JSONDecodeError):
        return False
    return (meta["rows"] + meta["skipped_count"] == rows and meta["teacher_sha256"] == teacher_sha256
            and meta["class_names"] == class_names and meta["tta"] == tta
            and (sha256 is None or sha256_file(path) == sha256) and content_problem(path, len(class_names)) is None)


def listed_sha256(out_dir: Path) -> dict[str, str]:
    """File name -> sha256 as the directory's manifest lists them (empty without a readable one)."""
    try:
        return {f["file"]: f["sha256"] for f in read_json(out_dir / MANIFEST)["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _schema_problem(sch: pa.Schema, num_classes: int) -> str | None:
    """The columns and their kinds, not Arrow's exact types (readers differ in list field names and
    dictionary index widths)."""
    want = schema(num_classes).names
    if sch.names != want:
        return f"schema is not a pseudo-label file's: columns {sch.names}, expected {want}"
    t = {f.name: f.type for f in sch}
    sha = t["teacher_sha256"]
    kinds = (pa.types.is_string(t["key"]) and pa.types.is_string(t["shard"]) and pa.types.is_integer(t["label"])
             and pa.types.is_floating(t["confidence"]) and pa.types.is_fixed_size_list(t["probs"])
             and pa.types.is_floating(t["probs"].value_type)
             and (pa.types.is_string(sha) or pa.types.is_dictionary(sha) and pa.types.is_string(sha.value_type)))
    if not kinds:
        return f"schema is not a pseudo-label file's: {', '.join(f'{f.name}: {f.type}' for f in sch)}"
    if t["probs"].list_size != num_classes:
        return f"schema holds {t['probs'].list_size} classes, expected {num_classes} classes"
    return None


def content_problem(path: Path, num_classes: int) -> str | None:
    """What is wrong with a pseudo-label file's content, naming the row, or None: the schema and
    class count, probabilities that are finite, in [0, 1] and sum to 1, label = argmax and
    confidence = max. Files are checked on every read, so an edited one is never trained on."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException, ValueError) as e:
        return f"not a readable Parquet file ({str(e).splitlines()[0][:120]})"
    problem = _schema_problem(table.schema, num_classes)
    if problem is not None:
        return problem
    n = table.num_rows
    if not n:
        return None
    probs = table.column("probs").combine_chunks().flatten().to_numpy().reshape(n, num_classes)
    label, conf = table.column("label").to_numpy(), table.column("confidence").to_numpy()
    checks = (("probabilities are not finite", ~np.isfinite(probs).all(1)),
              ("probabilities lie outside [0, 1]", ((probs < 0) | (probs > 1)).any(1)),
              ("probabilities do not sum to 1", np.abs(probs.sum(1, dtype=np.float64) - 1) > 1e-3),
              ("label is not the most probable class", label != probs.argmax(1)),
              ("confidence is not the largest probability", np.abs(conf - probs.max(1)) > 1e-6))
    for reason, bad in checks:
        if bad.any():
            return f"row {int(np.flatnonzero(bad)[0])}: {reason}"
    return None



def pool_stats(pl_dir: Path, shards: list[Path], names: list[str], truth_path: Path | None, threshold: float,
               prev: Path | None = None) -> dict:
    """One pass over a round's Parquet files, one file at a time: histograms, the share the
    threshold keeps, agreement with ``prev`` (the previous round's directory) and, where the pool's
    truth was kept aside, accuracy by threshold. The manifest's stats and the report both use it."""
    truth = None
    if truth_path is not None and truth_path.is_file():  # joined per shard in Arrow, never as Python objects
        truth = pq.read_table(truth_path, columns=["key", "label"]).rename_columns(["key", "true"])
    stats = _Stats(names, threshold)
    for shard in sorted(shards):
        stats.add(_shard_table(pl_dir, prev, truth, parquet_name(shard)))
    return stats.result(truth is not None)


def _shard_table(pl_dir: Path, prev: Path | None, truth: pa.Table | None, name: str) -> dict[str, np.ndarray]:
    """One shard's pseudo labels as arrays, with the previous round's label (``prev``) and the true
    label (``true``) of each row joined by key in Arrow; -1 where there is none."""
    t = pq.read_table(pl_dir / name, columns=["key", "probs", "label", "confidence"])
    n = t.num_rows
    rows = pa.table({"key": t.column("key"), "row": pa.array(np.arange(n, dtype=np.int64))})

    def aligned(other: pa.Table | None, col: str) -> np.ndarray:
        out = np.full(n, -1, np.int64)
        if other is not None:
            j = rows.join(other, "key", join_type="inner")
            out[j.column("row").to_numpy()] = j.column(col).to_numpy()
        return out

    before = None
    if prev is not None and (prev / name).is_file():
        before = pq.read_table(prev / name, columns=["key", "label"]).rename_columns(["key", "prev"])
    return {"label": t.column("label").to_numpy(), "confidence": t.column("confidence").to_numpy(),
            "probs": t.column("probs").combine_chunks().flatten().to_numpy().reshape(n, -1),
            "prev": aligned(before, "prev"), "true": aligned(truth, "true")}


class _Stats:
    """Histograms and counts over the pool, one shard's table at a time."""

    def __init__(self, names: list[str], threshold: float):
        self.names, self.thr, nc = names, threshold, len(names)
        self.conf_hist, self.ent_hist = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
        self.kept_per_class, self.label_hist = np.zeros(nc, np.int64), np.zeros(nc, np.int64)
        self.pred_count, self.pred_correct = np.zeros(nc, np.int64), np.zeros(nc, np.int64)
        self.at_thr = np.zeros((len(THRESHOLDS), 2), np.int64)  # kept, correct
        self.agree = self.compared = self.total = 0
        self.conf_sum = 0.0

    def add(self, t: dict[str, np.ndarray]) -> None:
        nc = len(self.names)
        label, conf, probs = t["label"], t["confidence"], t["probs"].astype(np.float64)
        ent = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1) / np.log(nc)
        self.conf_hist += np.histogram(conf, BINS, (0, 1))[0]
        self.ent_hist += np.histogram(np.clip(ent, 0, 1), BINS, (0, 1))[0]
        self.kept_per_class += np.bincount(label[conf >= self.thr], minlength=nc)
        self.label_hist += np.bincount(label, minlength=nc)
        self.total += len(label)
        self.conf_sum += float(conf.sum(dtype=np.float64))
        old, true = t["prev"], t["true"]
        self.agree += int((old[old >= 0] == label[old >= 0]).sum())
        self.compared += int((old >= 0).sum())
        known = true >= 0
        ok = known & (true == label)
        for i, th in enumerate(THRESHOLDS):
            sel = known & (conf >= th)
            self.at_thr[i] += (int(sel.sum()), int((ok & sel).sum()))
        self.pred_count += np.bincount(label[known], minlength=nc)
        self.pred_correct += np.bincount(label[ok], minlength=nc)

    def result(self, with_truth: bool) -> dict:
        names, kept = self.names, int(self.kept_per_class.sum())
        out = {"samples": self.total, "threshold": self.thr, "class_histogram": self.label_hist.tolist(),
               "mean_confidence": self.conf_sum / self.total if self.total else None,
               "confidence_hist": self.conf_hist.tolist(),
               "entropy_hist": self.ent_hist.tolist(), "bins": BINS, "kept": kept,
               "kept_share": float(kept / max(self.total, 1)),
               "kept_per_class": dict(zip(names, self.kept_per_class.tolist(), strict=True)),
               "label_per_class": dict(zip(names, self.label_hist.tolist(), strict=True)),
               "agreement_with_previous": (self.agree / self.compared if self.compared else None)}
        at = self.at_thr
        if with_truth and at[0, 0]:
            out["accuracy"] = 100.0 * at[0, 1] / at[0, 0]
            out["accuracy_at_threshold"] = [
                {"threshold": th, "kept_share": float(at[i, 0] / at[0, 0]),
                 "accuracy": (100.0 * at[i, 1] / at[i, 0]) if at[i, 0] else None} for i, th in enumerate(THRESHOLDS)]
            out["precision_per_class"] = {n: (100.0 * c / p if p else None) for n, c, p in zip(
                names, self.pred_correct.tolist(), self.pred_count.tolist(), strict=True)}
        return out


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
    """The manifest of the pseudo labels in ``out_dir``; ConfigError (saying why) unless they match these
    shards, this teacher and these classes (``problem``)."""
    why = problem(out_dir, shard_rows, teacher_sha256, class_names, tta, shard_keys)
    if why is not None:
        raise ConfigError(why)
    return read_json(out_dir / MANIFEST)


def finished(out_dir: Path, shard_rows: dict[str, int], teacher_sha256: str, class_names: list[str],
             tta: bool = False) -> dict | None:
    """The manifest of finished pseudo labels that match (``problem``), else None: what is left to label."""
    return None if problem(out_dir, shard_rows, teacher_sha256, class_names, tta) else read_json(out_dir / MANIFEST)


def problem(out_dir: Path, shard_rows: dict[str, int], teacher_sha256: str, class_names: list[str],
            tta: bool = False, shard_keys: Mapping[str, list[str]] | Iterable[tuple[str, list[str]]] | None = None
            ) -> str | None:
    """Why the pseudo labels in ``out_dir`` do not match these shards, this teacher and these classes, or None.

    Checks the manifest and every file it lists against its sha256; with ``shard_keys`` (shard ->
    its keys in order, a mapping or a stream of pairs) also that each file holds exactly that
    shard's keys, bad samples aside. A stream is read once, one shard at a time.
    """
    mpath = out_dir / MANIFEST
    if not mpath.is_file():
        return f"pseudo labels not found: {mpath} (run stages/pseudo_label.py first)"
    manifest = read_json(mpath)
    if manifest["teacher_sha256"] != teacher_sha256:
        return (f"pseudo labels in {out_dir} were made by another teacher "
                f"(teacher_sha256 {manifest['teacher_sha256'][:12]}, expected {teacher_sha256[:12]})")
    if len(manifest["class_names"]) != len(class_names):
        return (f"pseudo labels in {out_dir} have {len(manifest['class_names'])} classes, "
                f"the data has {len(class_names)}")
    if manifest["class_names"] != class_names:
        return (f"pseudo labels in {out_dir} have classes {manifest['class_names']}, "
                f"the data has {class_names}")
    if (manifest.get("tta", "none") == "hflip") != tta:
        return (f"pseudo labels in {out_dir} were made with pseudo_label.tta={not tta}; this run asks "
                f"{tta}: delete them or give a new name=...")
    listed = {f["shard"]: f for f in manifest["files"]}
    for shard, rows in shard_rows.items():
        f = listed.get(shard)
        if f is None:
            return f"pseudo labels in {out_dir} lack shard {shard}"
        if f["rows"] + f.get("skipped", 0) != rows:
            return f"pseudo labels for {shard} have {f['rows']} rows, the shard has {rows}"
        path = out_dir / f["file"]
        if not path.is_file() or sha256_file(path) != f["sha256"]:
            return (f"pseudo-label file {path} is missing or does not match its manifest (sha256): "
                    f"rerun stages/pseudo_label.py to label its shard again")
        bad = content_problem(path, len(class_names))
        if bad is not None:
            return f"pseudo-label file {path}: {bad}; rerun stages/pseudo_label.py"
    extra = sorted(set(listed) - set(shard_rows))
    if extra:
        return f"pseudo labels in {out_dir} list shards the data lacks: {extra[:3]}"
    pairs = shard_keys.items() if isinstance(shard_keys, Mapping) else shard_keys or ()
    for shard, keys in pairs:
        if shard in shard_rows:
            why = _keys_problem(out_dir / listed[shard]["file"], shard, keys)
            if why is not None:
                return why
    return None


def _keys_problem(path: Path, shard: str, keys: list[str]) -> str | None:
    """The file's keys are the shard's keys, less the bad samples its metadata names."""
    meta = read_meta(path)
    have = pq.read_table(path, columns=["key"]).column("key").to_pylist()
    named = {x["key"] for x in meta["skipped"]}
    unnamed = sum(int(x.get("count", 1)) for x in meta["skipped"] if x["key"] not in keys)
    want, have_set = set(keys), set(have)
    extra = [k for k in have if k not in want]
    if extra:
        return (f"pseudo labels for {shard} have keys the shard lacks, e.g. {extra[0]!r} "
                f"({len(extra)} in all): they were made for other data")
    missing = [k for k in keys if k not in have_set and k not in named]
    if len(missing) > unnamed or len(have) != len(have_set):
        return (f"pseudo labels for {shard} lack keys of the shard, e.g. {missing[0]!r} "
                f"({len(missing)} in all)" if missing else f"pseudo labels for {shard} repeat keys")
    return None
