"""Training and evaluation data streams over shards, split by rank and DataLoader worker.

Webdataset loaders do not go through ``accelerator.prepare``: each rank reads its own shards
(``assign``). Shuffling is per epoch and seeded (shard order, then a buffer of encoded
samples), so a resumed run sees the same order. An epoch is a fixed number of batches on every
rank, so ranks never wait on each other at the end of an epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline.data.bad_samples import Skip, SkipLog
from pipeline.data.images import BadImage, decode_image
from pipeline.data.shards import image_bytes, read_shard, sample_label
from pipeline.errors import DataError

# shard path -> {key: (repeat count, target)}; None means "every sample once, target = its label"
TargetFn = Callable[[str], dict]


@dataclass
class StreamSpec:
    """What a stream reads and how; picklable so DataLoader workers can rebuild it."""

    shards: list[str]
    mode: str  # "L" or "RGB"
    transform: Callable
    rank: int = 0
    world: int = 1
    seed: int = 0
    shuffle: bool = True
    buffer: int = 2000
    targets: TargetFn | None = None  # pseudo-label targets; None: labels from the shards
    missing_label: int | None = None  # label of samples without one (e.g. -1 for the pool); None: an error
    with_label: bool = False  # with ``targets``: yield (target, label) so a loss can use both
    rows: dict[str, int] | None = None  # shard file name -> samples it should hold (finds short shards)


def assign(items: list, consumer: int, consumers: int) -> tuple[list, int, int]:
    """Split shards between ``consumers`` (ranks x workers) so none is read twice or skipped.

    With at least as many shards as consumers, each takes whole shards; otherwise every consumer
    reads every shard and keeps the samples whose position modulo ``consumers`` is its own.
    Returns (shards to read, modulus, remainder).
    """
    if len(items) >= consumers:
        return items[consumer::consumers], 1, 0
    return list(items), consumers, consumer


class ShardStream(IterableDataset):
    """Batches ``(uint8 images, targets, skips)`` of this rank/worker's share, for one epoch.

    Bad samples (undecodable, no image, no label, a damaged or short shard) are left out of the
    batches and listed in ``skips`` (``bad_samples.Skip``), so the main process can count and
    report them whatever worker met them. ``endless``: after a pass, start another (reshuffled)
    one, so a batch always fills however small the share; the caller takes as many as it needs.
    """

    def __init__(self, spec: StreamSpec, epoch: int, batch_size: int, endless: bool = False,
                 drop_last: bool = True):
        self.spec, self.epoch, self.endless = spec, epoch, endless
        self.batch_size, self.drop_last = batch_size, drop_last

    def _raw(self, salt: int) -> Iterator[tuple[bytes, object, str, str] | Skip]:
        spec = self.spec
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        shards = list(spec.shards)
        if spec.shuffle:
            random.Random(f"{spec.seed}/{self.epoch}/{salt}").shuffle(shards)
        mine, mod, rem = assign(shards, spec.rank * nworkers + wid, spec.world * nworkers)
        for shard in mine:
            name = Path(shard).name
            table = spec.targets(shard) if spec.targets is not None else None
            for sample in read_shard(shard, (spec.rows or {}).get(name), mod, rem):
                if isinstance(sample, Skip):
                    yield sample
                    continue
                key, data = sample["__key__"], image_bytes(sample)
                try:
                    label = sample_label(sample)
                except ValueError:
                    yield Skip(name, key, "label (.cls) is not an integer")
                    continue
                if label is None:
                    label = spec.missing_label
                if table is None:
                    if label is None:
                        yield Skip(name, key, "no label (.cls)")
                        continue
                    yield data, label, key, name
                    continue
                repeat, target = table.get(key, (0, None))
                if spec.with_label:
                    target = (target, -1 if label is None else label)
                for _ in range(repeat):
                    yield data, target, key, name

    def _samples(self, salt: int) -> Iterator[tuple[torch.Tensor, object] | Skip]:
        spec = self.spec
        info = get_worker_info()
        rng = random.Random(f"{spec.seed}/{self.epoch}/{salt}/{spec.rank}/{info.id if info else 0}")
        raw = self._raw(salt)
        if spec.shuffle and spec.buffer > 1:
            raw = _buffer_shuffle(raw, spec.buffer, rng)
        run: list = []  # raw samples and skip records, in stream order
        for item in raw:
            run.append(item)
            if len(run) == DECODE_RUN:
                yield from _convert(run, spec.mode, spec.transform)
                run = []
        yield from _convert(run, spec.mode, spec.transform)

    def __iter__(self):
        salt = 0
        imgs: list[torch.Tensor] = []
        targets: list = []
        skips: list[Skip] = []
        while True:
            produced = False
            for item in self._samples(salt):
                if isinstance(item, Skip):
                    skips.append(item)
                    continue
                produced = True
                imgs.append(item[0])
                targets.append(item[1])
                if len(imgs) == self.batch_size:
                    yield torch.stack(imgs), default_collate(targets), skips
                    imgs, targets, skips = [], [], []
            if not (self.endless and produced):
                break
            salt += 1
        if imgs and not self.drop_last:
            yield torch.stack(imgs), default_collate(targets), skips
        elif skips:
            yield None, None, skips


# samples decoded together before they are transformed (see ``_convert``)
DECODE_RUN = 32


def _convert(run: list, mode: str, transform: Callable) -> Iterator[tuple[torch.Tensor, object] | Skip]:
    """(input tensor, target) of each raw sample in ``run``, bad ones as ``Skip``, in ``run``'s order.

    Decodes the whole run first, then transforms lazily, one sample per request: two tight loops
    keep each one's code and data in cache, which costs less per image than alternating decode
    and transform. Transforms still run one at a time, in order, when the
    batch asks for them, so random draws interleave with training exactly as before.
    """
    fast = getattr(transform, "from_bytes", None)  # eval transforms decode straight to the input
    decoded: list = []
    for item in run:
        if isinstance(item, Skip):
            decoded.append(item)
            continue
        data, target, key, shard = item
        try:
            decoded.append((fast(data, mode) if fast is not None else decode_image(data, mode), target, key, shard))
        except (BadImage, OSError, ValueError) as e:  # kept in its place: a consumer that stops early never sees it
            decoded.append(Skip(shard, key, str(e) if isinstance(e, BadImage) else f"cannot convert: {e}"))
    for item in decoded:
        if isinstance(item, Skip):
            yield item
            continue
        img, target, key, shard = item
        if fast is None:
            try:
                img = transform(img)
            except (OSError, ValueError) as e:
                yield Skip(shard, key, f"cannot convert: {e}")
                continue
        yield img, target


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle through a buffer of ``size``; skip records pass straight through."""
    buf: list = []
    for item in items:
        if isinstance(item, Skip):
            yield item
            continue
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def _loader(spec: StreamSpec, epoch: int, batch_size: int, workers: int, endless: bool = True,
            drop_last: bool = True) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(hash((spec.seed, epoch, spec.rank)) & 0x7FFFFFFF)
    return DataLoader(ShardStream(spec, epoch, batch_size, endless=endless, drop_last=drop_last), batch_size=None,
                      num_workers=workers, generator=gen, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None)


def _counted(loader: Iterator, log: SkipLog | None) -> Iterator:
    """(images, targets) of each batch; skip records go to ``log``."""
    for x, y, skips in loader:
        if log is not None:
            log.extend(skips)
        if x is None:
            continue
        if log is not None:
            log.use(len(x))
        yield x, y


def epoch_batches(spec: StreamSpec, epoch: int, steps: int, batch_size: int, workers: int,
                  log: SkipLog | None = None) -> Iterator:
    """Exactly ``steps`` batches for ``epoch`` (a pass over the share, topped up by the next)."""
    n = 0
    for batch in _counted(_loader(spec, epoch, batch_size, workers), log):
        yield batch
        n += 1
        if n >= steps:
            return
    raise DataError(f"rank {spec.rank}: the data stream has no usable sample ({len(spec.shards)} shard(s))")


def endless_batches(spec: StreamSpec, epoch: int, batch_size: int, workers: int,
                    log: SkipLog | None = None) -> Iterator:
    """Batches forever (the labeled stream beside the pseudo-labeled one)."""
    yield from _counted(_loader(spec, epoch + 100003, batch_size, workers), log)
    raise DataError(f"rank {spec.rank}: the labeled stream has no usable sample")


def eval_batches(shards: list[str], mode: str, transform: Callable, batch_size: int, workers: int,
                 rank: int = 0, world: int = 1, log: SkipLog | None = None,
                 rows: dict[str, int] | None = None) -> Iterator:
    """One unshuffled pass over this rank's share, last batch kept; bad samples go to ``log``."""
    spec = StreamSpec(shards=shards, mode=mode, transform=transform, rank=rank, world=world, shuffle=False,
                      rows=rows)
    return _counted(_loader(spec, 0, batch_size, workers, endless=False, drop_last=False), log)
