"""An experiment's directory (``runs/<name>/``): where each round's model and pseudo labels live,
and whether a model directory is finished (its card). Every stage that finds earlier work asks here."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import files_match, read_json
from pipeline.config import Config, ConfigError
from pipeline.data.dataset import data_dir
from pipeline.modeling import models


def round_dir(cfg: Config, k: int) -> Path:
    """Round k's model directory."""
    return cfg.run_dir / f"round-{k}"


def pseudo_label_dir(cfg: Config, k: int) -> Path:
    """Round k's pseudo labels, a Hive partition (``round=<k>``): the directory above reads as one
    dataset of every round, with ``round`` as a column, in pandas, pyarrow.dataset, DuckDB and Spark."""
    old = round_dir(cfg, k) / "pseudo_labels"
    if old.is_dir():
        raise ConfigError(f"{old}: pseudo labels in the layout of an older version of this pipeline; "
                          "start a new experiment name (name=...)")
    return cfg.run_dir / "pseudo_labels" / f"round={k}"


def card(directory: Path) -> dict | None:
    """The card of a finished model directory (its weights and config match), else None."""
    path = Path(directory) / models.CARD
    if not path.is_file():
        return None
    c = read_json(path)
    return c if files_match(directory, c.get("files", {})) else None


def check_same_data(cfg: Config, k: int, made: dict) -> None:
    """Refuse a finished round trained on data prepared otherwise (an earlier listing rule)."""
    made_data = (made.get("parents") or {}).get("data_dir")
    if made_data and Path(made_data).name != data_dir(cfg).name:
        raise ConfigError(f"round-{k} of experiment '{cfg.name}' was trained on data prepared otherwise "
                          f"({Path(made_data).name}, by an earlier version of the listing rules; now "
                          f"{data_dir(cfg).name}); give a new name=... to start another experiment")
