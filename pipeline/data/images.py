"""Image decoding: encoded bytes (PNG, JPEG, and what PIL reads) into the model's input mode, with
one error (``BadImage``) that names why a sample cannot be used."""

from __future__ import annotations

import io

import numpy as np
import torch
import torchvision.io as tvio
from PIL import Image, UnidentifiedImageError

from pipeline.data.limits import pixel_problem


class BadImage(ValueError):
    """Image bytes that cannot become a picture of the model's input mode."""


_READ_MODE = {"L": tvio.ImageReadMode.GRAY.value, "RGB": tvio.ImageReadMode.RGB.value}


_PNG_MODES = {2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def header_mode_size(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """(PIL's mode name, (width, height)) from a PNG's IHDR or a JPEG's frame header, without
    decoding (PIL's ``Image.open`` costs ~10x more); None for other formats."""
    size = _png_jpeg_size(data)
    if size is None:
        return None
    if data[:2] == b"\xff\xd8":
        i = _jpeg_frame(data)
        mode = _JPEG_MODES.get(data[i + 9]) if i + 9 < len(data) else None
    elif len(data) >= 26:
        depth, kind = data[24], data[25]
        mode = ({1: "1", 16: "I;16"}.get(depth, "L") if kind == 0 else _PNG_MODES.get(kind))
    else:
        mode = None
    return (mode, size) if mode else None


def _jpeg_frame(data: bytes) -> int | None:
    """Offset of a JPEG's start-of-frame segment (size, then component count), or None."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return i
        i += 2 + length
    return None


def _png_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's frame header, without decoding; None otherwise."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    i = _jpeg_frame(data) if data[:2] == b"\xff\xd8" else None
    if i is None:
        return None
    return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")


def _check_size(w: int, h: int) -> None:
    """The pixel limit (``limits``), checked from the header before any pixel is decoded."""
    problem = pixel_problem(w, h)
    if problem:
        raise BadImage(problem)


def decode_tensor(data: bytes, mode: str) -> torch.Tensor | None:
    """8-bit PNG/JPEG bytes as a uint8 CHW tensor in ``mode`` through torchvision's decoder, or None
    for what it cannot read that way (other formats, 16-bit, empty): ``decode_image`` handles those.

    Calls torchvision's decoding op itself, a private API: its public wrapper warns on every call
    since torchvision 0.29 and is slower on small images (bench/results/private_apis.json;
    tests/test_private_apis.py fails the day the op goes).
    """
    size = _png_jpeg_size(data)
    if size is None:
        return None
    _check_size(*size)  # before any pixel is decoded
    x = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        t = torch.ops.image.decode_image(x, _READ_MODE[mode], False)
    except (RuntimeError, ValueError, TypeError, AttributeError):
        return None
    return t if t.dtype == torch.uint8 and t.numel() else None


def decode_image(data: bytes, mode: str) -> Image.Image:
    """Decode encoded image bytes as ``mode`` ("L" or "RGB"), or raise BadImage saying why.

    torchvision's decoder (libpng/libjpeg) is several times faster than PIL's for small images;
    formats it does not read (BMP, TIFF, ...) go through PIL. Other channel counts are converted
    and 16-bit grayscale is scaled to 8 bits.
    """
    if not data:
        raise BadImage("empty image bytes")
    t = decode_tensor(data, mode)
    if t is not None:
        h, w = t.shape[-2:]
        arr = t[0].numpy() if mode == "L" else t.permute(1, 2, 0).contiguous().numpy()
        return Image.frombuffer(mode, (w, h), arr, "raw", mode, 0, 1)  # no copy (fromarray copies)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        _check_size(*img.size)
        img.load()
        if img.mode == "I" or img.mode.startswith("I;16"):
            img = Image.fromarray((np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
        img = img if img.mode == mode else img.convert(mode)
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 - foreign bytes: whatever the decoder raises, this image is bad
        text = str(e).strip().splitlines()
        raise BadImage(f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__) from None
    if img.width == 0 or img.height == 0:
        raise BadImage("zero-size image")
    return img
