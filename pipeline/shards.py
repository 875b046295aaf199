"""Webdataset tar shards: writing them atomically and reading them without pickle.

A sample is the group of tar members sharing a key: ``<key>.png`` (or the original ``.jpg``...),
``<key>.cls`` (the label as ASCII digits). Shards are
written with fixed member metadata, so the same input gives byte-identical shards.
Reading uses webdataset's tar iteration but decodes nothing itself: images are decoded by
``decode_image`` and labels by ``int()``, never by pickle.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torchvision.io as tvio
import webdataset as wds
from PIL import Image

from .artifacts import atomic_path, sha256_file

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[dict]) -> dict:
    """Write ``samples`` (dicts with ``__key__`` and ext -> bytes) to ``path`` atomically.

    Returns ``{"file", "samples", "bytes", "sha256"}`` for the manifest.
    """
    n = 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for s in samples:
                key = s["__key__"]
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
                for ext, data in s.items():
                    if ext.startswith("__"):
                        continue
                    _add_member(tf, f"{key}.{ext}", data if isinstance(data, bytes) else str(data).encode())
                n += 1
    return {"file": path.name, "samples": n, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def expand_shards(pattern: str | list[str]) -> list[str]:
    """Brace-expand a shard pattern (``a-{000000..000009}.tar``); lists and ``::`` joins allowed."""
    if isinstance(pattern, list):
        return [u for p in pattern for u in expand_shards(p)]
    return list(wds.shardlists.expand_urls(pattern))


def split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def iter_samples(url: str | Path) -> Iterator[dict]:
    """Samples of one shard as ``{"__key__": ..., ext: bytes}``, in the shard's order.

    Members are grouped by key as webdataset does; only regular files are read.
    """
    stream = wds.gopen(str(url), "rb")
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            current: dict | None = None
            for member in tf:
                if not member.isreg():
                    continue
                key, ext = split_name(member.name)
                if not ext or key.startswith("__") or ext.startswith("__"):
                    continue
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": str(url)}
                current[ext.lower()] = data
            if current is not None:
                yield current
    finally:
        stream.close()


def image_bytes(sample: dict) -> bytes | None:
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    return None


def decode_image(data: bytes, mode: str) -> Image.Image:
    """Decode encoded image bytes as ``mode`` ("L" or "RGB").

    torchvision's decoder (libpng/libjpeg) is several times faster than PIL's for small images;
    formats it does not read (BMP, TIFF, ...) go through PIL.
    """
    try:
        t = tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                              mode=tvio.ImageReadMode.GRAY if mode == "L" else tvio.ImageReadMode.RGB)
        arr = t.numpy()
        return Image.fromarray(arr[0] if mode == "L" else arr.transpose(1, 2, 0).copy(), mode)
    except RuntimeError:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img if img.mode == mode else img.convert(mode)


def sample_label(sample: dict) -> int | None:
    raw = sample.get("cls")
    return None if raw is None else int(raw)


def assign(items: list, consumer: int, consumers: int) -> tuple[list, int, int]:
    """Split shards between ``consumers`` (ranks x workers) so none is read twice or skipped.

    With at least as many shards as consumers, each takes whole shards; otherwise every consumer
    reads every shard and keeps the samples whose position modulo ``consumers`` is its own.
    Returns (shards to read, modulus, remainder).
    """
    if len(items) >= consumers:
        return items[consumer::consumers], 1, 0
    return list(items), consumers, consumer
