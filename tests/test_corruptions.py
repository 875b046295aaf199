import math
import random

import numpy as np
import pytest
import torch

from pipeline.evaluate.corruptions import CORRUPTIONS, GROUPS, PARAMS, _swap_sweep, corrupt, corruption_params

NAMES = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
         "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
         "jpeg_compression"]
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
# Same random draws at every severity and a stronger parameter: every pixel moves further from the clean one.
PER_PIXEL_MONOTONE = {"gaussian_noise", "impulse_noise", "brightness", "contrast"}
# A parameter growing with severity (blur size, photons, fog, pixel size, quality): the mean change grows.
MEAN_MONOTONE = PER_PIXEL_MONOTONE | {"shot_noise", "defocus_blur", "motion_blur", "zoom_blur", "fog",
                                      "pixelate", "jpeg_compression"}
# glass_blur, snow, frost: the published tables trade parameters off between severities (no per-step order);
# elastic_transform: severities 1-2 hold the largest affine warps; its own test checks the non-affine part.


def natural_images(n: int, c: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    """Smooth gradients, a disk, a rectangle and a faint stripe texture, as uint8 (n, c, h, w)."""
    w = w or h
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.rand(shape, generator=g)

    ys, xs = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None, :]
    img = 0.2 + 0.5 * r(n, c, 1, 1) + (r(n, c, 1, 1) - 0.5) * 0.6 * xs + (r(n, c, 1, 1) - 0.5) * 0.6 * ys
    cy, cx, rad = r(n, 1, 1, 1), r(n, 1, 1, 1), 0.15 + 0.2 * r(n, 1, 1, 1)
    disk = ((ys - cy) ** 2 + (xs - cx) ** 2 < rad**2).float()
    img = img * (1 - disk) + disk * r(n, c, 1, 1)
    y0, x0 = 0.6 * r(n, 1, 1, 1), 0.6 * r(n, 1, 1, 1)
    rect = ((ys > y0) & (ys < y0 + 0.3) & (xs > x0) & (xs < x0 + 0.35)).float()
    img = img * (1 - rect) + rect * r(n, c, 1, 1)
    img = img + 0.06 * torch.sin(2 * math.pi * (3 + 5 * r(n, 1, 1, 1)) * (xs + 0.5 * ys) + 6 * r(n, 1, 1, 1))
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


BATCHES = {"gray28": natural_images(6, 1, 28, seed=1), "rgb32": natural_images(6, 3, 32, seed=2)}


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_registry_names_order_and_groups():
    assert list(CORRUPTIONS) == NAMES
    assert list(PARAMS) == NAMES
    assert GROUPS == {"noise": NAMES[:3], "blur": NAMES[3:7], "weather": NAMES[7:11], "digital": NAMES[11:]}
    for small, large in PARAMS.values():
        assert len(small) == len(large) == 5
    x = BATCHES["rgb32"][:2]
    assert torch.equal(CORRUPTIONS["fog"](x, 3, seed=4), corrupt(x, "fog", 3, seed=4))
    assert CORRUPTIONS["fog"].__name__ == "fog" and CORRUPTIONS["fog"].__doc__


@pytest.mark.parametrize("kind", ["gray28", "rgb32", "rgb20x36", "rgb72x80"])
@pytest.mark.parametrize("name", NAMES)
def test_keeps_shape_dtype_device_and_changes_image(name, kind):
    others = {"rgb20x36": (2, 3, 20, 36), "rgb72x80": (2, 3, 72, 80)}  # non-square, small and large table
    x = BATCHES[kind] if kind in BATCHES else natural_images(*others[kind], seed=3)
    before = x.clone()
    for severity in (1, 5):
        out = corrupt(x, name, severity, seed=0)
        assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
        assert (out != x).any()
    assert torch.equal(x, before), "input was modified in place"


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name, kind):
    x = BATCHES[kind]
    a, b = corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7)
    assert torch.equal(a, b)
    other = corrupt(x, name, 3, seed=8)
    if name in DETERMINISTIC:
        assert torch.equal(a, other)
    else:
        assert not torch.equal(a, other)


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("name", NAMES)
def test_higher_severity_changes_image_more(name, kind):
    x = BATCHES[kind]
    outs = [corrupt(x, name, s, seed=0) for s in range(1, 6)]
    diffs = [mad(o, x) for o in outs]
    assert all(d > 0 for d in diffs), diffs
    if name == "elastic_transform":
        return  # see test_elastic_local_distortion_grows
    assert diffs[4] > diffs[0], diffs
    if name in MEAN_MONOTONE:
        assert all(b >= a - 0.05 for a, b in zip(diffs, diffs[1:], strict=False)), diffs
    if name in PER_PIXEL_MONOTONE:
        for lo, hi in zip(outs, outs[1:], strict=False):
            d_lo, d_hi = (lo.int() - x.int()).abs(), (hi.int() - x.int()).abs()
            assert (d_hi >= d_lo - 1).all()  # 1: uint8 rounding


def _nonaffine_residual(severity: int, size: int) -> float:
    """Warp an image whose R and G channels encode x and y, read back where each pixel came from, and
    return the RMS (px) of what a least-squares affine map cannot explain (the elastic part)."""
    ramp = torch.arange(size, dtype=torch.float64) * 255 / (size - 1)
    img = torch.full((4, 3, size, size), 128.0, dtype=torch.float64)
    img[:, 0], img[:, 1] = ramp[None, :], ramp[:, None]
    out = corrupt(img.round().to(torch.uint8), "elastic_transform", severity, seed=0).double()
    out = out * (size - 1) / 255
    m = size // 5  # skip the border, where the mirrored padding folds the coordinates
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    a = torch.stack([xs, ys, torch.ones_like(xs)], -1)[m:-m, m:-m].reshape(-1, 3)
    residuals = []
    for o in out:
        b = torch.stack([o[0], o[1]], -1)[m:-m, m:-m].reshape(-1, 2)
        fit = torch.linalg.lstsq(a, b).solution
        residuals.append((a @ fit - b).pow(2).mean())
    return torch.stack(residuals).mean().sqrt().item()


def test_elastic_local_distortion_grows():
    small = [_nonaffine_residual(s, 32) for s in range(1, 6)]
    assert small[0] < 0.1  # CIFAR-10-C severity 1 is a pure affine warp
    assert small[2] < small[3] < small[4] and small[4] > 3 * small[0], small
    large = [_nonaffine_residual(s, 96) for s in (3, 4, 5)]  # ImageNet-C: same affine and sigma, alpha grows
    assert large[0] < large[1] < large[2], large


def test_glass_blur_without_blur_only_moves_pixels():
    x = BATCHES["rgb32"]
    assert corruption_params("glass_blur", 1, 32)[0] < 0.1  # sigma too small for any blur tap
    out = corrupt(x, "glass_blur", 1, seed=0)
    assert (out != x).any()

    def pixels(t):  # the sorted multiset of RGB triples of each image
        packed = (t[:, 0].long() << 16) | (t[:, 1].long() << 8) | t[:, 2].long()
        return packed.flatten(1).sort(1).values

    assert torch.equal(pixels(out), pixels(x))


@pytest.mark.parametrize("d, h, w", [(1, 9, 11), (2, 12, 10), (4, 15, 13)])
def test_glass_blur_batched_swaps_equal_the_sequential_loop(d, h, w):
    g = torch.Generator().manual_seed(d)
    x = torch.rand(2, 3, h, w, generator=g)
    dy = torch.randint(-d, d, (2, h - 2 * d, w - 2 * d), generator=g)
    dx = torch.randint(-d, d, (2, h - 2 * d, w - 2 * d), generator=g)
    flat = x.reshape(2, 3, h * w).clone()
    _swap_sweep(flat, h, w, d, dy, dx)
    ref = x.clone()
    for n in range(2):  # the benchmark's loop: bottom-right to top-left, one swap at a time
        for r in range(h - d, d, -1):
            for c in range(w - d, d, -1):
                r2, c2 = r + int(dy[n, r - d - 1, c - d - 1]), c + int(dx[n, r - d - 1, c - d - 1])
                ref[n, :, [r, r2], [c, c2]] = ref[n, :, [r2, r], [c2, c]]
    assert not torch.equal(ref, x)
    assert torch.equal(flat.reshape(2, 3, h, w), ref)


@pytest.mark.parametrize("name", sorted({"snow", "frost", "fog", "brightness"}))
def test_grayscale_goes_through_rgb_and_luma(name):
    gray = BATCHES["gray28"]
    via_rgb = corrupt(gray.repeat(1, 3, 1, 1), name, 4, seed=3).float()
    luma = (0.299 * via_rgb[:, 0] + 0.587 * via_rgb[:, 1] + 0.114 * via_rgb[:, 2]).unsqueeze(1)
    assert (corrupt(gray, name, 4, seed=3).float() - luma).abs().max() <= 1


def test_large_images_use_imagenet_table():
    assert corruption_params("gaussian_noise", 5, 28) == 0.10
    assert corruption_params("gaussian_noise", 5, 64) == 0.10
    assert corruption_params("gaussian_noise", 5, 65) == 0.38
    assert corruption_params("jpeg_compression", 1, 96) == 25
    assert corruption_params("motion_blur", 5, 224) == (20, 15)
    gray_small = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    gray_large = torch.full((2, 3, 96, 96), 128, dtype=torch.uint8)
    std_small = (corrupt(gray_small, "gaussian_noise", 5).float() - 128).std().item()
    std_large = (corrupt(gray_large, "gaussian_noise", 5).float() - 128).std().item()
    assert 0.09 * 255 < std_small < 0.11 * 255
    assert std_large > 0.3 * 255  # sigma 0.38, somewhat less after clipping to [0, 255]


def test_impulse_noise_hits_the_published_fraction():
    x = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    out = corrupt(x, "impulse_noise", 5, seed=0)
    hit = (out != 128).float().mean().item()
    assert abs(hit - 0.07) < 0.015
    assert set(out[out != 128].unique().tolist()) == {0, 255}


def test_global_random_state_untouched():
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for name in NAMES:
        for x in BATCHES.values():
            corrupt(x, name, 3, seed=5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, "3", True, None])
def test_bad_severity_raises(severity):
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 4, 5\]") as err:
        corrupt(BATCHES["gray28"], "fog", severity)
    assert repr(severity) in str(err.value)
    with pytest.raises(ValueError):
        CORRUPTIONS["fog"](BATCHES["gray28"], severity)


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="'gaussian'") as err:
        corrupt(BATCHES["gray28"], "gaussian", 1)
    assert all(name in str(err.value) for name in NAMES)
    with pytest.raises(ValueError, match="'speckle_noise'"):
        corruption_params("speckle_noise", 1, 32)


@pytest.mark.parametrize("images", [
    torch.zeros(2, 3, 8, 8),  # float
    torch.zeros(2, 2, 8, 8, dtype=torch.uint8),  # two channels
    torch.zeros(3, 8, 8, dtype=torch.uint8),  # no batch dimension
])
def test_bad_images_raise(images):
    with pytest.raises(ValueError):
        corrupt(images, "contrast", 1)
