"""Named crash points for the fault-injection tests: ``NS_FAILPOINT=name:N`` SIGKILLs the process
the N-th time it reaches ``hit("name")`` (``name:N@R``: only on global rank R). ``name:N:enospc``
and ``name:N:eacces`` raise the OSError a full disk or a read-only directory gives at that write
instead (CI runs as root, which file modes do not stop). Fault points ask ``due("name")`` and
inject the fault themselves; ``N-M`` (or ``N-``: from N on) makes it due on several hits.

A SIGKILL cannot be caught or cleaned up after, so it is the honest model of a preempted machine,
an OOM kill or a power cut. Without the variable ``hit`` costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}

# where the library calls hit(): the crash points the reliability tests use
POINTS = {
    "shard_write": "prepare: after each sample written into a shard (before the shard is renamed into place)",
    "train_step": "train/distill: after each optimizer step",
    "checkpoint_write": "train/distill: inside an epoch checkpoint, after save_state, before the rename",
    "epoch_end": "train/distill: after an epoch's checkpoint is in place",
    "pseudo_label_batch": "pseudo_label: after each labeled batch",
    "parquet_write": "pseudo_label: a shard's Parquet written to its temporary name, before the rename",
    "eval_result": "evaluate: a result computed, before its JSON is written",
    "predict_batch": "predict: after each batch of predictions",
    "onnx_write": "export: the ONNX graph written to its temporary name, before it is checked and renamed",
}
# where the library calls due(): faults it injects itself instead of a crash
FAULTS = {
    "nonfinite_grad": "train/distill: after each backward pass, one gradient set to NaN (any CPU's bf16 NaN)",
}


_FAULTS = {"enospc": errno.ENOSPC, "eacces": errno.EACCES}


def _spec() -> tuple[str, int, float, int | None, str] | None:
    raw = os.environ.get("NS_FAILPOINT")
    if not raw:
        return None
    name, _, rest = raw.partition(":")
    rest, _, fault = rest.partition(":")
    count, _, rank = rest.partition("@")
    first, dash, last = count.partition("-")
    start = int(first or 1)
    end = (int(last) if last else float("inf")) if dash else start
    return name, start, end, (int(rank) if rank else None), fault


def due(name: str) -> bool:
    """Count a hit of ``name``; True when ``NS_FAILPOINT`` names it and this hit is in its range."""
    spec = _spec()
    if spec is None or spec[0] != name:
        return False
    if spec[3] is not None and int(os.environ.get("RANK", "0")) != spec[3]:
        return False
    _counts[name] = _counts.get(name, 0) + 1
    return spec[1] <= _counts[name] <= spec[2]


def hit(name: str, path: str | os.PathLike | None = None) -> None:
    """SIGKILL this process (or raise the named OSError about ``path``) if ``NS_FAILPOINT`` names
    this point and its count is reached."""
    if not due(name):
        return
    fault = _spec()[4]
    if fault in _FAULTS:
        code = _FAULTS[fault]
        raise OSError(code, os.strerror(code), str(path) if path is not None else None)
    os.kill(os.getpid(), signal.SIGKILL)
