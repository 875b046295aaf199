"""Shared fixtures: a tiny, learnable ImageFolder dataset and a config that trains in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

NUM_CLASSES = 4
SIZE = 16


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    """Noise plus a bright bar whose position and direction tell the class."""
    a = rng.integers(0, 60, size=(SIZE, SIZE)).astype(np.uint8)
    o = rng.integers(2, 5)
    if label == 0:
        a[o:o + 4, :] = 230
    elif label == 1:
        a[:, o:o + 4] = 230
    elif label == 2:
        a[-o - 4:-o, :] = 230
    else:
        a[:, -o - 4:-o] = 230
    return Image.fromarray(a, mode="L")


def make_folder(root: Path, per_class: int, seed: int, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for c in range(NUM_CLASSES):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(c, rng).save(d / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tiny")
    return {"train": make_folder(base / "train", 60, 0), "test": make_folder(base / "test", 20, 1)}


def tiny_overrides(tiny_data: dict, runs: Path, name: str = "tiny") -> list[str]:
    """Overrides that make the default config run on the tiny data in seconds."""
    return [f"name={name}", f"runs_dir={runs}", f"data.source={tiny_data['train']}",
            f"data.test_source={tiny_data['test']}", "data.labeled_per_class=10", "data.shard_size=50",
            "model.arch=resnet10t", "model.students=[resnet10t]",
            "teacher.epochs=40", "teacher.batch_size=16", "teacher.lr=0.003", "teacher.workers=0",
            "teacher.hflip=false", "teacher.crop_pad=0", "teacher.warmup_epochs=0", "teacher.channels_last=true",
            "student.epochs=2", "student.batch_size=8", "student.unlabeled_ratio=2", "student.workers=0",
            "student.hflip=false", "student.crop_pad=0", "student.randaugment.n=1", "student.warmup_epochs=0",
            "pseudo_label.batch_size=32", "pseudo_label.workers=0"]


STAGE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def stage(script: str, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``stages/<script>`` in a subprocess as a user would; raise with its output unless ``check`` is off."""
    r = subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], capture_output=True, text=True,
                       env={**STAGE_ENV, **(env or {})}, cwd=ROOT, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r
