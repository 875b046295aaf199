"""Distill a trained model into a smaller timm model (knowledge distillation), plus a labels-only
baseline of the same architecture and the compression report.

    python stages/distill.py                                   # last round's student -> distill.arch
    python stages/distill.py distill.teacher=runs/x/round-2 distill.arch=resnet10t distill.mode=offline
    accelerate launch stages/distill.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import parse_args, run  # noqa: E402
from pipeline.compress.compression import compression_report  # noqa: E402
from pipeline.compress.distill import distill  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, _ = parse_args(argv)
    results = distill(cfg)
    report = compression_report(cfg, results)
    from pipeline.runtime import make_accelerator

    if make_accelerator().is_main_process and report:
        t, s = report["teacher"], report["student"]
        print(f"teacher {t['model']}: {t['params']} params, top-1 {t['test_top1']:.2f}%, {t['latency_ms_b1']:.2f} ms "
              f"(b1), {t['img_s_b64']:.0f} img/s (b64)")
        print(f"student {s['model']}: {s['params']} params, top-1 {s['test_top1']:.2f}%, {s['latency_ms_b1']:.2f} ms "
              f"(b1), {s['img_s_b64']:.0f} img/s (b64); retained {report['retained']:.2f}%"
              + (f"; labels only {report['labels_only_top1']:.2f}%" if report.get("labels_only_top1") else ""))
        print(f"compression report: {report['path']}")
    return 0


if __name__ == "__main__":
    run(main)
