"""The end of every training job (a round's teacher or student, a distilled model): write the model
directory, score it with one clean pass per split, then write ``metrics.json`` and, last, the card.

A model directory is finished when its card exists and the files it lists match their hashes
(``card``): a crash before the card leaves a directory that is retrained (from its last epoch
checkpoint, in ``state/``, removed only after the card is written) or rescored, never one that
looks finished. The clean evaluation is cached under ``eval/`` by the weights' hash, so the
report and ``iterate``'s table read it instead of passing over the test set again.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.artifacts import code_version, read_json, write_bytes_atomic, write_json_atomic
from pipeline.config import Config
from pipeline.data.dataset import Preprocessing
from pipeline.evaluate import evaluation
from pipeline.modeling import model_card, models


@dataclass
class Trained:
    """A trained model at the end of its job: where it goes, what it reads, what it was."""

    out: Path
    model: torch.nn.Module
    names: list[str]
    prep: Preprocessing
    metrics: dict
    card: dict  # the card's own fields (files, metrics, code version and time are added)
    started: float | None = None  # the job's start: ``metrics["seconds"]`` is then its wall time
    earlier_s: float = 0.0  # added to it (a round's pseudo-labeling, a separate stage)


def finish(done: Trained, scored: dict[str, evaluation.TestSet], cfg: Config, accelerator) -> dict:
    """Save the model into ``done.out``, score it on each of ``scored`` (``{"test": ..., "val": ...}``:
    sets ``<split>_top1``, and ``test_samples``), write metrics and the card and remove the training
    state. Every rank calls it; returns the card."""
    out, metrics, license = done.out, done.metrics, cfg.model.license
    files: dict = {}
    if accelerator.is_main_process:
        files = models.save_model_dir(done.model, out, done.names, done.prep.mean, done.prep.std, done.prep.size,
                                      done.prep.in_chans, license)
    accelerator.wait_for_everyone()
    loaded = evaluation.load(out, files.get(models.WEIGHTS))  # other ranks hash the file themselves
    for split, test in scored.items():
        clean = evaluation.clean(loaded, test, cfg.evaluate, accelerator, cfg.progress, cfg.data.max_bad_share)
        metrics[f"{split}_top1"] = round(clean["top1"], 3)
        if split == "test":
            metrics["test_samples"] = clean["samples"]
    if done.started is not None:
        metrics["seconds"] = round(done.earlier_s + time.time() - done.started, 1)
    result: dict = {}
    if accelerator.is_main_process:
        write_json_atomic(out / "metrics.json", metrics)
        result = {**done.card, "files": files, "metrics": metrics, "code_version": code_version(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_bytes_atomic(out / "README.md", model_card.readme(
            result, read_json(out / models.TIMM_CONFIG), "/".join(out.parts[-2:]), license).encode())
        write_json_atomic(out / models.CARD, result)
        shutil.rmtree(out / "state", ignore_errors=True)
    accelerator.wait_for_everyone()
    return result or read_json(out / models.CARD)
