"""The student's choice of pseudo labels: a confidence threshold and class balancing over the small
columns of the whole pool (per-shard repeat counts), optionally sharpened soft targets; each
shard's probabilities are read only when its shard is streamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import ConfigError, StudentConfig
from pipeline.pseudo.pseudo_labels import parquet_name


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
