"""Precision on this CPU: what the non-finite step guard costs, and what bf16 buys where ``auto`` picks it.

    python bench/precision.py [--pairs 30] [--repeats 3]

1. Guard cost (bench/results/guard_cost.json): the CIFAR-10 round-1 student step
   (configs/cifar10.yaml: its architecture, noise, batch 128 + 384 pseudo-labeled, SGD, EMA off,
   fp32) through ``trainer._step`` (snapshot of the buffers, one fused gradient norm, the finite
   verdict) against the same step without the guard, on the same in-memory batches, alternated
   a b b a ... for ``--pairs`` pairs. ``overhead`` is the median of the per-pair ratios - 1.
2. Speed per precision (bench/results/precision_speed.json): a bare loop over the same net,
   batch 512, channels_last, training (forward, backward, SGD step) and inference img/s in fp32 and
   in bf16 autocast, alternated; plus how many bf16 training steps had a non-finite gradient norm.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import ROOT, alternate, save, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="training steps per timed speed run")
    args = ap.parse_args()

    import torch

    from pipeline.config import for_round, load_config
    from pipeline.data import noise
    from pipeline.data.dataset import Preprocessing
    from pipeline.modeling import models, precision
    from pipeline.tracking import Trackers
    from pipeline.training import trainer
    from pipeline.training.objectives import Batch, NoisyStudent

    cfg = load_config(ROOT / "configs" / "cifar10.yaml")
    scfg = for_round(cfg.student, 1)
    arch = cfg.model.students[0]
    g = torch.Generator().manual_seed(0)
    lab, unl = scfg.batch_size, scfg.batch_size * cfg.student.unlabeled_ratio
    batches = [Batch(torch.randint(0, 256, (lab + unl, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (lab,), generator=g), lab,
                     torch.softmax(torch.randn(unl, 10, generator=g), 1)) for _ in range(4)]

    def endless():
        while True:
            yield from batches

    # ---- 1. the guard's cost on the student step
    torch.manual_seed(0)
    model = models.create_model(arch, 10, 3, **noise.model_noise(scfg))
    job = trainer.Job(phase="train", cfg=scfg, epochs=1, lr=scfg.lr, labeled=None, labeled_total=45000,
                      prep=Preprocessing.of("RGB", 32, [0.5] * 3, [0.25] * 3),
                      objective=NoisyStudent(scfg.label_smoothing, cfg.student.unlabeled_weight))
    run = trainer._setup(model, job)
    run.trackers = Trackers([], Path("/tmp"), "train", {}, True)
    stream = endless()

    def unguarded() -> None:  # the step as it was before the guard
        batch = next(stream)
        x = trainer.normalize(batch.x, run.mean, run.std, scfg.channels_last)
        with run.autocast:
            x = run.objective.inputs(x, batch)
            logits = run.wrapped(x).float()
        loss = run.objective.loss(logits, batch)
        run.accelerator.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()

    def guarded() -> None:
        trainer._step(run, stream, 0, 0)

    def seconds(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(3):
        guarded(), unguarded()
    times: dict[str, list[float]] = {"guarded": [], "unguarded": []}
    for i in range(args.pairs):
        order = ("guarded", "unguarded") if i % 2 == 0 else ("unguarded", "guarded")
        for name in order:
            times[name].append(seconds(guarded if name == "guarded" else unguarded))
    ratios = [a / b for a, b in zip(times["guarded"], times["unguarded"], strict=True)]
    overhead = statistics.median(ratios) - 1
    print(f"guard overhead {100 * overhead:+.2f} % of a {statistics.median(times['unguarded']):.3f} s step")
    save("guard_cost", {
        "overhead": round(overhead, 4), "median_ratio": round(statistics.median(ratios), 4),
        "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "pairs": args.pairs, "pair_ratios": [round(r, 4) for r in ratios], "arch": arch,
        "batch": {"labeled": lab, "pseudo_labeled": unl}, "channels_last": scfg.channels_last,
        "precision": run.guard.precision, "config": "configs/cifar10.yaml (round-1 student)"})

    # ---- 2. img/s per precision, bare loop, batch 512
    net = models.create_model(arch, 10, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(512, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (512,), generator=g)
    nonfinite = {"fp32": 0, "bf16": 0}
    steps_run = {"fp32": 0, "bf16": 0}

    def train(dtype: str):
        def go() -> int:
            net.train()
            for _ in range(args.steps):
                with precision.autocast(dtype, torch.device("cpu")):
                    loss = torch.nn.functional.cross_entropy(net(x).float(), y)
                loss.backward()
                norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
                steps_run[dtype] += 1
                if not torch.isfinite(norm):
                    nonfinite[dtype] += 1
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            return args.steps * len(x)
        return go

    def infer(dtype: str):
        def go() -> int:
            net.eval()
            with torch.inference_mode(), precision.autocast(dtype, torch.device("cpu")):
                for _ in range(args.steps):
                    net(x)
            return args.steps * len(x)
        return go

    def rate(fn):
        return lambda: len(x) * args.steps / seconds(fn)

    tr = alternate({"fp32": rate(train("fp32")), "bf16": rate(train("bf16"))}, args.repeats)
    inf = alternate({"fp32": rate(infer("fp32")), "bf16": rate(infer("bf16"))}, args.repeats)

    def ratio(runs: dict) -> float:
        return round(statistics.median(b / f for b, f in zip(runs["bf16"], runs["fp32"], strict=True)), 3)

    result = {"train": {**summary(tr), "bf16_over_fp32": ratio(tr)},
              "inference": {**summary(inf), "bf16_over_fp32": ratio(inf)},
              "bf16_nonfinite_grad_steps": f"{nonfinite['bf16']} of {steps_run['bf16']}",
              "fp32_nonfinite_grad_steps": f"{nonfinite['fp32']} of {steps_run['fp32']}",
              "cpu_has_native_bf16": precision.cpu_has_native_bf16(),
              "auto_resolves_to": {"train": precision.resolve("auto", torch.device("cpu")),
                                   "inference": precision.resolve("auto", torch.device("cpu"), inference=True)},
              "arch": arch, "batch": len(x), "channels_last": True, "steps_per_run": args.steps}
    print(f"bf16 / fp32: train {result['train']['bf16_over_fp32']}x, inference "
          f"{result['inference']['bf16_over_fp32']}x")
    save("precision_speed", result)


if __name__ == "__main__":
    main()
