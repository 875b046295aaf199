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
import pyarrow.parquet as pq

from . import plots, pseudo_labels
from .artifacts import read_json, sha256_file, short_hash, write_json_atomic
from .config import Config
from .dataset import PreparedData
from .images import BadImage, decode_image
from .shards import image_bytes, iter_samples

BINS = 20
THRESHOLDS = [round(0.05 * i, 2) for i in range(20)]


def _truth(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    t = pq.read_table(path)
    return dict(zip(t.column("key").to_pylist(), t.column("label").to_pylist(), strict=True))


def pseudo_label_health(cfg: Config, k: int, round_dir: Path, prev_round_dir: Path | None) -> dict:
    """Health stats of round k's pseudo labels (cached in ``round-k/eval/``) and its audit grid."""
    data = PreparedData.open(cfg)
    manifest = data.manifest
    pl_dir = round_dir / "pseudo_labels"
    mpath = pl_dir / pseudo_labels.MANIFEST
    if not mpath.is_file():
        return {}
    prev = prev_round_dir / "pseudo_labels" if prev_round_dir is not None else None
    if prev is not None and not (prev / pseudo_labels.MANIFEST).is_file():
        prev = None
    truth_sha = manifest.get("unlabeled_truth", {}).get("sha256")
    identity = {"labels": sha256_file(mpath), "prev": sha256_file(prev / pseudo_labels.MANIFEST) if prev else None,
                "threshold": cfg.student.threshold, "truth": truth_sha, "audit": cfg.evaluate.audit_per_class,
                "seed": cfg.evaluate.seed, "v": 1}
    out = round_dir / "eval" / f"health-{short_hash(identity)}.json"
    if out.is_file():
        return read_json(out)
    names = manifest["class_names"]
    nc = len(names)
    truth = _truth(data.truth)
    thr = cfg.student.threshold
    conf_hist = np.zeros(BINS, np.int64)
    ent_hist = np.zeros(BINS, np.int64)
    kept_per_class = np.zeros(nc, np.int64)
    label_hist = np.zeros(nc, np.int64)
    agree = compared = 0
    at_thr = np.zeros((len(THRESHOLDS), 2), np.int64)  # kept, correct
    pred_count = np.zeros(nc, np.int64)
    pred_correct = np.zeros(nc, np.int64)
    total = 0
    shards = data.shards("unlabeled")
    for shard in sorted(shards):
        name = pseudo_labels.parquet_name(shard)
        t = pq.read_table(pl_dir / name, columns=["key", "probs", "label", "confidence"])
        label = t.column("label").to_numpy()
        conf = t.column("confidence").to_numpy()
        probs = t.column("probs").combine_chunks().flatten().to_numpy().reshape(len(label), nc).astype(np.float64)
        ent = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1) / np.log(nc)
        conf_hist += np.histogram(conf, BINS, (0, 1))[0]
        ent_hist += np.histogram(np.clip(ent, 0, 1), BINS, (0, 1))[0]
        kept = conf >= thr
        kept_per_class += np.bincount(label[kept], minlength=nc)
        label_hist += np.bincount(label, minlength=nc)
        total += len(label)
        keys = t.column("key").to_pylist()
        if prev is not None and (prev / name).is_file():
            pt = pq.read_table(prev / name, columns=["key", "label"])
            before = dict(zip(pt.column("key").to_pylist(), pt.column("label").to_pylist(), strict=True))
            old = np.array([before.get(key, -1) for key in keys])
            known = old >= 0
            agree += int((old[known] == label[known]).sum())
            compared += int(known.sum())
        if truth is not None:
            true = np.array([truth.get(key, -1) for key in keys])
            known = true >= 0
            ok = known & (true == label)
            for i, th in enumerate(THRESHOLDS):
                sel = known & (conf >= th)
                at_thr[i] += (int(sel.sum()), int((ok & sel).sum()))
            pred_count += np.bincount(label[known], minlength=nc)
            pred_correct += np.bincount(label[ok], minlength=nc)
    result: dict = {
        "round": k, "identity": identity, "samples": total, "threshold": thr,
        "confidence_hist": conf_hist.tolist(), "entropy_hist": ent_hist.tolist(), "bins": BINS,
        "kept": int(kept_per_class.sum()), "kept_share": float(kept_per_class.sum() / max(total, 1)),
        "kept_per_class": dict(zip(names, kept_per_class.tolist(), strict=True)),
        "label_per_class": dict(zip(names, label_hist.tolist(), strict=True)),
        "agreement_with_previous": (agree / compared if compared else None),
    }
    if truth is not None and at_thr[0, 0]:
        result["accuracy_at_threshold"] = [
            {"threshold": th, "kept_share": float(at_thr[i, 0] / at_thr[0, 0]),
             "accuracy": (100.0 * at_thr[i, 1] / at_thr[i, 0]) if at_thr[i, 0] else None}
            for i, th in enumerate(THRESHOLDS)]
        result["precision_per_class"] = {
            n: (100.0 * c / p if p else None) for n, c, p in zip(names, pred_correct.tolist(), pred_count.tolist(),
                                                                  strict=True)}
    if cfg.evaluate.audit_per_class:
        grid = out.with_name(out.stem.replace("health", "audit") + ".png")
        if not grid.is_file():
            kept_imgs, rejected_imgs = _audit_samples(pl_dir, shards, manifest["image"]["mode"], nc, thr,
                                                      cfg.evaluate.audit_per_class, cfg.evaluate.seed)
            plots.audit_grid(grid, kept_imgs, rejected_imgs, names, thr, k)
        result["audit_grid"] = grid.name
    write_json_atomic(out, result)
    return result


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
