"""Size limits on every input, checked before the bytes are read or the pixels decoded.

Data from outside can be hostile or broken in ways that take a machine down: a 380 KB PNG that
claims 20,000 x 20,000 pixels, a 3 MB gzip shard that holds one 3 GB member. Every reader asks
here first; what is over a limit is a counted skip (``bad_samples``) naming the limit, like any
other bad sample.

The limits come from the config (``data.max_image_pixels``, ``data.max_member_bytes``): each
library entry point that reads data applies its config's (``use``), and every stream carries the
limits it was made under to its DataLoader workers (``stream.StreamSpec.limits``), so a worker
started by spawn reads under the same ones. In the process itself (``workers=0``) the limits in
force are the entry point's, which made the stream.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = 100_000_000
    max_member_bytes: int = 256 * 2**20

    @classmethod
    def of(cls, data) -> Limits:
        """The limits a ``DataConfig`` sets."""
        return cls(int(data.max_image_pixels), int(data.max_member_bytes))


_in_force = [Limits()]  # the limits of the work in hand (one process reads under one config at a time)


def use(limits: Limits) -> None:
    """Read under ``limits`` from now on (an entry point with its config; a worker with its stream's)."""
    _in_force[0] = limits


def current() -> Limits:
    return _in_force[0]


def member_problem(size: int) -> str | None:
    """Why an archive member, shard member or file of ``size`` bytes (decompressed) is not read, or None."""
    limit = _in_force[0].max_member_bytes
    if size > limit:
        return f"{size} bytes is over data.max_member_bytes ({limit})"
    return None


def pixel_problem(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` is not decoded, or None."""
    limit = _in_force[0].max_image_pixels
    if width * height > limit:
        return f"{width} x {height} pixels is over data.max_image_pixels ({limit})"
    return None
