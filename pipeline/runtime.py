"""The distributed runtime: one way to make an Accelerator, whatever launched us.

Mixed precision is applied per phase by the trainer (autocast), not here, so several phases with
different settings can share one process (``make iterate`` runs every stage in one process). The
Accelerator itself never autocasts, whatever the launcher's environment says: a launcher's request
reaches the phases through ``precision.resolve``, which follows or refuses it.
Collectives time out after ``NS_DIST_TIMEOUT`` seconds (default 900): a rank whose peer died
fails with an error instead of waiting forever, even under a launcher that does not tear the
job down itself.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def make_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = timedelta(seconds=int(os.environ.get("NS_DIST_TIMEOUT", "900")))
    return Accelerator(mixed_precision="no", cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
                       or not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
