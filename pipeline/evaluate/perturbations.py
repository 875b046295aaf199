"""ImageNet-P style perturbation sequences: each image becomes a short clip whose frames change by a small
step, so the flip rate of a classifier over the clip (``robustness.flip_rate``) measures how stable its
predictions are under changes too small to matter. Frame 0 is always the clean image.

Parameters (intensities on a 0..1 scale, i.e. pixel / 255; "side" is ``max(H, W)`` of the image):

=============== ===================================================== ============== ==============
name            frame t (t = 1 .. frames - 1)                         side <= 64 px  side > 64 px
=============== ===================================================== ============== ==============
gaussian_noise  clean + fresh N(0, sigma^2) noise, independent per     sigma = 0.03   sigma = 0.03
                frame (frames are not ordered)
shot_noise      Poisson(lam * clean) / lam, fresh draw per frame       lam = 250      lam = 250
brightness      clean + sign * step * t, sign = +-1 per sequence       step = 0.02    step = 0.02
translate       shifted t px along one of +x, -x, +y, -y (per seq.)    1 px / frame   1 px / frame
rotate          rotated sign * step * t degrees about the centre       1.5 deg/frame  0.5 deg/frame
zoom            zoomed in about the centre by scale 1 + step * t       step = 0.03    step = 0.01
=============== ===================================================== ============== ==============

Results are rounded to the nearest integer and clipped to 0..255. Fill: translate and rotate replicate
the edge pixels (no black border that grows frame by frame and becomes a cue of its own); zoom only zooms
in, so it never samples outside the image. Rotate and zoom use bilinear interpolation through
``torchvision.transforms.v2.functional`` on the uint8 batch (one call per frame and rotation sign);
noise, brightness and translate are plain tensor ops. All randomness (directions, signs, noise) comes
from a local ``torch.Generator`` seeded by ``seed``, never the global RNG, so a clip depends only on the
seed, the batch and the image's position in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

SMALL_MAX_SIDE = 64
"""Images whose longer side is at most this many pixels use the "small" steps."""

# name -> (step for side <= SMALL_MAX_SIDE, step for larger images); meaning per name in the module table.
STEPS: dict[str, tuple[float, float]] = {
    "gaussian_noise": (0.03, 0.03),
    "shot_noise": (250.0, 250.0),
    "brightness": (0.02, 0.02),
    "translate": (1.0, 1.0),
    "rotate": (1.5, 0.5),
    "zoom": (0.03, 0.01),
}


def _step(name: str, images: torch.Tensor) -> float:
    small, large = STEPS[name]
    return small if max(images.shape[-2:]) <= SMALL_MAX_SIDE else large


def _empty_like_clip(images: torch.Tensor, frames: int) -> torch.Tensor:
    """uint8 (N, frames, C, H, W) with frame 0 already set to the clean images."""
    out = torch.empty((images.shape[0], frames, *images.shape[1:]), dtype=torch.uint8)
    out[:, 0] = images
    return out


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen) * 2 - 1


def _shift(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """Move the content of ``x`` by ``shift`` pixels along ``dim``, replicating the edge it uncovers
    (output index i shows input index clamp(i - shift)); slicing, so it is cheap on uint8."""
    n = x.shape[dim]
    shift = max(-(n - 1), min(n - 1, shift))  # beyond n - 1 every position shows the edge anyway
    if shift == 0:
        return x
    size = list(x.shape)
    size[dim] = abs(shift)
    if shift > 0:
        return torch.cat([x.narrow(dim, 0, 1).expand(size), x.narrow(dim, 0, n - shift)], dim)
    return torch.cat([x.narrow(dim, -shift, n + shift), x.narrow(dim, n - 1, 1).expand(size)], dim)


def _edge_pad(x: torch.Tensor, m: int) -> torch.Tensor:
    """Pad the last two dims by ``m`` pixels replicating the border (works on uint8, unlike F.pad)."""
    for dim in (-2, -1):
        size = list(x.shape)
        size[dim] = m
        n = x.shape[dim]
        x = torch.cat([x.narrow(dim, 0, 1).expand(size), x, x.narrow(dim, n - 1, 1).expand(size)], dim)
    return x


def _groups(keys: torch.Tensor, values: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Order that makes images with the same key contiguous, and (key, start, end) for each key, so
    per-group transforms work on slices; undo the order with ``_unsort``."""
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=values).tolist()
    bounds, start = [], 0
    for key, c in enumerate(counts):
        if c:
            bounds.append((key, start, start + c))
        start += c
    return order, bounds


def _unsort(clip: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return clip.index_select(0, inverse)


def gaussian_noise(images: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """Clean image plus independent Gaussian noise in every frame after the first."""
    sigma = _step("gaussian_noise", images) * 255.0
    out, clean = _empty_like_clip(images, frames), images.float()
    for t in range(1, frames):
        noise = torch.randn(clean.shape, generator=gen)
        out[:, t] = _to_uint8(noise.mul_(sigma).add_(clean))
    return out


def shot_noise(images: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """Photon (Poisson) noise, stronger in bright pixels, drawn afresh in every frame after the first."""
    lam = _step("shot_noise", images)
    out, rate = _empty_like_clip(images, frames), images.float() * (lam / 255.0)
    for t in range(1, frames):
        out[:, t] = _to_uint8(torch.poisson(rate, generator=gen).mul_(255.0 / lam))
    return out


def brightness(images: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """Brightness drifting by a fixed step per frame, brighter or darker (a random sign per sequence)."""
    step = _step("brightness", images) * 255.0
    sign = _signs(images.shape[0], gen).float().view(-1, 1, 1, 1)
    out, clean = _empty_like_clip(images, frames), images.float()
    for t in range(1, frames):
        out[:, t] = _to_uint8(clean + sign * (step * t))
    return out


def translate(images: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """Shift by ``t`` pixels at frame ``t`` along a random axis and direction per sequence, edge-filled."""
    px = int(_step("translate", images))
    direction = torch.randint(0, 4, (images.shape[0],), generator=gen)
    moves = ((-1, 1), (-1, -1), (-2, 1), (-2, -1))  # (dim, sign): +x, -x, +y, -y
    order, bounds = _groups(direction, len(moves))
    ordered = images.index_select(0, order)
    out = _empty_like_clip(ordered, frames)
    for d, a, b in bounds:
        dim, sign = moves[d]
        for t in range(1, frames):
            out[a:b, t] = _shift(ordered[a:b], sign * px * t, dim)
    return _unsort(out, order)


def rotate(images: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """Rotate by ``step * t`` degrees at frame ``t``, clockwise or anticlockwise per sequence, edge-filled."""
    step = _step("rotate", images)
    h, w = images.shape[-2:]
    # A pixel at radius <= r from the centre samples a source point at most r * angle away from it; pad by
    # that much (never more than the whole circumscribed circle needs) so the fill is the replicated edge.
    r = math.hypot(h, w) / 2
    max_angle = math.radians(step * (frames - 1))
    m = math.ceil(min(r * max_angle, r - min(h, w) / 2)) + 2
    order, bounds = _groups(torch.randint(0, 2, (images.shape[0],), generator=gen), 2)
    ordered = images.index_select(0, order)
    out = _empty_like_clip(ordered, frames)
    for key, a, b in bounds:
        sign = 1 if key else -1  # 1: anticlockwise (torchvision's positive angle), -1: clockwise
        padded = _edge_pad(ordered[a:b], m)
        for t in range(1, frames):
            turned = TF.rotate(padded, sign * step * t, interpolation=InterpolationMode.BILINEAR)
            out[a:b, t] = turned[..., m:m + h, m:m + w]
    return _unsort(out, order)


def zoom(images: torch.Tensor, frames: int, gen: torch.Generator) -> torch.Tensor:
    """Zoom in about the centre by ``1 + step * t`` at frame ``t`` (deterministic: uses no randomness)."""
    step = _step("zoom", images)
    out = _empty_like_clip(images, frames)
    for t in range(1, frames):
        out[:, t] = TF.affine(images, angle=0.0, translate=[0.0, 0.0], scale=1.0 + step * t, shear=[0.0, 0.0],
                              interpolation=InterpolationMode.BILINEAR)
    return out


PERTURBATIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "brightness": brightness,
    "translate": translate,
    "rotate": rotate,
    "zoom": zoom,
}
"""Registry in a fixed order; each entry maps (uint8 (N, C, H, W), frames, generator) to a uint8 clip.
Call them through ``sequence``, which validates the input and seeds the generator."""


def sequence(images: torch.Tensor, name: str, frames: int = 10, seed: int = 0) -> torch.Tensor:
    """The perturbation clip of every image: uint8 (N, C, H, W) with C in {1, 3} -> uint8
    (N, frames, C, H, W), frame 0 the clean image. The same seed and batch give the same clips."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choices: {list(PERTURBATIONS)}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (frame 0 is the clean image), got {frames}")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be a uint8 tensor of shape (N, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    gen = torch.Generator().manual_seed(seed)
    return PERTURBATIONS[name](images.cpu().contiguous(), frames, gen)
