"""Student noise (Noisy Student's three kinds): input noise by RandAugment, model noise by
dropout and stochastic depth. Each is switchable with its strength in the config; the teacher
that labels is never noised (it runs in eval mode without augmentation)."""

from __future__ import annotations

from torchvision import transforms as T

from pipeline.config import TrainConfig


class _RandAugment(T.RandAugment):
    """torchvision's RandAugment with its per-call table of op magnitudes cached (same ops, faster:
    bench/results/private_apis.json). ``_augmentation_space`` is private; tests/test_private_apis.py
    fails the day it goes."""

    _cache: dict

    def _augmentation_space(self, num_bins, image_size):
        cache = self.__dict__.setdefault("_cache", {})
        key = (num_bins, tuple(image_size))
        if key not in cache:
            cache[key] = super()._augmentation_space(num_bins, image_size)
        return cache[key]


def randaugment(cfg: TrainConfig) -> T.RandAugment | None:
    """RandAugment(N, M) when enabled (M on torchvision's 0..30 scale; the paper used N=2, M=27 of 30)."""
    ra = cfg.randaugment
    if not ra.enabled or ra.n == 0:
        return None
    return _RandAugment(num_ops=ra.n, magnitude=ra.m, num_magnitude_bins=31)


def erasing(cfg: TrainConfig) -> T.RandomErasing | None:
    """Random erasing of one box (2-25 % of the image) with probability ``cfg.erasing``: the Cutout op
    that the paper's RandAugment (TensorFlow) has and torchvision's lacks. Runs on uint8 tensors."""
    if not cfg.erasing:
        return None
    return T.RandomErasing(p=cfg.erasing, scale=(0.02, 0.25), value=0)


def model_noise(cfg: TrainConfig) -> dict[str, float]:
    """Keyword arguments for ``create_model`` that switch on dropout and stochastic depth."""
    return {"drop_rate": cfg.drop_rate, "drop_path_rate": cfg.drop_path_rate}


def describe(cfg: TrainConfig) -> dict:
    """The noise a run used, for its card."""
    ra = cfg.randaugment
    return {"randaugment": {"n": ra.n, "m": ra.m} if ra.enabled and ra.n else None, "erasing": cfg.erasing,
            "drop_rate": cfg.drop_rate, "drop_path_rate": cfg.drop_path_rate}
