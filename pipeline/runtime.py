"""The distributed runtime: one way to make an Accelerator, whatever launched us.

Mixed precision is applied per phase by the trainer (autocast), not here, so several phases with
different settings can share one process (``make iterate`` runs every stage in one process).
"""

from __future__ import annotations

import os

import torch


def make_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
                       or not torch.cuda.is_available())
