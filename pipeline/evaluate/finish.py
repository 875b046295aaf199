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
from pathlib import Path

import torch

from pipeline.artifacts import code_version, read_json, write_bytes_atomic, write_json_atomic
from pipeline.config import EvaluateConfig
from pipeline.data.dataset import Preprocessing
from pipeline.evaluate import evaluation
from pipeline.modeling import model_card, models


def finish(out: Path, model: torch.nn.Module, names: list[str], prep: Preprocessing, scored: dict[str, evaluation.TestSet],
           ecfg: EvaluateConfig, accelerator, metrics: dict, card_fields: dict, progress: bool = True,
           max_bad_share: float = 0.01, started: float | None = None, earlier_s: float = 0.0,
           license: str | None = None) -> dict:
    """Save ``model`` into ``out``, score it on each of ``scored`` (``{"test": ..., "val": ...}``: sets
    ``<split>_top1``, and ``test_samples``), write metrics and the card (``card_fields`` plus files,
    metrics, code version, time) and remove the training state. Every rank calls it; returns the card.

    ``started``: the job's start time; ``metrics["seconds"]`` is then its wall time, scoring
    included, plus ``earlier_s`` (a round's pseudo-labeling, a separate stage)."""
    files: dict = {}
    if accelerator.is_main_process:
        files = models.save_model_dir(model, out, names, prep.mean, prep.std, prep.size, prep.in_chans, license)
    accelerator.wait_for_everyone()
    loaded = evaluation.load(out, files.get(models.WEIGHTS))  # other ranks hash the file themselves
    for split, test in scored.items():
        clean = evaluation.clean(loaded, test, ecfg, accelerator, progress, max_bad_share)
        metrics[f"{split}_top1"] = round(clean["top1"], 3)
        if split == "test":
            metrics["test_samples"] = clean["samples"]
    if started is not None:
        metrics["seconds"] = round(earlier_s + time.time() - started, 1)
    result: dict = {}
    if accelerator.is_main_process:
        write_json_atomic(out / "metrics.json", metrics)
        result = {**card_fields, "files": files, "metrics": metrics, "code_version": code_version(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_bytes_atomic(out / "README.md", model_card.readme(
            result, read_json(out / models.TIMM_CONFIG), "/".join(out.parts[-2:]), license).encode())
        write_json_atomic(out / models.CARD, result)
        shutil.rmtree(out / "state", ignore_errors=True)
    accelerator.wait_for_everyone()
    return result or read_json(out / models.CARD)
