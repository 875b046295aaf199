"""Webdataset tar shards: writing them atomically and reading them without pickle.

A sample is the group of tar members sharing a key: ``<key>.png`` (or the original ``.jpg``...),
``<key>.cls`` (the label as ASCII digits). Shards are
written with fixed member metadata, so the same input gives byte-identical shards.
Reading groups tar members by key itself and decodes nothing by pickle: images are decoded by
``images.decode_image`` and labels by ``int()``. Remote shards are fetched by ``remote.open_url``.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds

from pipeline import failpoints
from pipeline.artifacts import atomic_path, sha256_file
from pipeline.data.bad_samples import Skip, Tally
from pipeline.data.limits import member_problem
from pipeline.data.remote import open_url

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
                failpoints.hit("shard_write", path)
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


class ShardError(ValueError):
    """A shard that cannot be read to its end (truncated, damaged, not a tar, unreachable)."""

    def __init__(self, url: str, after: str | None, reason: str):
        self.url, self.after, self.reason = str(url), after, reason
        where = f"after sample {after}" if after else "before its first sample"
        super().__init__(f"shard {url} is damaged {where}: {reason}")


def iter_samples(url: str | Path, unused: Tally | None = None) -> Iterator[dict]:
    """Samples of one shard as ``{"__key__": ..., ext: bytes}``, in the shard's order.

    Members are grouped by key as webdataset does; only regular files are read. Members of no
    sample (no extension, a ``__`` key, a link) are counted in ``unused`` when given. A shard that
    ends early raises ``ShardError`` after yielding every complete sample before the damage.
    """
    try:
        stream = open_url(url)
    except OSError as e:
        raise ShardError(str(url), None, e.strerror or str(e)) from None
    current: dict | None = None
    last: str | None = None
    try:
        try:
            for name, data in _tar_members(stream):
                key, ext = split_name(name)
                if data is None or not ext or key.startswith("__") or ext.startswith("__"):
                    if unused is not None:
                        unused.add(f"{Path(str(url)).name}/{name}", _outside_reason(data))
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None:
                        last = current["__key__"]
                        yield current
                    current, held = {"__key__": key, "__url__": str(url)}, 0
                held += data.size if isinstance(data, Oversize) else len(data)
                if member_problem(held) and not isinstance(data, Oversize):  # many members, each under the limit
                    data = Oversize(held, whole_sample=True)
                current[ext.lower()] = data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ShardError(str(url), last, _tar_reason(e)) from None
        if current is not None:
            yield current
    finally:
        stream.close()


_BLOCK = tarfile.BLOCKSIZE
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


def _tar_members(stream, index: bool = False) -> Iterator[tuple]:
    """(name, data) of each regular-file member of a tar stream (plain or gzip), read sequentially;
    (name, None) for a link, device or fifo member (directories are passed over).

    A small reader of its own instead of ``tarfile``'s stream mode, which costs as much per member
    as a good part of decoding a small PNG: it checks each header's checksum, follows GNU long names
    and pax ``path``/``size`` records, skips every other member type, and raises EOFError for a
    stream that ends before its end-of-archive block.

    ``index`` (a seekable, uncompressed file): (name, (offset of the member's first header block, size))
    instead, seeking past the data, so a pool can be indexed without holding its bytes.
    """
    end = os.fstat(stream.fileno()).st_size if index else 0
    head = stream.read(2)
    if head == b"\x1f\x8b":  # gzip: decompress as we go
        stream = gzip.GzipFile(fileobj=_Prefixed(head, stream))
        head = b""
    elif head == b"":
        raise EOFError("empty file")
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    pos = start = stream.tell() - len(head) if index else 0
    while True:
        block = head + _read_exact(stream, _BLOCK - len(head))
        head = b""
        if len(block) < _BLOCK:
            raise EOFError("truncated (no end-of-archive block)" if block or not first else "empty file")
        first = False
        if block == _ZERO:
            return
        if not _checksum_ok(block, _octal(block[148:156]) or -1):
            raise tarfile.HeaderError("bad checksum in a member header")
        size = _pax_size(pax["size"]) if "size" in pax else _octal(block[124:136])
        kind = block[156:157]
        if kind in _META and size > _MAX_META:
            raise tarfile.HeaderError(f"a {size}-byte extended header (at most {_MAX_META})")
        if kind in _META or index:
            data, pos = _member_data(stream, size, index and kind not in _META, pos, end)
        elif kind in _REGULAR and member_problem(size) is None:
            data, pos = _member_data(stream, size, False, pos, end)
        else:  # over data.max_member_bytes, or a link, directory, device: passed over, never held
            data, pos = (Oversize(size) if kind in _REGULAR else b""), _pass_over(stream, size, pos)
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header of the next member
            pax = _pax_records(data)
            continue
        if kind in (b"g", b"K", b"V"):  # pax global header, a link's long target, a volume label: not inputs
            continue
        name = long_name or pax.get("path") or _ustar_name(block)
        long_name, pax = None, {}
        if kind in _REGULAR:
            yield (name, (start, size)) if index else (name, data)
        elif kind != b"5":  # a link, device or fifo: no data of its own, but an input all the same
            yield name, None
        start = pos


class Oversize:
    """Stands for a member's data that was not read (or, ``whole_sample``, let go of): over
    ``data.max_member_bytes`` (``limits``) alone or with the sample's earlier members."""

    def __init__(self, size: int, whole_sample: bool = False):
        self.size, self.whole_sample = size, whole_sample

    def reason(self, ext: str) -> str:
        what = "its members together" if self.whole_sample else f"member {ext}"
        return f"{what}: {member_problem(self.size)}"


_META = (b"L", b"K", b"x", b"g")  # GNU long name and long link name, pax headers
_MAX_META = 2**20  # a long name or pax record set is a few hundred bytes; more is damage or an attack


def _pass_over(stream, size: int, pos: int) -> int:
    """Read past a member's data and padding in 1 MiB pieces (a gzip or pipe cannot seek), holding none."""
    left = size + (-size % _BLOCK)
    while left:
        got = len(_read_exact(stream, min(left, 2**20)))
        if not got:
            raise EOFError("unexpected end of data")
        left -= got
    return pos + _BLOCK + size + (-size % _BLOCK)


def _member_data(stream, size: int, skip: bool, pos: int, end: int) -> tuple[bytes, int]:
    """A member's data after its header (its padding read too), or, with ``skip``, a seek past both
    (indexing needs no data now); returns (data, the position after it)."""
    pad = -size % _BLOCK
    if skip:
        pos += _BLOCK + size + pad
        if pos > end:
            raise EOFError("unexpected end of data")
        stream.seek(pos)
        return b"", pos
    data = _read_exact(stream, size)
    if len(data) < size or (pad and len(_read_exact(stream, pad)) < pad):
        raise EOFError("unexpected end of data")
    return data, pos + _BLOCK + size + pad


_ZERO = bytes(_BLOCK)


def index_images(path: str | Path, unused: Tally | None = None) -> Iterator[tuple[str, str | None, int, int]]:
    """(key, image extension, offset, largest member size) of each sample in a local, uncompressed shard
    (the offset is the image member's).

    Reads headers only. Samples without an image member are yielded with extension None; members of
    no sample go to ``unused``. Raises ShardError (after yielding what comes before) for a damaged shard.
    """
    current, ext, offset, size, last = None, None, 0, 0, None
    try:
        with open(path, "rb") as f:
            for name, where in _tar_members(f, index=True):
                key, e = split_name(name)
                if where is None or not e or key.startswith("__") or e.startswith("__"):
                    if unused is not None:
                        unused.add(f"{Path(path).name}/{name}", _outside_reason(where))
                    continue
                start, n = where
                if key != current:
                    if current is not None:
                        last = current
                        yield current, ext, offset, size
                    current, ext, offset, size = key, None, 0, 0
                e = e.lower()
                size = max(size, n)  # any member over the limit makes the sample unusable, as read_shard does
                if ext is None and e in IMAGE_KEYS:
                    ext, offset = e, start
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(str(path), last, _tar_reason(err)) from None
    if current is not None:
        yield current, ext, offset, size


class _Prefixed:
    """A stream with bytes already read from it put back in front (for gzip after a magic check)."""

    def __init__(self, prefix: bytes, stream):
        self.prefix, self.stream = prefix, stream

    def read(self, n: int = -1) -> bytes:
        if not self.prefix:
            return self.stream.read(n)
        if n < 0:
            out, self.prefix = self.prefix + self.stream.read(), b""
            return out
        out, self.prefix = self.prefix[:n], self.prefix[n:]
        return out + (self.stream.read(n - len(out)) if n > len(out) else b"")


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n) if n else b""
    while 0 < len(data) < n:  # pipes and sockets return short reads
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field[:1] == b"\x80":  # GNU base-256 for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        value = int(field, 8) if field else 0
    except ValueError:
        value = -1
    if value < 0:
        raise tarfile.HeaderError(f"bad number field {field[:12]!r} in a member header")
    return value


def _pax_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 0:
        raise tarfile.HeaderError(f"bad pax size {text[:20]!r}")
    return size


def _checksum_ok(block: bytes, stored: int) -> bool:
    """The header's byte sum (its checksum field counted as 8 spaces) equals ``stored``.

    The byte sum comes from adler32, whose low half is 1 + the sum mod 65521: C speed, where
    ``sum`` over 512 bytes is a Python loop. A 512-byte block sums to at most 130,560 < 2 x 65521, so
    only a value off by exactly 65521 could pass, where a damaged header is off by anything.
    """
    total = (zlib.adler32(block) & 0xFFFF) - 1 - sum(block[148:156]) + 256
    return (total - stored) % 65521 == 0


def _ustar_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``path`` and ``size`` of a pax header ("<len> <key>=<value>\\n" records)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise tarfile.HeaderError("bad pax header record") from None
        if length <= 0:
            break
        record = data[sp + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key in (b"path", b"size"):
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return "empty file" if "empty file" in text else text


def _outside_reason(data) -> str:
    return "tar member that is not a regular file (link, device...)" if data is None else "tar member of no sample"


def image_bytes(sample: dict) -> bytes | None:
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    return None


def read_shard(url: str | Path, expected: int | None = None, mod: int = 1, rem: int = 0,
               unused: Tally | None = None) -> Iterator[dict | Skip]:
    """The one reader every stage uses: each usable sample of one shard, and a ``Skip`` for each
    thing that is not (a sample without an image member, the lost tail of a damaged tar, a shard
    that ends before the ``expected`` count its manifest promised, an empty shard).

    ``mod``/``rem``: this consumer's share when several read one shard (``stream.assign``); a lost tail
    is counted within that share. ``unused``: where members of no sample are counted.
    """
    name = Path(url).name
    pos = 0

    def lost() -> int:
        return 1 if expected is None else sum(1 for p in range(pos, expected) if p % mod == rem)

    try:
        for pos, sample in enumerate(iter_samples(url, unused), start=1):
            if (pos - 1) % mod != rem:
                continue
            big = next((k for k, v in sample.items() if isinstance(v, Oversize)), None)
            if big is not None:
                yield Skip(name, sample["__key__"], sample[big].reason(big))
                continue
            if image_bytes(sample) is None:
                members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
                yield Skip(name, sample["__key__"], f"no image member (has: {members or 'nothing'})")
                continue
            yield sample
    except ShardError as e:
        yield Skip(name, f"after {e.after}" if e.after else "-", f"damaged tar: {e.reason}", lost())
        return
    if expected is not None and pos < expected:
        yield Skip(name, "-", f"shard ends early ({pos} of {expected} samples)", lost())
    elif pos == 0:
        yield Skip(name, "-", "empty shard", 0)


def sample_label(sample: dict) -> int | None:
    raw = sample.get("cls")
    return None if raw is None else int(raw)
