"""Export a model directory to ONNX, checked against PyTorch (max abs logit diff <= tolerance, 1e-4).

    python stages/export.py model=runs/fashion_mnist/round-2            # -> runs/fashion_mnist/round-2/onnx/
    python stages/export.py model=runs/x/round-1 out=exports/x opset=18 tolerance=1e-3
    python stages/export.py model=... exporter=torchscript             # the legacy exporter, if dynamo fails

Needs the optional packages: pip install 'noisy-student[onnx]'.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import choice, int_at_least, parse_args, run  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.serve.export import DEFAULT_TOLERANCE, EXPORTERS, export_model_dir  # noqa: E402


def main(argv: list[str]) -> int:
    _, stage = parse_args(argv, {"model": str, "out": str, "opset": int_at_least(7), "tolerance": float,
                                 "exporter": choice(*EXPORTERS)})
    if "model" not in stage:
        raise ConfigError("model=<model directory> is required")
    record, worked = export_model_dir(stage["model"], stage.get("out"), opset=stage.get("opset"),
                                      tolerance=float(stage.get("tolerance", DEFAULT_TOLERANCE)),
                                      exporter=str(stage.get("exporter", "dynamo")))
    out = Path(stage.get("out") or Path(str(stage["model"])) / "onnx")
    check = record["check"]
    state = "exported" if worked else "up to date, nothing to do:"
    print(f"{state} {out / 'model.onnx'} (opset {record['opset']}, {record['exporter']}; max abs diff "
          f"{check['max_abs_diff']:.3g} <= {check['tolerance']:g} at batch sizes {check['batch_sizes']})")
    return 0


if __name__ == "__main__":
    run(main)
