"""Pseudo-label health of a round: what a user can check without true labels, and with them.

Without truth (a real pool): confidence and entropy histograms, the share the filter keeps, kept
count per class, agreement with the previous round's labels, and an audit grid of kept and
rejected images per class. With the pool's true labels kept aside (benchmarks): accuracy against
the confidence threshold and per-class precision. Everything streams one Parquet file at a time,
so memory does not grow with the pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import plots, pseudo_labels
from .artifacts import read_json, sha256_file, short_hash, write_json_atomic
from .config import Config
from .dataset import PreparedData
from .images import BadImage, decode_image
from .shards import image_bytes, iter_samples

BINS = 20
THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


def pseudo_label_health(cfg: Config, k: int, round_dir: Path, prev_round_dir: Path | None) -> dict:
    """Health stats of round k's pseudo labels (cached in ``round-k/eval/``) and its audit grid."""
    data = PreparedData.open(cfg)
    pl_dir = round_dir / "pseudo_labels"
    mpath = pl_dir / pseudo_labels.MANIFEST
    if not mpath.is_file():
        return {}
    prev = prev_round_dir / "pseudo_labels" if prev_round_dir is not None else None
    if prev is not None and not (prev / pseudo_labels.MANIFEST).is_file():
        prev = None
    identity = {"labels": sha256_file(mpath), "prev": sha256_file(prev / pseudo_labels.MANIFEST) if prev else None,
                "threshold": cfg.student.threshold, "truth": data.manifest.get("unlabeled_truth", {}).get("sha256"),
                "audit": cfg.evaluate.audit_per_class, "seed": cfg.evaluate.seed, "v": 1}
    out = round_dir / "eval" / f"health-{short_hash(identity)}.json"
    if out.is_file():
        return read_json(out)
    truth = None
    if data.truth.is_file():  # joined per shard in Arrow: memory does not grow with the pool
        truth = pq.read_table(data.truth, columns=["key", "label"]).rename_columns(["key", "true"])
    stats = _Stats(data.class_names, cfg.student.threshold)
    shards = data.shards("unlabeled")
    for shard in sorted(shards):
        stats.add(_shard_table(pl_dir, prev, truth, pseudo_labels.parquet_name(shard)))
    result = {"round": k, "identity": identity, **stats.result(truth is not None)}
    if cfg.evaluate.audit_per_class:
        grid = out.with_name(out.stem.replace("health", "audit") + ".png")
        if not grid.is_file():
            kept_imgs, rejected_imgs = _audit_samples(pl_dir, shards, data.manifest["image"]["mode"],
                                                      len(data.class_names), cfg.student.threshold,
                                                      cfg.evaluate.audit_per_class, cfg.evaluate.seed)
            plots.audit_grid(grid, kept_imgs, rejected_imgs, data.class_names, cfg.student.threshold, k)
        result["audit_grid"] = grid.name
    write_json_atomic(out, result)
    return result


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

    def add(self, t: dict[str, np.ndarray]) -> None:
        nc = len(self.names)
        label, conf, probs = t["label"], t["confidence"], t["probs"].astype(np.float64)
        ent = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1) / np.log(nc)
        self.conf_hist += np.histogram(conf, BINS, (0, 1))[0]
        self.ent_hist += np.histogram(np.clip(ent, 0, 1), BINS, (0, 1))[0]
        self.kept_per_class += np.bincount(label[conf >= self.thr], minlength=nc)
        self.label_hist += np.bincount(label, minlength=nc)
        self.total += len(label)
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
        out = {"samples": self.total, "threshold": self.thr, "confidence_hist": self.conf_hist.tolist(),
               "entropy_hist": self.ent_hist.tolist(), "bins": BINS, "kept": kept,
               "kept_share": float(kept / max(self.total, 1)),
               "kept_per_class": dict(zip(names, self.kept_per_class.tolist(), strict=True)),
               "label_per_class": dict(zip(names, self.label_hist.tolist(), strict=True)),
               "agreement_with_previous": (self.agree / self.compared if self.compared else None)}
        at = self.at_thr
        if with_truth and at[0, 0]:
            out["accuracy_at_threshold"] = [
                {"threshold": th, "kept_share": float(at[i, 0] / at[0, 0]),
                 "accuracy": (100.0 * at[i, 1] / at[i, 0]) if at[i, 0] else None} for i, th in enumerate(THRESHOLDS)]
            out["precision_per_class"] = {n: (100.0 * c / p if p else None) for n, c, p in zip(
                names, self.pred_correct.tolist(), self.pred_count.tolist(), strict=True)}
        return out


def _audit_samples(pl_dir: Path, shards: list[Path], mode: str, nc: int, thr: float, per_class: int,
                   seed: int) -> tuple[list[list], list[list]]:
    """Per class, up to ``per_class`` random kept and rejected images, read from as few shards as needed."""
    rng = np.random.default_rng(seed)
    want: dict[str, tuple[int, bool]] = {}  # key -> (class, kept)
    filled = {(c, kept): 0 for c in range(nc) for kept in (True, False)}
    used: list[Path] = []
    for shard in sorted(shards):
        t = pq.read_table(pl_dir / pseudo_labels.parquet_name(shard), columns=["key", "label", "confidence"])
        keys, label, conf = t.column("key").to_pylist(), t.column("label").to_numpy(), t.column("confidence").to_numpy()
        took = False
        for i in rng.permutation(len(keys)):
            slot = (int(label[i]), bool(conf[i] >= thr))
            if filled[slot] < per_class:
                filled[slot] += 1
                want[keys[i]] = slot
                took = True
        if took:
            used.append(shard)
        if all(v >= per_class for v in filled.values()):
            break
    kept: list[list] = [[] for _ in range(nc)]
    rejected: list[list] = [[] for _ in range(nc)]
    for shard in used:
        for sample in iter_samples(shard):
            slot = want.get(sample["__key__"])
            data = image_bytes(sample)
            if slot is None or data is None:
                continue
            c, is_kept = slot
            try:
                (kept if is_kept else rejected)[c].append(np.asarray(decode_image(data, mode)))
            except BadImage:  # pseudo_label skipped it too (and counted it): nothing to show
                continue
    return kept, rejected
