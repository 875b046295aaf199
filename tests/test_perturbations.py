"""ImageNet-P style perturbation clips: shape, determinism, small consecutive steps and the fill."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluate.perturbations import PERTURBATIONS, STEPS, sequence

SHAPES = [(3, 1, 28, 28), (2, 3, 32, 32), (2, 3, 80, 72)]  # small grey, small RGB, "large" (> 64 px) RGB
GEOMETRIC_OR_DRIFT = ["brightness", "translate", "rotate", "zoom"]
NOISE = ["gaussian_noise", "shot_noise"]


def smooth_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish uint8 images: a horizontal ramp plus a soft blob, values about 40..180 (no clipping
    worries, and smooth so that a one-pixel move changes them only a little)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    planes = []
    for _ in range(n * c):
        cy, cx = (torch.rand(2, generator=g) * 0.6 + 0.2).tolist()
        blob = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.03)
        planes.append(40 + 80 * x * torch.rand(1, generator=g) + 100 * blob)
    return torch.stack(planes).view(n, c, h, w).round().to(torch.uint8)


def frame_distance(clip: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Mean absolute difference between frames a and b, per sequence (0..255 scale)."""
    return (clip[:, a].float() - clip[:, b].float()).abs().mean(dim=(1, 2, 3))


def test_registry_order_and_steps_table():
    assert list(PERTURBATIONS) == ["gaussian_noise", "shot_noise", "brightness", "translate", "rotate", "zoom"]
    assert set(STEPS) == set(PERTURBATIONS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_clip_shape_dtype_clean_first_frame_and_determinism(name, shape):
    images = smooth_images(*shape)
    clip = sequence(images, name, frames=10, seed=3)
    assert clip.shape == (shape[0], 10, *shape[1:]) and clip.dtype == torch.uint8
    assert torch.equal(clip[:, 0], images)
    assert torch.equal(sequence(images, name, frames=10, seed=3), clip)
    # consecutive frames always differ, but only a little (< 5% of the 0..255 range on average)
    for t in range(9):
        d = frame_distance(clip, t + 1, t)
        assert (d > 0).all(), (name, t, d)
        assert (d < 0.05 * 255).all(), (name, t, d)


@pytest.mark.parametrize("name", GEOMETRIC_OR_DRIFT)
def test_drift_grows_with_frame_index(name):
    for shape in SHAPES:
        clip = sequence(smooth_images(*shape), name, frames=10)
        assert (frame_distance(clip, 9, 0) > 2 * frame_distance(clip, 1, 0)).all(), (name, shape)
        assert (frame_distance(clip, 5, 0) > frame_distance(clip, 1, 0)).all(), (name, shape)


@pytest.mark.parametrize("name", NOISE)
def test_noise_frames_are_fresh_draws_not_a_drift(name):
    images = smooth_images(4, 1, 28, 28)
    clip = sequence(images, name, frames=6)
    assert not torch.equal(clip[:, 1], clip[:, 2])
    # unordered: the last frame is no farther from the clean one than the first noisy frame (within noise)
    assert torch.allclose(frame_distance(clip, 5, 0), frame_distance(clip, 1, 0), rtol=0.25)
    assert not torch.equal(sequence(images, name, seed=1), sequence(images, name, seed=2))


def test_gaussian_noise_has_the_table_sigma_and_is_independent_per_frame():
    grey = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)  # mid grey: no clipping
    clip = sequence(grey, "gaussian_noise", frames=3, seed=0).float()
    n1, n2 = (clip[0, 1] - 128).flatten(), (clip[0, 2] - 128).flatten()
    sigma = STEPS["gaussian_noise"][0] * 255  # 7.65 grey levels
    assert n1.std().item() == pytest.approx(sigma, rel=0.05)
    assert abs(n1.mean().item()) < 0.5
    assert abs(torch.corrcoef(torch.stack([n1, n2]))[0, 1].item()) < 0.05


def test_brightness_steps_exactly():
    # 0.02 * 255 = 5.1 grey levels per frame, rounded: +-5, 10, 15, 20, 26 from 128, one sign per sequence
    clip = sequence(torch.full((8, 1, 4, 4), 128, dtype=torch.uint8), "brightness", frames=6, seed=0)
    for seq in clip:
        values = [int(v) for v in seq[:, 0, 0, 0]]
        assert (seq == seq[:, :1, :1, :1]).all()  # every pixel of a frame moves by the same amount
        assert values in ([128, 133, 138, 143, 148, 154], [128, 123, 118, 113, 108, 102])


def _edge_shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference: content moved by (dy, dx), uncovered border filled with the nearest edge pixel."""
    h, w = image.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return image[..., rows[:, None], cols[None, :]]


def test_translate_is_one_pixel_per_frame_along_one_direction_with_edge_fill():
    images = smooth_images(12, 3, 20, 24)
    clip = sequence(images, "translate", frames=5, seed=7)
    directions = set()
    for image, seq in zip(images, clip, strict=True):
        matches = [(dy, dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))
                   if all(torch.equal(seq[t], _edge_shift(image, dy * t, dx * t)) for t in range(5))]
        assert len(matches) == 1
        directions.add(matches[0])
    assert len(directions) > 1  # the direction is drawn per sequence


@pytest.mark.parametrize("name", ["translate", "rotate", "zoom"])
def test_geometric_fill_never_brings_in_black(name):
    flat = torch.full((2, 3, 30, 30), 200, dtype=torch.uint8)
    assert (sequence(flat, name, frames=10) == 200).all()


def test_zoom_enlarges_a_centred_square():
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    images[..., 10:18, 10:18] = 255
    clip = sequence(images, "zoom", frames=10)
    area = (clip[0, :, 0] > 127).sum(dim=(1, 2)).tolist()
    assert area[0] == 64 and area == sorted(area) and area[-1] > 90  # scale 1.27 -> about 64 * 1.27^2 = 103
    centre = clip[0, :, 0, 13:15, 13:15]
    assert (centre == 255).all()


def test_rotate_turns_a_bar_both_ways_across_sequences():
    # a horizontal bar through the centre: after rotating, the ends of the bar move up on one side, down
    # on the other; which side rises tells the direction, and both directions occur across 16 sequences
    images = torch.zeros(16, 1, 33, 33, dtype=torch.uint8)
    images[..., 15:18, 4:29] = 255
    clip = sequence(images, "rotate", frames=10, seed=0).float()
    last = clip[:, -1, 0]
    right_up = last[:, 8:15, 24:29].sum(dim=(1, 2)) > last[:, 18:25, 24:29].sum(dim=(1, 2))
    assert 0 < int(right_up.sum()) < 16
    assert torch.equal(clip[:, :, 0, 16, 16], torch.full((16, 10), 255.0))  # the centre stays put


def test_global_rng_is_untouched():
    state = torch.get_rng_state()
    for name in PERTURBATIONS:
        sequence(smooth_images(2, 1, 16, 16), name, frames=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_arguments_raise():
    images = smooth_images(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"'blur'.*translate"):
        sequence(images, "blur")
    with pytest.raises(ValueError, match="got 1"):
        sequence(images, "rotate", frames=1)
    with pytest.raises(ValueError, match="uint8"):
        sequence(images.float(), "rotate")
    with pytest.raises(ValueError, match="channels"):
        sequence(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), "rotate")
