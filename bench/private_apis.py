"""The two private APIs the pipeline keeps, each against the public call it replaces, on the images
the pipeline reads (32 px RGB JPEGs as in CIFAR-10's archives, 28 px grayscale PNGs as in
Fashion-MNIST's shards): images per second, alternating runs, one process, CPU named.

- decoding: ``torch.ops.image.decode_image`` (the op) against ``torchvision.io.decode_image`` (its
  public wrapper, which since torchvision 0.29 also warns on every call);
- RandAugment: ``noise._RandAugment`` (torchvision's with its per-call table of op magnitudes
  cached, through the private ``_augmentation_space``) against ``T.RandAugment``.

    python bench/private_apis.py --repeats 3
"""

from __future__ import annotations

import argparse
import io
import time
import warnings

import torch
import torchvision.io as tvio
from common import alternate, save, summary, synthetic_images
from PIL import Image
from torchvision import transforms as T

from pipeline.data.noise import _RandAugment

N = 5000


def _decode(images: list[bytes], mode: str, public: bool) -> float:
    read = tvio.ImageReadMode.GRAY if mode == "L" else tvio.ImageReadMode.RGB
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in tensors:
            if public:
                tvio.decode_image(x, read)
            else:
                torch.ops.image.decode_image(x, read.value, False)
    return len(tensors) / (time.perf_counter() - t0)


def _randaugment(pil: list[Image.Image], cached: bool) -> float:
    torch.manual_seed(0)
    ra = (_RandAugment if cached else T.RandAugment)(num_ops=2, magnitude=9, num_magnitude_bins=31)
    t0 = time.perf_counter()
    for img in pil:
        ra(img)
    return len(pil) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {"images": N, "threads": 1}
    for name, mode, size in (("cifar10_like_32px_rgb_jpeg", "RGB", 32), ("fashion_mnist_like_28px_png", "L", 28)):
        images, _ = synthetic_images(N, size, mode=mode)
        decode = summary(alternate({"public": lambda i=images, m=mode: _decode(i, m, True),
                                    "op": lambda i=images, m=mode: _decode(i, m, False)}, args.repeats))
        pil = [Image.open(io.BytesIO(b)).convert(mode) for b in images]
        ra = summary(alternate({"public": lambda p=pil: _randaugment(p, False),
                                "cached": lambda p=pil: _randaugment(p, True)}, args.repeats))
        result[name] = {
            "decode": {**decode, "op_over_public": round(decode["op"]["median_img_s"]
                                                        / decode["public"]["median_img_s"], 3)},
            "randaugment": {**ra, "cached_over_public": round(ra["cached"]["median_img_s"]
                                                              / ra["public"]["median_img_s"], 3)}}
        print(name, result[name]["decode"]["op_over_public"], result[name]["randaugment"]["cached_over_public"])
    save("private_apis", result)


if __name__ == "__main__":
    main()
