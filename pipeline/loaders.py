"""Training and evaluation data streams over shards, split by rank and DataLoader worker.

Webdataset loaders do not go through ``accelerator.prepare``: each rank reads its own shards
(``shards.assign``). Shuffling is per epoch and seeded (shard order, then a buffer of encoded
samples), so a resumed run sees the same order. An epoch is a fixed number of batches on every
rank, so ranks never wait on each other at the end of an epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import assign, decode_image, image_bytes, iter_samples, sample_label

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


class ShardStream(IterableDataset):
    """(uint8 image tensor, target) samples of this rank/worker's share, for one epoch.

    ``endless``: after a pass, start another (reshuffled) one, so a batch always fills however
    small the share; the caller takes as many batches as it needs.
    """

    def __init__(self, spec: StreamSpec, epoch: int, endless: bool = False):
        self.spec, self.epoch, self.endless = spec, epoch, endless

    def _raw(self, salt: int) -> Iterator[tuple[bytes, object, str]]:
        spec = self.spec
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        shards = list(spec.shards)
        if spec.shuffle:
            random.Random(f"{spec.seed}/{self.epoch}/{salt}").shuffle(shards)
        mine, mod, rem = assign(shards, spec.rank * nworkers + wid, spec.world * nworkers)
        for shard in mine:
            table = spec.targets(shard) if spec.targets is not None else None
            for pos, sample in enumerate(iter_samples(shard)):
                if pos % mod != rem:
                    continue
                key = sample["__key__"]
                data = image_bytes(sample)
                if data is None:
                    raise ValueError(f"{shard}: sample {key} has no image")
                label = sample_label(sample)
                if label is None:
                    label = spec.missing_label
                if table is None:
                    if label is None:
                        raise ValueError(f"{shard}: sample {key} has no label (.cls)")
                    yield data, label, key
                    continue
                repeat, target = table.get(key, (0, None))
                if spec.with_label:
                    target = (target, -1 if label is None else label)
                for _ in range(repeat):
                    yield data, target, key

    def __iter__(self):
        spec = self.spec
        info = get_worker_info()
        wid = info.id if info else 0
        salt = 0
        while True:
            rng = random.Random(f"{spec.seed}/{self.epoch}/{salt}/{spec.rank}/{wid}")
            raw = self._raw(salt)
            if spec.shuffle and spec.buffer > 1:
                raw = _buffer_shuffle(raw, spec.buffer, rng)
            produced = False
            for data, target, key in raw:
                try:
                    img = decode_image(data, spec.mode)
                except Exception as e:
                    raise ValueError(f"cannot decode image of sample {key}: {e}") from None
                produced = True
                yield spec.transform(img), target
            if not (self.endless and produced):
                return
            salt += 1


def _buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def _loader(spec: StreamSpec, epoch: int, batch_size: int, workers: int) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(hash((spec.seed, epoch, spec.rank)) & 0x7FFFFFFF)
    return DataLoader(ShardStream(spec, epoch, endless=True), batch_size=batch_size, num_workers=workers,
                      drop_last=True, generator=gen, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None)


def epoch_batches(spec: StreamSpec, epoch: int, steps: int, batch_size: int, workers: int) -> Iterator:
    """Exactly ``steps`` batches for ``epoch`` (a pass over the share, topped up by the next)."""
    n = 0
    for batch in _loader(spec, epoch, batch_size, workers):
        yield batch
        n += 1
        if n >= steps:
            return
    raise RuntimeError(f"rank {spec.rank}: the data stream is empty ({len(spec.shards)} shard(s))")


def endless_batches(spec: StreamSpec, epoch: int, batch_size: int, workers: int) -> Iterator:
    """Batches forever (the labeled stream beside the pseudo-labeled one)."""
    yield from _loader(spec, epoch + 100003, batch_size, workers)
    raise RuntimeError(f"rank {spec.rank}: the labeled stream is empty")


def eval_batches(shards: list[str], mode: str, transform: Callable, batch_size: int, workers: int,
                 rank: int = 0, world: int = 1) -> DataLoader:
    """One unshuffled pass over this rank's share, last batch kept."""
    spec = StreamSpec(shards=shards, mode=mode, transform=transform, rank=rank, world=world, shuffle=False)
    return DataLoader(ShardStream(spec, 0, endless=False), batch_size=batch_size, num_workers=workers, drop_last=False,
                      prefetch_factor=4 if workers else None)
