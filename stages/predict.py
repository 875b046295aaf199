"""Classify images with a model directory or its ONNX export, into a CSV or Parquet file.

    python stages/predict.py model=runs/fashion_mnist/round-2 input=photos/ out=preds.csv
    python stages/predict.py model=runs/fashion_mnist/round-2/onnx input=pool.tar.gz out=preds.parquet topk=3
    python stages/predict.py model=export/model.onnx input='/pool/pool-{000000..000009}.tar' out=p.csv

Rows: path, label, confidence, topk_labels, topk_probs (';'-joined in CSV, lists in Parquet).
Images that cannot be decoded are skipped, warned about and listed in <out>.skipped.csv; more than
data.max_bad_share of them (default 0.01) stops the run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import int_at_least, parse_args, run  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.serve.predict import predict  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, stage = parse_args(argv, {"model": str, "input": str, "out": str, "topk": int_at_least(1),
                                 "batch_size": int_at_least(1)})
    missing = [k for k in ("model", "input", "out") if k not in stage]
    if missing:
        raise ConfigError(f"{missing[0]}=... is required (model=<dir or .onnx> input=<images> out=<.csv|.parquet>)")
    s = predict(str(stage["model"]), str(stage["input"]), str(stage["out"]), topk=int(stage.get("topk", 5)),
                batch_size=int(stage.get("batch_size", 256)), max_bad_share=cfg.data.max_bad_share)
    extra = f"; skipped {s['skipped']} bad image(s), listed in {s['skipped_file']}" if s["skipped"] else ""
    print(f"predicted {s['images']} images with {s['backend']} in {s['seconds']:.1f}s -> {s['out']}{extra}")
    return 0


if __name__ == "__main__":
    run(main)
