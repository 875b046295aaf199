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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("predict")
