"""Pseudo-label throughput: the stage over webdataset shards (read, decode, model, Parquet write)
against a bare loop of the same model, batch size and threads over pre-decoded in-memory tensors.
``decode_img_s`` is the stage's own read + decode path (tar, PNG/JPEG, tensor) on one core.

    python bench/pseudo_label_throughput.py [--images 59000] [--repeats 5] [--workers 1]
        [--mixed-precision auto|no|bf16] [--channels-last] [--compile BACKEND] [--out NAME]
    python bench/pseudo_label_throughput.py --rgb --workers 0 --channels-last --out pseudo_label_throughput_cifar10

``--rgb``: CIFAR-10's case (configs/cifar10.yaml): 41,000 32 px RGB JPEGs labelled by noisy_student_cnn32_s (which
averages each image with its mirror image) unless --images, --size or --arch say otherwise.

Writes bench/results/pseudo_label_throughput.json: ``ratio`` (stage / bare: the median over pairs of
adjacent runs, alternated a b b a ...), both rates, and ``decode_img_s`` (reading + decoding alone,
one process).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from common import compare, save, synthetic_images, timed, write_shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rgb", action="store_true", help="RGB JPEGs (CIFAR-10's pool) instead of grayscale PNGs")
    ap.add_argument("--images", type=int, default=None, help="default: 59000 (grayscale), 41000 (--rgb)")
    ap.add_argument("--size", type=int, default=None, help="default: 28 (grayscale), 32 (--rgb)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of the stage (config default: 1)")
    ap.add_argument("--arch", default=None, help="default: resnet10t (grayscale), noisy_student_cnn32_s (--rgb)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mixed-precision", default="auto", help="pseudo_label.mixed_precision (auto: fp32 on CPU)")
    ap.add_argument("--channels-last", action="store_true", help="pseudo_label.channels_last")
    ap.add_argument("--compile", default=False, help="pseudo_label.compile: a torch.compile backend")
    ap.add_argument("--out", default="pseudo_label_throughput", help="result file name under bench/results/")
    args = ap.parse_args()
    mode, chans = ("RGB", 3) if args.rgb else ("L", 1)
    args.images = args.images or (41000 if args.rgb else 59000)
    args.size = args.size or (32 if args.rgb else 28)
    args.arch = args.arch or ("noisy_student_cnn32_s" if args.rgb else "resnet10t")

    import torch
    from accelerate import Accelerator

    from pipeline.config import PseudoLabelConfig
    from pipeline.data.dataset import Preprocessing
    from pipeline.data.shards import image_bytes, iter_samples
    from pipeline.data.transforms import eval_transform, normalize, to_input
    from pipeline.modeling import models, precision
    from pipeline.pseudo import labeling

    tmp = Path(tempfile.mkdtemp(prefix="ns-bench-"))
    try:
        images, _ = synthetic_images(args.images, args.size, mode=mode)
        shards = write_shards(tmp / "data", "unlabeled", images, None, 5000)
        rows = {p.name: min(5000, args.images - 5000 * i) for i, p in enumerate(shards)}
        names = [str(i) for i in range(10)]
        model = models.create_model(args.arch, 10, chans).eval()
        prep = Preprocessing.of(mode, args.size, [0.286] * chans, [0.353] * chans)
        tf = eval_transform(args.size)
        accelerator = Accelerator(cpu=True)

        def decode_only() -> int:
            n = 0
            for p in shards:
                for s in iter_samples(p):
                    to_input(image_bytes(s), mode, tf)
                    n += 1
            return n

        pre = torch.stack([to_input(b, mode, tf) for b in images])  # uint8, as the stage's workers hand over
        mean, std = torch.tensor(prep.mean), torch.tensor(prep.std)
        cpu = torch.device("cpu")
        dtype = precision.resolve(args.mixed_precision, cpu, inference=True)
        opts = {"mixed_precision": args.mixed_precision, "channels_last": args.channels_last, "compile": args.compile}
        bare_model = models.create_model(args.arch, 10, chans).eval()  # the same weights, its own compiled copy
        bare_model.load_state_dict(model.state_dict())
        if args.channels_last:
            bare_model = bare_model.to(memory_format=torch.channels_last)
        precision.compile_model(bare_model, args.compile)

        def bare() -> int:
            with torch.inference_mode(), precision.autocast(dtype, cpu):
                for i in range(0, len(pre), args.batch_size):
                    x = normalize(pre[i:i + args.batch_size], mean, std, args.channels_last)
                    torch.softmax(bare_model(x).float(), 1).numpy()
            return len(pre)

        run = [0]

        def stage() -> int:
            run[0] += 1
            out = tmp / f"pl-{run[0]}"
            res = labeling.label_shards(model, shards, out, shard_rows=rows, teacher_sha256="0" * 64,
                                             class_names=names, prep=prep, opts=PseudoLabelConfig(
                                                 batch_size=args.batch_size, workers=args.workers, **opts),
                                             accelerator=accelerator, progress=False)
            shutil.rmtree(out)
            return res["samples"]

        print(f"{args.images} images, {args.arch}, batch {args.batch_size}, {torch.get_num_threads()} threads")
        decode = [timed(decode_only) for _ in range(args.repeats)]
        s, ratio = compare(bare, stage, "stage", args.repeats)
        print(f"decode-only {statistics.median(decode):.0f} img/s")
        save(args.out, {
            "ratio": round(ratio, 3), "stage_img_s": s["stage"]["median_img_s"],
            "bare_img_s": s["bare"]["median_img_s"], "decode_img_s": round(statistics.median(decode), 1),
            "runs": s, "images": args.images, "image_size": args.size, "mode": mode, "arch": args.arch,
            "batch_size": args.batch_size, "workers": args.workers, "threads": torch.get_num_threads(),
            "precision": dtype, "channels_last": args.channels_last, "compile": args.compile or None})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
