"""What the throughput benchmarks share: synthetic shards, alternating timed runs, the result file."""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def synthetic_images(n: int, size: int, seed: int = 0, num_classes: int = 10, mode: str = "L"
                     ) -> tuple[list[bytes], np.ndarray]:
    """``n`` images of ``size`` px (noise plus a class-dependent bar) and their labels: grayscale PNGs
    (``mode="L"``, as Fashion-MNIST's shards hold) or RGB JPEGs (``"RGB"``, as CIFAR-10's archives)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    encode = _png if mode == "L" else _jpg
    out = [encode(_image(rng, y, size, num_classes, mode)) for y in labels.tolist()]
    return out, labels


def write_shards(directory: Path, prefix: str, images: list[bytes], labels: np.ndarray | None,
                 shard_size: int) -> list[Path]:
    from pipeline.data.shards import write_shard

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(images), shard_size):
        path = directory / f"{prefix}-{s // shard_size:06d}.tar"
        samples = []
        for i in range(s, min(s + shard_size, len(images))):
            ext = "jpg" if images[i][:2] == b"\xff\xd8" else "png"
            sample = {"__key__": f"{prefix}_{i:08d}", ext: images[i]}
            if labels is not None:
                sample["cls"] = str(int(labels[i]))
            samples.append(sample)
        write_shard(path, samples)
        paths.append(path)
    return paths


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _jpg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _image(rng: np.random.Generator, y: int, size: int, num_classes: int = 10, mode: str = "L") -> np.ndarray:
    if mode == "RGB":  # smooth colour noise (a natural image's JPEG size, ~1 KB at 32 px), not pixel noise
        coarse = rng.integers(0, 200, (max(1, size // 4), max(1, size // 4), 3), dtype=np.uint8)
        a = np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.BILINEAR)).copy()
    else:
        a = rng.integers(0, 80, (size, size), dtype=np.uint8)
    row = (y * size) // num_classes
    a[row:row + max(1, size // 8), :] = 230  # a class-dependent bar, so a teacher learns something
    return a


def labeled_folder(root: Path, per_class: int, size: int, seed: int) -> Path:
    """An ImageFolder tree of 10 classes (c0..c9) of ``per_class`` grayscale PNGs each."""
    rng = np.random.default_rng(seed)
    for y in range(10):
        d = root / f"c{y}"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"{i}.png").write_bytes(_png(_image(rng, y, size)))
    return root


def labeled_and_test(root: Path, per_class: int, test_per_class: int, size: int) -> tuple[Path, Path]:
    """A labeled ImageFolder and a test ImageFolder (other images) under ``root``."""
    return (labeled_folder(root / "labeled", per_class, size, seed=1),
            labeled_folder(root / "test", test_per_class, size, seed=2))


def pool_shards(directory: Path, n: int, size: int, shard_size: int) -> str:
    """``n`` unlabeled images as webdataset shards, written one shard at a time; their brace pattern."""
    from pipeline.data.shards import write_shard

    rng = np.random.default_rng(n)
    directory.mkdir(parents=True)
    count = -(-n // shard_size)
    for s in range(count):
        m = min(shard_size, n - s * shard_size)
        ys = rng.integers(0, 10, m).tolist()
        write_shard(directory / f"pool-{s:06d}.tar",
                    ({"__key__": f"p{s:06d}_{i:06d}", "png": _png(_image(rng, y, size))} for i, y in enumerate(ys)))
    return str(directory / f"pool-{{000000..{count - 1:06d}}}.tar")


def run_stage(args: list[str], log: Path, env: dict | None = None) -> dict:
    """Run a command (a stage script after ``python``, or a full argv when ``args[0]`` is not a
    .py file) from the repository root; wall seconds and peak RSS in MiB as the kernel counted it
    (``wait4``: the largest of the process and the children it waited for)."""
    argv = [sys.executable, *args] if args[0].endswith(".py") else args
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit("\n".join(tail) + f"\n{' '.join(argv)} failed ({code})")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.time() - t0, 1)}


def alternate(sides: dict[str, Callable[[], float]], repeats: int = 3, warmup: bool = True
              ) -> dict[str, list[float]]:
    """Run each side ``repeats`` times, interleaved a b b a a b ..., so drift hits both alike (a
    linear drift cancels within each pair); one untimed run of each first (oneDNN builds its
    kernels for each new shape on first use)."""
    if warmup:
        for fn in sides.values():
            fn()
    got: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            got[name].append(sides[name]())
            print(f"  {name} run {r + 1}: {got[name][-1]:.0f} img/s", flush=True)
    return got


def summary(runs: dict[str, list[float]]) -> dict:
    return {k: {"median_img_s": round(statistics.median(v), 1), "runs_img_s": [round(x, 1) for x in v]}
            for k, v in runs.items()}


def compare(bare: Callable[[], int], ours: Callable[[], int], name: str, repeats: int) -> tuple[dict, float]:
    """Alternating timed runs of a bare loop and our side ``name``: (summary, ratio ours / bare).

    The ratio is the median over pairs of each run of ours ÷ the bare run beside it: the machine's
    load changes over minutes, so runs next to each other compare better than medians taken
    over the whole benchmark (``ratio_of_medians`` is in the summary too).
    """
    runs = alternate({"bare": lambda: timed(bare), name: lambda: timed(ours)}, repeats)
    s = summary(runs)
    pairs = [o / b for o, b in zip(runs[name], runs["bare"], strict=True)]
    ratio = statistics.median(pairs)
    s["pair_ratios"] = [round(p, 3) for p in pairs]
    s["ratio_of_medians"] = round(s[name]["median_img_s"] / s["bare"]["median_img_s"], 3)
    print(f"ratio {ratio:.3f} (pairs {s['pair_ratios']}, ratio of medians {s['ratio_of_medians']})")
    return s, ratio


def timed(fn: Callable[[], int]) -> float:
    """img/s of ``fn`` (which returns how many images it processed)."""
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def versions() -> dict:
    import accelerate
    import timm
    import torch
    import webdataset

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "webdataset": webdataset.__version__}


def save(name: str, result: dict) -> Path:
    from collect_iterate import machine

    path = RESULTS / f"{name}.json"
    result = {**result, "machine": machine(), "versions": versions(), "command": " ".join(["python", *sys.argv])}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path.relative_to(ROOT)}")
    return path
