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

from pipeline.artifacts import read_json, sha256_file, short_hash, write_json_atomic
from pipeline.config import Config
from pipeline.data.bad_samples import Skip
from pipeline.data.dataset import PreparedData
from pipeline.data.images import BadImage, decode_image
from pipeline.data.shards import image_bytes, read_shard
from pipeline.evaluate import plots
from pipeline.pseudo import pseudo_labels


def pseudo_label_health(cfg: Config, k: int, round_dir: Path, pl_dir: Path, prev: Path | None) -> dict:
    """Health stats of round k's pseudo labels (``pl_dir``; ``prev``: round k-1's), cached in
    ``round-k/eval/``, and its audit grid."""
    data = PreparedData.open(cfg)
    mpath = pl_dir / pseudo_labels.MANIFEST
    if not mpath.is_file():
        return {}
    if prev is not None and not (prev / pseudo_labels.MANIFEST).is_file():
        prev = None
    identity = {"labels": sha256_file(mpath), "prev": sha256_file(prev / pseudo_labels.MANIFEST) if prev else None,
                "threshold": cfg.student.threshold, "truth": data.manifest.get("unlabeled_truth", {}).get("sha256"),
                "audit": cfg.evaluate.audit_per_class, "seed": cfg.evaluate.seed, "v": 1}
    out = round_dir / "eval" / f"health-{short_hash(identity)}.json"
    if out.is_file():
        return read_json(out)
    shards = data.shards("unlabeled")
    result = {"round": k, "identity": identity,
              **pseudo_labels.pool_stats(pl_dir, shards, data.class_names, data.truth, cfg.student.threshold, prev)}
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
        for sample in read_shard(shard):
            slot = None if isinstance(sample, Skip) else want.get(sample["__key__"])
            if slot is None:
                continue
            c, is_kept = slot
            try:
                (kept if is_kept else rejected)[c].append(np.asarray(decode_image(image_bytes(sample), mode)))
            except BadImage:  # pseudo_label skipped it too (and counted it): nothing to show
                continue
    return kept, rejected
