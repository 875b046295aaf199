"""Size limits on every input, checked before the bytes are read or the pixels decoded.

Data from outside can be hostile or broken in ways that take a machine down: a 380 KB PNG that
claims 20,000 x 20,000 pixels, a 3 MB gzip shard that holds one 3 GB member. Every reader asks
here first; what is over a limit is a counted skip (``bad_samples``) naming the limit, like any
other bad sample. The stage commands set the limits from ``data.max_image_pixels`` and
``data.max_member_bytes`` before any data is read.
"""

from __future__ import annotations

LIMITS = {"max_image_pixels": 100_000_000, "max_member_bytes": 256 * 2**20}


def set_limits(max_image_pixels: int | None = None, max_member_bytes: int | None = None) -> None:
    if max_image_pixels is not None:
        LIMITS["max_image_pixels"] = int(max_image_pixels)
    if max_member_bytes is not None:
        LIMITS["max_member_bytes"] = int(max_member_bytes)


def member_problem(size: int) -> str | None:
    """Why an archive member, shard member or file of ``size`` bytes (decompressed) is not read, or None."""
    limit = LIMITS["max_member_bytes"]
    if size > limit:
        return f"{size} bytes is over data.max_member_bytes ({limit})"
    return None


def pixel_problem(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` is not decoded, or None."""
    limit = LIMITS["max_image_pixels"]
    if width * height > limit:
        return f"{width} x {height} pixels is over data.max_image_pixels ({limit})"
    return None
