"""Training throughput: the student step of the pipeline (shards, pseudo-label join, RandAugment,
dropout, stochastic depth, labeled + pseudo-labeled batches, the Accelerate loop with its epoch
checkpoint) against a bare PyTorch loop with the same model, optimizer, augmentations and batches
over images already decoded in memory.

    python bench/train_throughput.py [--pool 20000] [--repeats 5]
    python bench/train_throughput.py --config configs/cifar10.yaml [--batch-augment] --out NAME

The student settings are the config's (round 1; default configs/fashion_mnist.yaml: 28 px grayscale
PNGs and resnet10t; a config whose source is CIFAR10: 32 px RGB JPEGs and its round-1 student's
architecture). With the config's ``batch_augment`` both sides crop, flip and erase the uint8 batch
(``transforms.BatchAugment``); otherwise both run the per-image transform. Writes
bench/results/<out>.json: ``ratio`` (pipeline / bare: the median over pairs of adjacent runs,
alternated a b b a ...).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path

from common import ROOT, compare, save, synthetic_images, write_shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--labeled", type=int, default=1000)
    ap.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist.yaml"))
    ap.add_argument("--batch-augment", action="store_true", help="student.batch_augment=true")
    ap.add_argument("--out", default="train_throughput", help="result file name under bench/results/")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipeline.config import for_round, load_config
    from pipeline.data import noise
    from pipeline.data.dataset import Preprocessing
    from pipeline.data.images import decode_image
    from pipeline.data.stream import StreamSpec
    from pipeline.data.transforms import batch_augment, normalize, to_input, train_transform
    from pipeline.modeling import models, precision
    from pipeline.pseudo import pseudo_labels, selection
    from pipeline.training.objectives import soft_cross_entropy
    from pipeline.training.trainer import Job, _optimizer, steps_per_epoch, train

    cfg = load_config(Path(args.config))
    scfg = for_round(cfg.student, 1)
    if args.workers is not None:
        scfg = dataclasses.replace(scfg, workers=args.workers)
    if args.batch_augment:
        scfg = dataclasses.replace(scfg, batch_augment=True)
    rgb = cfg.data.source == "CIFAR10"
    mode, chans, size = ("RGB", 3, 32) if rgb else ("L", 1, 28)
    arch = cfg.model.students[0] if rgb else "resnet10t"
    tmp = Path(tempfile.mkdtemp(prefix="ns-bench-"))
    try:
        lab_imgs, lab_y = synthetic_images(args.labeled, size, seed=1, mode=mode)
        pool_imgs, _ = synthetic_images(args.pool, size, seed=2, mode=mode)
        lab_shards = write_shards(tmp / "data", "labeled", lab_imgs, lab_y, 5000)
        pool_shards = write_shards(tmp / "data", "unlabeled", pool_imgs, None, 5000)
        rng = np.random.default_rng(0)
        pl_dir = tmp / "pl"
        for i, p in enumerate(pool_shards):
            keys = [f"unlabeled_{j:08d}" for j in range(5000 * i, min(5000 * (i + 1), args.pool))]
            probs = rng.dirichlet(np.ones(10) * 0.3, len(keys)).astype(np.float32)
            pseudo_labels.write_parquet(pl_dir / pseudo_labels.parquet_name(p), p.name, keys, probs, "0" * 64,
                                        [str(c) for c in range(10)])
        targets, _ = selection.student_targets(pl_dir, pool_shards, dataclasses.replace(scfg, balance=False), 10)
        prep = Preprocessing.of(mode, size, [0.286] * chans, [0.353] * chans)
        transform = train_transform(size, scfg)
        augment = batch_augment(scfg)
        job = Job(phase="train", cfg=scfg, epochs=1, lr=scfg.lr,
                  labeled=StreamSpec(shards=[str(p) for p in lab_shards], mode=mode, transform=transform),
                  labeled_total=args.labeled, prep=prep,
                  unlabeled=StreamSpec(shards=[str(p) for p in pool_shards], mode=mode, transform=transform,
                                       seed=7919, buffer=5000, targets=targets),
                  unlabeled_total=targets.total, unlabeled_ratio=cfg.student.unlabeled_ratio)
        steps = steps_per_epoch(job, 1)
        bs_l, bs_u = scfg.batch_size, scfg.batch_size * cfg.student.unlabeled_ratio
        base = models.create_model(arch, 10, chans, **noise.model_noise(scfg))

        run = [0]

        def pipeline_side() -> int:
            run[0] += 1
            model = copy.deepcopy(base)
            stats = train(model, job, tmp / f"state-{run[0]}", progress=False)
            shutil.rmtree(tmp / f"state-{run[0]}", ignore_errors=True)
            return stats["steps"] * (bs_l + bs_u)

        if augment is None:  # decoded once; the per-image transform runs in the loop
            lab_pre = [decode_image(b, mode) for b in lab_imgs]
            pool_pre = [decode_image(b, mode) for b in pool_imgs]
        else:  # decoded once to uint8 tensors (what the transform hands over); BatchAugment in the loop
            lab_pre = [to_input(b, mode, transform) for b in lab_imgs]
            pool_pre = [to_input(b, mode, transform) for b in pool_imgs]
        per_image = transform if augment is None else (lambda t: t)
        soft = torch.from_numpy(rng.dirichlet(np.ones(10) * 0.3, args.pool).astype(np.float32))
        mean, std = torch.tensor(prep.mean), torch.tensor(prep.std)

        def bare_side() -> int:
            model = copy.deepcopy(base).to(memory_format=torch.channels_last).train()
            opt = _optimizer(model, scfg, scfg.lr)
            autocast = precision.autocast(precision.resolve(scfg.mixed_precision, torch.device("cpu")),
                                          torch.device("cpu"))
            order = torch.randperm(args.pool)
            for s in range(steps):
                li = torch.randint(0, args.labeled, (bs_l,))
                ui = order[(s * bs_u) % args.pool:][:bs_u]
                x = torch.stack([per_image(lab_pre[i]) for i in li.tolist()]
                                + [per_image(pool_pre[i]) for i in ui.tolist()])
                if augment is not None:
                    x = augment(x)
                x = normalize(x, mean, std, scfg.channels_last)
                with autocast:
                    logits = model(x).float()
                loss = F.cross_entropy(logits[:bs_l], torch.from_numpy(lab_y[li.numpy()]),
                                       label_smoothing=scfg.label_smoothing) + soft_cross_entropy(logits[bs_l:], soft[ui])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return steps * (bs_l + bs_u)

        print(f"{steps} steps of {bs_l} labeled + {bs_u} pseudo-labeled, {torch.get_num_threads()} threads, "
              f"RandAugment {scfg.randaugment.n}/{scfg.randaugment.m}, dropout {scfg.drop_rate}, "
              f"drop_path {scfg.drop_path_rate}")
        s, ratio = compare(bare_side, pipeline_side, "pipeline", args.repeats)
        save(args.out, {
            "ratio": round(ratio, 3), "pipeline_img_s": s["pipeline"]["median_img_s"],
            "bare_img_s": s["bare"]["median_img_s"], "runs": s, "steps": steps, "labeled_batch": bs_l,
            "unlabeled_batch": bs_u, "image_size": size, "mode": mode, "arch": arch, "config": args.config,
            "batch_augment": scfg.batch_augment, "channels_last": scfg.channels_last,
            "mixed_precision": scfg.mixed_precision,
            "noise": noise.describe(scfg), "threads": torch.get_num_threads(), "workers": scfg.workers})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
