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

from pipeline.config import TrainConfig
from pipeline.data.images import decode_image, decode_tensor
from pipeline.data.noise import erasing, randaugment


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
    """Encoded image bytes -> the transform's uint8 tensor (raises ``images.BadImage``)."""
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
    """Random crop with padding and flips, then RandAugment and random erasing, each when the config enables it.

    With ``cfg.batch_augment`` only RandAugment stays per image (crop, flip and erasing are
    ``BatchAugment``'s); without RandAugment the image is then decoded straight to a tensor."""
    ra = randaugment(cfg)
    if cfg.batch_augment:
        return eval_transform(size) if ra is None else T.Compose([_resize_if_needed(size), ra, T.PILToTensor()])
    ops: list = [_resize_if_needed(size)]
    if cfg.crop_pad:
        ops.append(RandomShift(cfg.crop_pad))
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    if ra is not None:
        ops.append(ra)
    ops.append(T.PILToTensor())
    er = erasing(cfg)
    if er is not None:
        ops.append(er)
    return T.Compose(ops)


class BatchAugment:
    """Random translate (crop of a zero-padded image), horizontal flip and random erasing of a uint8
    NCHW batch, each image with its own draw: what the per-image PIL ops do, in a few tensor ops
    per batch (at 32 px the per-image PIL path is a sizeable share of a training step: bench/)."""

    ERASE_SCALE, ERASE_RATIO = (0.02, 0.25), (0.3, 3.3)  # as torchvision's RandomErasing

    def __init__(self, pad: int, hflip: bool, erasing: float):
        self.pad, self.hflip, self.erasing = pad, hflip, erasing

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        dev = x.device
        if self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), device=dev)
            dx = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), device=dev)
            rows = dy + torch.arange(h, device=dev).view(1, 1, h, 1)
            cols = dx + torch.arange(w, device=dev).view(1, 1, 1, w)
            x = padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
                       rows, cols]
        if self.hflip:
            x = torch.where((torch.rand(n, device=dev) < 0.5).view(n, 1, 1, 1), x.flip(3), x)
        if self.erasing:
            area = h * w * torch.empty(n, device=dev).uniform_(*self.ERASE_SCALE)
            log_r = torch.empty(n, device=dev).uniform_(*torch.tensor(self.ERASE_RATIO).log().tolist())
            eh = (area * log_r.exp()).sqrt().round().clamp(1, h).long()
            ew = (area / log_r.exp()).sqrt().round().clamp(1, w).long()
            top = (torch.rand(n, device=dev) * (h - eh + 1)).long()
            left = (torch.rand(n, device=dev) * (w - ew + 1)).long()
            on = torch.rand(n, device=dev) < self.erasing
            ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
            box = ((ys >= top.view(n, 1, 1)) & (ys < (top + eh).view(n, 1, 1)) & (xs >= left.view(n, 1, 1))
                   & (xs < (left + ew).view(n, 1, 1)) & on.view(n, 1, 1))
            x = x.masked_fill(box.unsqueeze(1), 0)
        return x


def batch_augment(cfg: TrainConfig) -> BatchAugment | None:
    """The batch augmentation of ``cfg`` (``cfg.batch_augment``), or None when it is off."""
    if not cfg.batch_augment or not (cfg.crop_pad or cfg.hflip or cfg.erasing):
        return None
    return BatchAugment(cfg.crop_pad, cfg.hflip, cfg.erasing)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> float, scaled to [0, 1] and standardised with per-channel ``mean``/``std``."""
    x = x.float().div_(255.0).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
