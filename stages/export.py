"""Export a model directory to ONNX, checked against PyTorch (max abs logit diff <= tolerance, 1e-4).

    python stages/export.py model=runs/fashion_mnist/round-2            # -> runs/fashion_mnist/round-2/onnx/
    python stages/export.py model=runs/x/round-1 out=exports/x opset=18 tolerance=1e-3
    python stages/export.py model=... exporter=torchscript             # the legacy exporter, if dynamo fails

Needs the optional packages: pip install 'noisy-student[onnx]'.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("export")
