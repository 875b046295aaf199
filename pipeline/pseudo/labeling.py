"""The teacher's pass over the pool: the un-noised teacher labels this rank's unfinished shards into
Parquet files (``pseudo_labels.py``). Ranks split the work by shard and a finished shard is a
finished file, so a killed job resumes by skipping files that validate."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline import failpoints, tracking
from pipeline.artifacts import clean_tmp
from pipeline.config import PseudoLabelConfig
from pipeline.data.bad_samples import Skip, SkipLog
from pipeline.data.dataset import Preprocessing
from pipeline.data.stream import Batch, StreamSpec, decode_or_skip, samples, split
from pipeline.data.transforms import eval_transform, normalize
from pipeline.modeling import finite, precision
from pipeline.pseudo.pseudo_labels import listed_sha256, parquet_name, validates, write_parquet
from pipeline.tracking import bar


class _ShardBatches(IterableDataset):
    """This worker's shards, one at a time, as (shard, ``stream.Batch``) and then (shard, None) at its
    end: the labels of a shard are written together, skips included. A batch is ``batch_size``
    samples read, less those that do not decode, so a shard's batches do not depend on which decode."""

    def __init__(self, spec: StreamSpec, batch_size: int):
        self.spec, self.batch_size = spec, batch_size

    def __iter__(self):
        shards, mod, _ = split(self.spec, 0, 0)
        assert mod == 1, "a labeling worker reads whole shards (no more workers than shards)"
        for shard in shards:
            window, skips = [], []
            for item in samples(self.spec, [shard]):
                if isinstance(item, Skip):
                    skips.append(item)
                    continue
                window.append(item)
                if len(window) == self.batch_size:
                    yield shard, self._decoded(window, skips)
                    window, skips = [], []
            yield shard, self._decoded(window, skips)
            yield shard, None

    def _decoded(self, window: list, skips: list[Skip]) -> Batch:
        good = []
        for item in decode_or_skip(window, self.spec.mode, self.spec.transform):
            (skips if isinstance(item, Skip) else good).append(item)
        x = torch.stack([g[0] for g in good]) if good else None
        return Batch(x, None, [g[2] for g in good], skips)


def label_shards(model: torch.nn.Module, shards: list[Path], out_dir: Path, *, shard_rows: dict[str, int],
                 teacher_sha256: str, class_names: list[str], prep: Preprocessing, opts: PseudoLabelConfig,
                 accelerator, progress: bool = True, max_bad_share: float = 0.01, model_name: str | None = None) -> dict:
    """Label this rank's unfinished shards; returns this rank's {"samples", "seconds", "precision"}.

    ``opts``: batch size and workers; ``tta`` averages the softmax of each image and its mirror
    image (flip test-time augmentation, no noise); ``mixed_precision`` (``precision.resolve``),
    ``channels_last`` and ``compile`` change speed, and the precision used is recorded in each file.
    Outputs that are not finite stop the pass before their shard's file is written (``model_name``
    names the model in that one line).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        clean_tmp(out_dir)
    accelerator.wait_for_everyone()
    mine = [s for s in sorted(shards)][accelerator.process_index::accelerator.num_processes]
    listed = listed_sha256(out_dir)  # a file its manifest no longer matches is labeled again, never adopted
    todo = [str(s) for s in mine if not validates(out_dir / parquet_name(s), shard_rows[Path(s).name],
                                                  teacher_sha256, class_names, opts.tta, listed.get(parquet_name(s)))]
    for s in todo:
        if (out_dir / parquet_name(s)).is_file():
            tracking.log.warning(f"warning: {out_dir / parquet_name(s)} does not match its manifest or is not valid: "
                        "labeling its shard again")
    total = sum(shard_rows[Path(s).name] for s in todo)
    log = SkipLog("pseudo_label" + (f" (rank {accelerator.process_index})" if accelerator.num_processes > 1 else ""),
                  max_bad_share, expected=total)
    teacher = _Teacher(model, prep, opts, accelerator.device, model_name or f"teacher {teacher_sha256[:12]}")
    done, t0 = 0, time.time()
    if todo:
        spec = StreamSpec(shards=todo, mode=prep.mode, transform=eval_transform(prep.size), shuffle=False,
                          rows=shard_rows, labels=False)
        loader = DataLoader(_ShardBatches(spec, opts.batch_size), batch_size=None,
                            num_workers=min(opts.workers, len(todo)), pin_memory=torch.cuda.is_available())
        pending: dict[str, tuple[list, list, list]] = {}
        shown = bar(progress, total=total, desc=f"pseudo-label rank {accelerator.process_index}", unit="img",
                    smoothing=0.1)
        for shard, b in loader:
            keys_acc, probs_acc, skips_acc = pending.setdefault(shard, ([], [], []))
            if b is None:  # the shard's end
                keys_acc, probs_acc, skips_acc = pending.pop(shard)
                probs = np.concatenate(probs_acc) if probs_acc else np.zeros((0, len(class_names)), np.float32)
                write_parquet(out_dir / parquet_name(shard), shard, keys_acc, probs, teacher_sha256,
                              class_names, opts.tta, skips_acc, teacher.dtype)
                continue
            skips_acc.extend(b.skips)
            log.extend(b.skips)
            if b.x is not None:
                probs_acc.append(teacher.probs(b.x))
                keys_acc.extend(b.keys)
                done += len(b.keys)
                log.use(len(b.keys))
                shown.update(len(b.keys))
                failpoints.hit("pseudo_label_batch")
        shown.close()
    log.check()
    return {"samples": done, "seconds": time.time() - t0, "bad_samples": log.metrics(), "precision": teacher.dtype}


class _Teacher:
    """The un-noised teacher as the pass runs it: on the device, in eval mode, with the speed options."""

    def __init__(self, model: torch.nn.Module, prep: Preprocessing, opts: PseudoLabelConfig, device: torch.device,
                 name: str):
        self.model, self.device, self.opts, self.name = model.to(device).eval(), device, opts, name
        if opts.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        precision.compile_model(self.model, opts.compile)
        self.dtype = precision.resolve(opts.mixed_precision, device, inference=True)
        self.autocast = precision.autocast(self.dtype, device)
        self.mean = torch.tensor(prep.mean, device=device)
        self.std = torch.tensor(prep.std, device=device)

    def probs(self, imgs: torch.Tensor) -> np.ndarray:
        """Softmax probabilities of a uint8 batch (averaged with the mirror images' under ``tta``)."""
        with torch.inference_mode(), self.autocast:
            x = normalize(imgs.to(self.device, non_blocking=True), self.mean, self.std, self.opts.channels_last)
            p = torch.softmax(self.model(x).float(), dim=1)
            if self.opts.tta:
                p = (p + torch.softmax(self.model(x.flip(3)).float(), dim=1)) / 2
        finite.check_outputs(p, self.name, "probabilities")
        return p.cpu().numpy()
