"""Batch augmentation on uint8 tensors: the same kinds of draws as the per-image PIL path."""

import torch
from conftest import stage, tiny_overrides

from pipeline.config import RandAugmentConfig, StudentConfig, TrainConfig
from pipeline.data.transforms import BatchAugment, EvalTransform, batch_augment, train_transform


def _batch(n: int = 64, size: int = 12) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(1, 255, (n, 3, size, size), dtype=torch.uint8)  # no zeros: padding shows


def test_translate_gives_each_image_its_own_shift_of_itself():
    x = _batch()
    torch.manual_seed(0)
    out = BatchAugment(pad=2, hflip=False, erasing=0.0)(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], padded[i, :, dy:dy + 12, dx:dx + 12])]
        assert found, f"image {i} is not a shifted copy of its input"
        shifts.append(found[0])
    assert len(set(shifts)) > 10 and out.dtype == torch.uint8


def test_flip_mirrors_about_half_the_images():
    x = _batch(200)
    torch.manual_seed(0)
    out = BatchAugment(pad=0, hflip=True, erasing=0.0)(x)
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert 60 < sum(flipped) < 140


def test_erasing_blanks_one_box_of_2_to_25_percent():
    x = torch.full((100, 1, 28, 28), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    out = BatchAugment(pad=0, hflip=False, erasing=1.0)(x)
    for img in out:
        zero = img[0] == 0
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert zero.sum() == box  # one solid rectangle
        assert 0.02 * 784 * 0.8 <= box <= 0.25 * 784 * 1.2
    half = BatchAugment(pad=0, hflip=False, erasing=0.5)(x)
    assert 25 < sum(bool((img == 0).any()) for img in half) < 75


def test_config_switch_moves_the_ops_out_of_the_per_image_transform():
    plain = dict(crop_pad=2, hflip=True, erasing=0.5, randaugment=RandAugmentConfig(enabled=False))
    assert batch_augment(TrainConfig(**plain)) is None  # off by default: the PIL path as before
    on = TrainConfig(**plain, batch_augment=True)
    assert isinstance(train_transform(32, on), EvalTransform)  # decoded straight to a tensor
    assert isinstance(batch_augment(on), BatchAugment)
    with_ra = StudentConfig(crop_pad=2, batch_augment=True)  # RandAugment stays per image
    assert not isinstance(train_transform(32, with_ra), EvalTransform)


def test_a_teacher_trains_with_batch_augmentation(tiny_data, tmp_path):
    ov = tiny_overrides(tiny_data, tmp_path / "runs", name="batchaug")
    stage("iterate.py", "round=0", *ov, "teacher.batch_augment=true", "teacher.crop_pad=2", "teacher.hflip=true",
          "teacher.erasing=0.5", "teacher.epochs=3")
    assert (tmp_path / "runs" / "batchaug" / "round-0" / "card.json").is_file()
