"""Named crash points for the fault-injection tests: ``NS_FAILPOINT=name:N`` SIGKILLs the process
the N-th time it reaches ``hit("name")`` (``name:N@R``: only on global rank R). ``name:N:enospc``
and ``name:N:eacces`` raise the OSError a full disk or a read-only directory gives at that write
instead (CI runs as root, which file modes do not stop).

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


_FAULTS = {"enospc": errno.ENOSPC, "eacces": errno.EACCES}


def _spec() -> tuple[str, int, int | None, str] | None:
    raw = os.environ.get("NS_FAILPOINT")
    if not raw:
        return None
    name, _, rest = raw.partition(":")
    rest, _, fault = rest.partition(":")
    count, _, rank = rest.partition("@")
    return name, int(count or 1), (int(rank) if rank else None), fault


def hit(name: str, path: str | os.PathLike | None = None) -> None:
    """SIGKILL this process (or raise the named OSError about ``path``) if ``NS_FAILPOINT`` names
    this point and its count is reached."""
    spec = _spec()
    if spec is None or spec[0] != name:
        return
    if spec[2] is not None and int(os.environ.get("RANK", "0")) != spec[2]:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == spec[1]:
        if spec[3] in _FAULTS:
            code = _FAULTS[spec[3]]
            raise OSError(code, os.strerror(code), str(path) if path is not None else None)
        os.kill(os.getpid(), signal.SIGKILL)
