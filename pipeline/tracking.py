"""What a run tells the user and the tools around it: log lines (Python ``logging``), progress bars,
experiment trackers (accelerate's TensorBoard, W&B, MLflow) and a ``summary.csv`` per training
phase as timm's ``train.py`` writes one.

Log lines go to the ``noisy_student`` logger: INFO on the main process, WARNING on the others, so
a multi-process run prints each line once; ``NS_LOG_LEVEL`` (DEBUG, INFO, WARNING) changes it.
Bars follow the config's ``progress`` (passed down to each bar) and ``TQDM_DISABLE=1``. Trackers are off unless ``log_with``
names them: only the main process writes, under ``<run>/logs/``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.artifacts import main_process, write_bytes_atomic
from pipeline.errors import ConfigError

log = logging.getLogger("noisy_student")


class _BarSafeHandler(logging.Handler):
    """Writes through ``tqdm.write`` (stderr), so a line never lands inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging() -> None:
    """The package logger: INFO on the main process (``RANK`` 0), WARNING elsewhere,
    ``NS_LOG_LEVEL`` to change it."""
    level = os.environ.get("NS_LOG_LEVEL", "INFO").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"NS_LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    log.setLevel(level if main_process() else max(logging.WARNING, logging.getLevelName(level)))


# the package's lines reach stderr also when it is used as a library (a caller may add handlers or
# set propagate back); the stage commands then set the level from NS_LOG_LEVEL and the rank
_handler = _BarSafeHandler()
_handler.setFormatter(logging.Formatter("%(message)s"))
log.addHandler(_handler)
log.propagate = False
log.setLevel(logging.INFO)


def bar(progress: bool = True, **kwargs) -> tqdm:
    """A tqdm bar, off when ``progress`` (the config's, passed down) is or ``TQDM_DISABLE`` says so."""
    off = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    return tqdm(disable=off, **kwargs)


class Trackers:
    """accelerate's trackers named by ``log_with`` for one run directory (main process only); a
    no-op when none is named, so call sites need no branch."""

    def __init__(self, log_with: list[str], run_dir: Path, run_name: str, config: dict | None = None,
                 main_process: bool = True):
        self.trackers: list = []
        if not log_with or not main_process:
            return
        from accelerate import tracking  # imports each tracker's library only when it is used

        classes = {"tensorboard": tracking.TensorBoardTracker, "wandb": tracking.WandBTracker,
                   "mlflow": tracking.MLflowTracker}
        for name in log_with:
            try:
                if name == "tensorboard":
                    t = classes[name](run_name, logging_dir=str(run_dir / "logs"))
                else:
                    t = classes[name](run_name)
            except (ImportError, ModuleNotFoundError) as e:
                raise ConfigError(f"log_with: {name} is not installed ({e}); pip install {name}") from None
            if hasattr(t, "start"):  # accelerate >= 1.x opens its writer here (init_trackers calls it)
                t.start()
            self.trackers.append(t)
        if config:
            for t in self.trackers:
                t.store_init_configuration(config)

    def log(self, values: dict, step: int) -> None:
        for t in self.trackers:
            t.log(values, step=step)

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []


def write_summary(path: Path, rows: list[dict]) -> None:
    """``rows`` (one per epoch) as CSV, written whole and atomically: a resumed run rewrites it from
    the checkpoint's history, so it never holds an epoch twice."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())
