"""Image preprocessing: PIL image -> uint8 tensor in workers, float normalisation per batch.

Workers hand over uint8 tensors (4x less to copy than float) and the batch is normalised in one
vectorised step on the training device.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from .config import TrainConfig
from .noise import erasing, randaugment
from .shards import decode_image, decode_tensor


class EvalTransform:
    """Resize (when needed) to ``size`` x ``size`` and convert; no augmentation.

    ``from_bytes`` skips the PIL round trip when the decoded image already has the model's size
    (the common case): a third of the per-image cost of reading a shard at 28 px.
    """

    def __init__(self, size: int):
        self.size = size
        self.compose = T.Compose([_resize_if_needed(size), T.PILToTensor()])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.compose(img)

    def from_bytes(self, data: bytes, mode: str) -> torch.Tensor:
        t = decode_tensor(data, mode) if data else None
        if t is not None and t.shape[-2:] == (self.size, self.size):
            return t
        return self(decode_image(data, mode))


def eval_transform(size: int) -> EvalTransform:
    return EvalTransform(size)


def to_input(data: bytes, mode: str, transform: Callable) -> torch.Tensor:
    """Encoded image bytes -> the transform's uint8 tensor (raises ``shards.BadImage``)."""
    fast = getattr(transform, "from_bytes", None)
    return fast(data, mode) if fast is not None else transform(decode_image(data, mode))


class _resize_if_needed:
    def __init__(self, size: int):
        self.size = size
        self.resize = T.Resize((size, size), antialias=True)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.size == (self.size, self.size) else self.resize(img)


class RandomShift:
    """Random crop of a zero-padded image (pad by ``pad`` on each side), done as one PIL crop."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, img: Image.Image) -> Image.Image:
        dx, dy = random.randint(-self.pad, self.pad), random.randint(-self.pad, self.pad)
        w, h = img.size
        return img.crop((dx, dy, dx + w, dy + h))


def train_transform(size: int, cfg: TrainConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Random crop with padding and flips, then RandAugment and random erasing, each when the config enables it."""
    ops: list = [_resize_if_needed(size)]
    if cfg.crop_pad:
        ops.append(RandomShift(cfg.crop_pad))
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    ra = randaugment(cfg)
    if ra is not None:
        ops.append(ra)
    ops.append(T.PILToTensor())
    er = erasing(cfg)
    if er is not None:
        ops.append(er)
    return T.Compose(ops)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> float, scaled to [0, 1] and standardised with per-channel ``mean``/``std``."""
    x = x.float().div_(255.0).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
