"""Evaluating model directories: clean metrics, corruption robustness and perturbation stability.

Every rank reads its own share of the test shards (or of the robustness subset); results are
gathered with the padding dropped, so one process and many give the same numbers. Each result
is a JSON file in the model's ``eval/`` directory named by a hash of everything that made it
(weights, test set, settings): evaluating an unchanged model again only reads that file, and an
existing result is never rewritten.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import failpoints
from pipeline.artifacts import read_json, sha256_file, short_hash, write_json_atomic
from pipeline.config import ConfigError, EvaluateConfig
from pipeline.data.bad_samples import Skip, SkipLog
from pipeline.data.dataset import PreparedData, Preprocessing
from pipeline.data.stream import StreamSpec, decode_or_skip, eval_batches, samples
from pipeline.data.transforms import eval_transform, normalize
from pipeline.evaluate import calibration, corruptions, perturbations
from pipeline.modeling import finite, models
from pipeline.tracking import bar

EVAL_DIR = "eval"


@dataclass
class TestSet:
    """Labeled test shards and what identifies them (a data manifest's hash)."""

    name: str
    shards: list[Path]
    rows: list[int]
    class_names: list[str]
    sha256: str


def test_set(data: PreparedData, split: str = "test") -> TestSet:
    """``split`` of the prepared data as a labeled evaluation set."""
    entries = data.manifest["splits"].get(split, {}).get("shards", [])
    if not entries:
        raise ConfigError(f"no '{split}' split in the prepared data {data.dir}")
    return TestSet(name=f"{data.dir.name}/{split}", shards=[data.dir / s["file"] for s in entries],
                   rows=[s["samples"] for s in entries], class_names=data.class_names,
                   sha256=short_hash([s["sha256"] for s in entries], 16))


@dataclass
class LoadedModel:
    directory: Path
    model: torch.nn.Module
    prep: Preprocessing
    class_names: list[str]
    sha256: str
    card: dict | None


def load(directory: str | Path, weights_sha256: str | None = None) -> LoadedModel:
    """A model directory ready to evaluate, with the hash of its weights (the cache key; pass it when
    known, e.g. just written)."""
    directory = Path(directory)
    model, config = models.load_model_dir(directory)
    card_path = directory / models.CARD
    card = read_json(card_path) if card_path.is_file() else None
    sha = weights_sha256 or sha256_file(directory / models.WEIGHTS)  # never the card's: weights may change after it
    return LoadedModel(directory, model, models.preprocessing(config), list(config.get("label_names", [])), sha,
                       card)


def _check_classes(m: LoadedModel, test: TestSet) -> None:
    if m.class_names and m.class_names != test.class_names:
        raise ConfigError(f"model {m.directory} predicts classes {m.class_names[:4]}..., the test set "
                          f"{test.name} has {test.class_names[:4]}...")
    if m.model.num_classes != len(test.class_names):
        raise ConfigError(f"model {m.directory} has {m.model.num_classes} outputs, the test set {test.name} "
                          f"has {len(test.class_names)} classes")


def gather_rows(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows (any count per rank) on every rank, padding dropped."""
    if accelerator.num_processes == 1:
        return t
    sizes = accelerator.gather(torch.tensor([len(t)], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(t.to(accelerator.device), dim=0)
    allrows = accelerator.gather(padded)
    m = padded.shape[0]
    return torch.cat([allrows[r * m: r * m + n] for r, n in enumerate(sizes)]).cpu()


def _cached(m: LoadedModel, kind: str, identity: dict) -> tuple[Path, dict | None]:
    path = m.directory / EVAL_DIR / f"{kind}-{short_hash(identity)}.json"
    return path, (read_json(path) if path.is_file() else None)


def _save(accelerator, path: Path, result: dict) -> dict:
    failpoints.hit("eval_result", path)
    if accelerator.is_main_process and not path.exists():
        write_json_atomic(path, result)
    accelerator.wait_for_everyone()
    return result


class _Forward:
    """uint8 batches -> top-1 / probabilities with a model's own normalisation."""

    def __init__(self, m: LoadedModel, device):
        self.model, self.name = m.model.to(device).eval(), str(m.directory)
        self.device = device
        self.mean = torch.tensor(m.prep.mean, device=device)
        self.std = torch.tensor(m.prep.std, device=device)

    @torch.inference_mode()
    def probs(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        out = [self.model(normalize(x[i:i + batch_size].to(self.device), self.mean, self.std)).float().softmax(1)
               for i in range(0, len(x), batch_size)]
        probs = torch.cat(out).cpu() if out else torch.zeros(0, self.model.num_classes)
        finite.check_outputs(probs, self.name, "probabilities")
        return probs


def clean(m: LoadedModel, test: TestSet, ecfg: EvaluateConfig, accelerator, progress: bool = True,
          max_bad_share: float = 0.01) -> dict:
    """Top-1, top-5, per-class accuracy, confusion matrix, NLL, ECE and reliability bins."""
    _check_classes(m, test)
    identity = {"model": m.sha256, "test": test.sha256, "bins": ecfg.ece_bins, "v": 1}
    path, done = _cached(m, "clean", identity)
    if done is not None:
        return done
    t0 = time.time()
    fwd = _Forward(m, accelerator.device)
    log = SkipLog("evaluate", max_bad_share, quiet=not accelerator.is_main_process)
    loader = eval_batches([str(s) for s in test.shards], m.prep.mode, eval_transform(m.prep.size),
                          ecfg.batch_size, ecfg.workers, accelerator.process_index, accelerator.num_processes, log,
                          dict(zip((s.name for s in test.shards), test.rows, strict=True)))
    probs, labels = [], []
    for x, y in bar(progress, iterable=loader, desc=f"clean {m.directory.name}", unit="batch", leave=False):
        probs.append(fwd.probs(x, ecfg.batch_size))
        labels.append(y)
    nc = len(test.class_names)
    p = gather_rows(accelerator, torch.cat(probs) if probs else torch.zeros(0, nc))
    y = gather_rows(accelerator, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    if len(y) == 0:
        raise ConfigError(f"the test set {test.name} is empty")
    skipped = int(accelerator.reduce(torch.tensor(log.skipped, device=accelerator.device), "sum").item())
    log.check()
    confusion = calibration.confusion_matrix(p.argmax(1), y, nc)
    result = {
        "kind": "clean", "identity": identity, "model_dir": str(m.directory), "test_set": test.name,
        "samples": len(y), "top1": calibration.topk_accuracy(p, y, 1),
        "top5": calibration.topk_accuracy(p, y, 5) if nc > 5 else None,
        "per_class": dict(zip(test.class_names, calibration.per_class_accuracy(confusion), strict=True)),
        "confusion": confusion.tolist(), "nll": calibration.nll(p, y),
        "ece": calibration.ece(p, y, ecfg.ece_bins), "reliability": calibration.reliability(p, y, ecfg.ece_bins),
        "skipped": skipped, "seconds": round(time.time() - t0, 1),
    }
    return _save(accelerator, path, result)


def load_subset(test: TestSet, prep: Preprocessing, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of ``n`` test images (all when None) as uint8 NCHW at the model's size; a bad
    sample keeps its place in the count and is left out (the clean pass counts and names it)."""
    total = sum(test.rows)
    chosen = np.arange(total) if n is None or n >= total else np.sort(
        np.random.default_rng(seed).choice(total, n, replace=False))
    spec = StreamSpec(shards=[str(s) for s in test.shards], mode=prep.mode, transform=eval_transform(prep.size),
                      shuffle=False, rows={Path(s).name: r for s, r in zip(test.shards, test.rows, strict=True)})
    picked = [item for item in decode_or_skip(_at(samples(spec, spec.shards), set(chosen.tolist())), spec.mode,
                                              spec.transform) if not isinstance(item, Skip)]
    if not picked:
        raise ConfigError(f"no usable image in the robustness subset of {test.name}")
    return torch.stack([p[0] for p in picked]), torch.tensor([p[1] for p in picked], dtype=torch.long)


def _at(items, positions: set[int]):
    """The samples at ``positions`` of a stream, counting a skip's lost samples."""
    pos = 0
    for item in items:
        if isinstance(item, Skip):
            pos += item.count
            continue
        if pos in positions:
            yield item
        pos += 1


def _units(n: int, chunk: int, accelerator) -> list[tuple[int, slice]]:
    """This rank's work units: fixed chunks of the subset, dealt round-robin over ranks. Units, not
    ranks, fix the random streams, so any number of processes gives the same result."""
    chunks = [(j, slice(s, min(s + chunk, n))) for j, s in enumerate(range(0, n, chunk))]
    return chunks[accelerator.process_index::accelerator.num_processes]


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def robustness_identity(m: LoadedModel, test: TestSet, ecfg: EvaluateConfig, kind: str) -> dict:
    ident = {"model": m.sha256, "test": test.sha256, "subset": ecfg.subset, "seed": ecfg.seed, "chunk": ecfg.chunk,
             "v": 1}
    if kind == "perturbations":
        ident["frames"] = ecfg.frames
    return ident


@dataclass
class _Robustness:
    """A robustness evaluation under way: where its result goes, and what it scores with."""

    path: Path
    identity: dict
    images: torch.Tensor
    labels: torch.Tensor
    fwd: _Forward
    units: list
    t0: float


def _start(m: LoadedModel, test: TestSet, ecfg: EvaluateConfig, kind: str, accelerator,
           subset: tuple[torch.Tensor, torch.Tensor] | None) -> _Robustness | dict:
    """The cached result of a robustness evaluation, else the evaluation to run."""
    _check_classes(m, test)
    identity = robustness_identity(m, test, ecfg, kind)
    path, done = _cached(m, kind, identity)
    if done is not None:
        return done
    t0 = time.time()
    images, labels = subset if subset is not None else load_subset(test, m.prep, ecfg.subset, ecfg.seed)
    return _Robustness(path, identity, images, labels, _Forward(m, accelerator.device),
                       _units(len(images), ecfg.chunk, accelerator), t0)


def corruption(m: LoadedModel, test: TestSet, ecfg: EvaluateConfig, accelerator, progress: bool = True,
               subset: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Top-1 error (percent) per corruption and severity on the seeded subset."""
    run = _start(m, test, ecfg, "corruptions", accelerator, subset)
    if isinstance(run, dict):
        return run
    images, labels, fwd, units = run.images, run.labels, run.fwd, run.units
    names = list(corruptions.CORRUPTIONS)
    correct = torch.zeros(len(names), 5, dtype=torch.long)
    clean_correct = torch.zeros((), dtype=torch.long)
    for _, sl in units:
        clean_correct += (fwd.probs(images[sl], ecfg.batch_size).argmax(1) == labels[sl]).sum()
    pairs = [(ci, name, s) for ci, name in enumerate(names) for s in range(1, 6)]
    for ci, name, s in bar(progress, iterable=pairs, desc=f"corruptions {m.directory.name}", unit="pair",
                           leave=False):
        for j, sl in units:
            x = corruptions.corrupt(images[sl], name, s, seed=_seed(ecfg.seed, name, s, j))
            correct[ci, s - 1] += (fwd.probs(x, ecfg.batch_size).argmax(1) == labels[sl]).sum()
    correct = accelerator.reduce(correct.to(accelerator.device), "sum").cpu()
    clean_correct = accelerator.reduce(clean_correct.to(accelerator.device), "sum").cpu()
    n = len(images)
    errors = {name: [round(100.0 * (1 - correct[ci, s].item() / n), 3) for s in range(5)]
              for ci, name in enumerate(names)}
    result = {"kind": "corruptions", "identity": run.identity, "model_dir": str(m.directory), "test_set": test.name,
              "samples": n, "clean_error": round(100.0 * (1 - clean_correct.item() / n), 3), "errors": errors,
              "groups": corruptions.GROUPS, "seconds": round(time.time() - run.t0, 1)}
    return _save(accelerator, run.path, result)


def perturbation(m: LoadedModel, test: TestSet, ecfg: EvaluateConfig, accelerator, progress: bool = True,
                 subset: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Flip rate per perturbation: the share of consecutive frames whose top-1 changes."""
    run = _start(m, test, ecfg, "perturbations", accelerator, subset)
    if isinstance(run, dict):
        return run
    images, fwd, units = run.images, run.fwd, run.units
    names = list(perturbations.PERTURBATIONS)
    flips = torch.zeros(len(names), dtype=torch.long)
    for pi, name in enumerate(bar(progress, iterable=names, desc=f"perturbations {m.directory.name}",
                                  unit="kind", leave=False)):
        for j, sl in units:
            seq = perturbations.sequence(images[sl], name, ecfg.frames, seed=_seed(ecfg.seed, name, j))
            n, f = seq.shape[:2]
            preds = fwd.probs(seq.flatten(0, 1), ecfg.batch_size).argmax(1).view(n, f)
            flips[pi] += (preds[:, 1:] != preds[:, :-1]).sum()
    flips = accelerator.reduce(flips.to(accelerator.device), "sum").cpu()
    pairs = len(images) * (ecfg.frames - 1)
    result = {"kind": "perturbations", "identity": run.identity, "model_dir": str(m.directory),
              "test_set": test.name, "samples": len(images), "frames": ecfg.frames,
              "flip_rate": {name: round(flips[i].item() / pairs, 6) for i, name in enumerate(names)},
              "seconds": round(time.time() - run.t0, 1)}
    return _save(accelerator, run.path, result)


def macs(model: torch.nn.Module, in_chans: int, size: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (FLOPs counted by torch, halved)."""

    model = model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, in_chans, size, size, device=next(model.parameters()).device))
    return int(counter.get_total_flops() // 2)
