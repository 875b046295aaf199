"""What a run reports: log levels, bars that honour TQDM_DISABLE and the config, accelerate's
trackers (TensorBoard here) and timm's summary.csv."""

from __future__ import annotations

import csv
import logging

import pytest
from conftest import stage, tiny_overrides

from pipeline import tracking
from pipeline.config import ConfigError, load_config


def test_bars_follow_tqdm_disable_and_the_config(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not tracking.bar(total=3).disable and tracking.bar(False, total=3).disable
    assert tracking.bar(load_config(None, ["progress=false"]).progress, total=3).disable  # passed down
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert tracking.bar(total=3).disable


def test_log_levels_and_ranks(monkeypatch):
    try:
        monkeypatch.setenv("NS_LOG_LEVEL", "warning")
        tracking.setup_logging()
        assert not tracking.log.isEnabledFor(logging.INFO) and tracking.log.isEnabledFor(logging.WARNING)
        monkeypatch.setenv("NS_LOG_LEVEL", "DEBUG")
        monkeypatch.setenv("RANK", "1")  # another rank: warnings only, so each line prints once
        tracking.setup_logging()
        assert tracking.log.level == logging.WARNING
        monkeypatch.setenv("NS_LOG_LEVEL", "chatty")
        with pytest.raises(ConfigError, match="NS_LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR"):
            tracking.setup_logging()
    finally:
        monkeypatch.delenv("NS_LOG_LEVEL", raising=False)
        monkeypatch.delenv("RANK", raising=False)
        tracking.setup_logging()
    with pytest.raises(ConfigError, match="log_with: expected list of 'tensorboard'"):
        load_config(None, ["log_with=[tensorboard, neptune]"])


def test_training_sends_steps_and_rounds_to_tensorboard_and_writes_summary_csv(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    ov = [*tiny_overrides(tiny_data, runs, name="tracked"), "teacher.epochs=3", "log_with=[tensorboard]",
          "log_every=2"]
    stage("prepare_data.py", *ov)
    r = stage("train.py", "role=teacher", *ov, env={"NS_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1"})
    assert "round 0:" not in r.stdout + r.stderr and "it/s" not in r.stderr  # no INFO lines, no bar
    out = runs / "tracked" / "round-0"
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert set(rows[0]) >= {"epoch", "loss", "lr", "seconds", "img_s"} and float(rows[-1]["lr"]) >= 0
    steps = EventAccumulator(str(out / "logs" / "train")).Reload()
    tags = steps.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/img_s", "train/epoch_loss"} <= set(tags)
    logged = [e.step for e in steps.Scalars("train/loss")]
    assert logged and all(s % 2 == 0 for s in logged) and logged == sorted(set(logged))  # every log_every steps
    assert len(steps.Scalars("train/epoch_loss")) == 3
    rounds = EventAccumulator(str(runs / "tracked" / "logs" / "rounds")).Reload()
    assert [e.step for e in rounds.Scalars("test_top1")] == [0]
