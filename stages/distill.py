"""Distill a trained model into a smaller timm model (knowledge distillation), plus a labels-only
baseline of the same architecture and the compression report.

    python stages/distill.py                                   # last round's student -> distill.arch
    python stages/distill.py distill.teacher=runs/x/round-2 distill.arch=resnet10t distill.mode=offline
    accelerate launch stages/distill.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("distill")
