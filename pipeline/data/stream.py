"""The one sample path every stage reads shards through: shards → split by rank and worker →
(shuffle) → decode-or-skip → batch, as named stages.

Training, the teacher's labeling pass, evaluation and predict use the same stages, so a damaged
input is the same counted ``Skip`` with the same reason wherever it is met (``decode_or_skip`` is
the one skip policy; ``bad_samples.SkipLog`` the one accounting, in the main process).

Webdataset loaders do not go through ``accelerator.prepare``: each rank reads its own shards
(``split``). Shuffling is per epoch and seeded (shard order, then a buffer of encoded samples), so a
resumed run sees the same order. A training epoch is a fixed number of batches on every rank, so
ranks never wait on each other at the end of an epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline.data import limits
from pipeline.data.bad_samples import Skip, SkipLog
from pipeline.data.images import BadImage, decode_image
from pipeline.data.limits import Limits
from pipeline.data.shards import image_bytes, read_shard, sample_label
from pipeline.errors import DataError

# shard path -> {key: (repeat count, target)}; None means "every sample once, target = its label"
TargetFn = Callable[[str], dict]
# an encoded sample on its way through the stages: (image bytes, target, key, shard name)
Raw = tuple[bytes, object, str, str]
DECODE_RUN = 32  # samples decoded together before they are transformed (``decode_or_skip``)


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
    labels: bool = True  # False: no label is read and the target is the sample's key (labeling, predict)
    limits: Limits = field(default_factory=limits.current)  # what it reads under, in every worker too


class Batch(NamedTuple):
    """Images (uint8 NCHW, None when every sample was bad), their targets and keys, and the skips met
    since the previous batch (a tuple, so DataLoader's pinning and worker transfer handle it)."""

    x: torch.Tensor | None
    y: object
    keys: list[str]
    skips: list[Skip]


def assign(items: list, consumer: int, consumers: int) -> tuple[list, int, int]:
    """Split shards between ``consumers`` (ranks x workers) so none is read twice or skipped.

    With at least as many shards as consumers, each takes whole shards; otherwise every consumer
    reads every shard and keeps the samples whose position modulo ``consumers`` is its own.
    Returns (shards to read, modulus, remainder).
    """
    if len(items) >= consumers:
        return items[consumer::consumers], 1, 0
    return list(items), consumers, consumer


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


# ---------------------------------------------------------------- the stages


def split(spec: StreamSpec, epoch: int, salt: int) -> tuple[list[str], int, int]:
    """This rank and worker's shards (in the epoch's seeded order) and share of each; the worker reads
    under the stream's limits (one started by spawn has imported the defaults)."""
    if get_worker_info() is not None:
        limits.use(spec.limits)
    wid, nworkers = _worker()
    shards = list(spec.shards)
    if spec.shuffle:
        random.Random(f"{spec.seed}/{epoch}/{salt}").shuffle(shards)
    return assign(shards, spec.rank * nworkers + wid, spec.world * nworkers)


def samples(spec: StreamSpec, shards: Iterable[str], mod: int = 1, rem: int = 0) -> Iterator[Raw | Skip]:
    """Each sample of ``shards`` with its target (the label, or the pseudo-label table's, repeated as
    it says), and a ``Skip`` for each that cannot be used, in the shards' order."""
    for shard in shards:
        name = Path(shard).name
        table = spec.targets(shard) if spec.targets is not None else None
        for sample in read_shard(shard, (spec.rows or {}).get(name), mod, rem):
            if isinstance(sample, Skip):
                yield sample
                continue
            key, data = sample["__key__"], image_bytes(sample)
            if not spec.labels:
                yield data, key, key, name
                continue
            try:
                label = sample_label(sample)
            except ValueError:
                yield Skip(name, key, "label (.cls) is not an integer")
                continue
            label = spec.missing_label if label is None else label
            if table is None:
                yield (data, label, key, name) if label is not None else Skip(name, key, "no label (.cls)")
                continue
            repeat, target = table.get(key, (0, None))
            if spec.with_label:
                target = (target, -1 if label is None else label)
            for _ in range(repeat):
                yield data, target, key, name


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
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


def decode_or_skip(items: Iterable[Raw | Skip], mode: str, transform: Callable) -> Iterator[tuple | Skip]:
    """(input tensor, target, key, shard) of each sample, a ``Skip`` for each that cannot be decoded
    or transformed, in the items' order: the one skip policy of every stage.

    Decodes a run of ``DECODE_RUN`` samples first, then transforms lazily, one sample per request:
    two tight loops keep each one's code and data in cache, and random draws still interleave with
    training in order.
    """
    run: list = []
    for item in items:
        run.append(item)
        if len(run) == DECODE_RUN:
            yield from _decode_run(run, mode, transform)
            run = []
    yield from _decode_run(run, mode, transform)


def _decode_run(run: list, mode: str, transform: Callable) -> Iterator[tuple | Skip]:
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
            decoded.append(Skip(shard, key, bad_reason(e)))
    for item in decoded:
        if isinstance(item, Skip) or fast is not None:
            yield item
            continue
        img, target, key, shard = item
        try:
            yield transform(img), target, key, shard
        except (OSError, ValueError) as e:
            yield Skip(shard, key, bad_reason(e))


def bad_reason(e: Exception) -> str:
    """Why an image could not be used, as every stage reports it."""
    return str(e) if isinstance(e, BadImage) else f"cannot convert: {e}"


def batched(items: Iterable[tuple | Skip], size: int, drop_last: bool = True) -> Iterator[Batch]:
    """Batches of ``size`` samples carrying the skips met since the last one; the last, shorter batch
    unless ``drop_last`` (then skips after the last full batch come in a batch with no images)."""
    imgs: list[torch.Tensor] = []
    targets: list = []
    keys: list[str] = []
    skips: list[Skip] = []
    for item in items:
        if isinstance(item, Skip):
            skips.append(item)
            continue
        imgs.append(item[0])
        targets.append(item[1])
        keys.append(item[2])
        if len(imgs) == size:
            yield Batch(torch.stack(imgs), default_collate(targets), keys, skips)
            imgs, targets, keys, skips = [], [], [], []
    if imgs and not drop_last:
        yield Batch(torch.stack(imgs), default_collate(targets), keys, skips)
    elif skips:
        yield Batch(None, None, [], skips)


# ---------------------------------------------------------------- training and evaluation streams


class ShardStream(IterableDataset):
    """Batches of this rank/worker's share for one epoch: ``split`` → ``samples`` → ``shuffled`` →
    ``decode_or_skip`` → ``batched``.

    ``endless``: after a pass, start another (reshuffled) one, so a batch always fills however small
    the share; the caller takes as many as it needs.
    """

    def __init__(self, spec: StreamSpec, epoch: int, batch_size: int, endless: bool = False,
                 drop_last: bool = True):
        self.spec, self.epoch, self.endless = spec, epoch, endless
        self.batch_size, self.drop_last = batch_size, drop_last

    def _pass(self, salt: int) -> Iterator[tuple | Skip]:
        spec = self.spec
        shards, mod, rem = split(spec, self.epoch, salt)
        items = samples(spec, shards, mod, rem)
        if spec.shuffle and spec.buffer > 1:
            rng = random.Random(f"{spec.seed}/{self.epoch}/{salt}/{spec.rank}/{_worker()[0]}")
            items = shuffled(items, spec.buffer, rng)
        return decode_or_skip(items, spec.mode, spec.transform)

    def _passes(self) -> Iterator[tuple | Skip]:
        salt = 0
        while True:
            produced = False
            for item in self._pass(salt):
                produced = produced or not isinstance(item, Skip)
                yield item
            if not (self.endless and produced):
                return
            salt += 1

    def __iter__(self) -> Iterator[Batch]:
        return batched(self._passes(), self.batch_size, self.drop_last)


def _loader(spec: StreamSpec, epoch: int, batch_size: int, workers: int, endless: bool = True,
            drop_last: bool = True) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(hash((spec.seed, epoch, spec.rank)) & 0x7FFFFFFF)
    return DataLoader(ShardStream(spec, epoch, batch_size, endless=endless, drop_last=drop_last), batch_size=None,
                      num_workers=workers, generator=gen, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None)


def counted(batches: Iterable[Batch], log: SkipLog | None) -> Iterator[Batch]:
    """The batches with images; every skip goes to ``log`` and every used sample is counted."""
    for b in batches:
        if log is not None:
            log.extend(b.skips)
        if b.x is None:
            continue
        if log is not None:
            log.use(len(b.x))
        yield b


def epoch_batches(spec: StreamSpec, epoch: int, steps: int, batch_size: int, workers: int,
                  log: SkipLog | None = None) -> Iterator[tuple]:
    """Exactly ``steps`` (images, targets) batches for ``epoch`` (a pass over the share, topped up by the next)."""
    n = 0
    for b in counted(_loader(spec, epoch, batch_size, workers), log):
        yield b.x, b.y
        n += 1
        if n >= steps:
            return
    if log is not None:
        log.check()  # every sample bad: say why, with the first one's reason
    raise DataError(f"rank {spec.rank}: the data stream has no usable sample ({len(spec.shards)} shard(s))")


def endless_batches(spec: StreamSpec, epoch: int, batch_size: int, workers: int,
                    log: SkipLog | None = None) -> Iterator[tuple]:
    """(images, targets) batches forever (the labeled stream beside the pseudo-labeled one)."""
    for b in counted(_loader(spec, epoch + 100003, batch_size, workers), log):
        yield b.x, b.y
    if log is not None:
        log.check()
    raise DataError(f"rank {spec.rank}: the labeled stream has no usable sample")


def eval_batches(shards: list[str], mode: str, transform: Callable, batch_size: int, workers: int,
                 rank: int = 0, world: int = 1, log: SkipLog | None = None,
                 rows: dict[str, int] | None = None) -> Iterator[tuple]:
    """One unshuffled pass over this rank's share, last batch kept; bad samples go to ``log``."""
    spec = StreamSpec(shards=shards, mode=mode, transform=transform, rank=rank, world=world, shuffle=False,
                      rows=rows)
    for b in counted(_loader(spec, 0, batch_size, workers, endless=False, drop_last=False), log):
        yield b.x, b.y
