"""Knowledge distillation: compress any trained model of the pipeline into a smaller timm model.

Per sample, labeled: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, label)``;
unlabeled: ``T^2 * KL(...)``; the batch loss is the mean over all samples. T^2 keeps the KD
gradients on the scale of the CE term whatever T (Hinton et al., 2015).

Two modes:
- ``online``: the teacher runs on the very batch the student sees (same augmentation, same mixup),
  so its targets follow the augmentation. Costs a teacher forward pass per step.
- ``offline``: the teacher labels the labeled and unlabeled shards once (un-augmented images, the
  pseudo_label machinery, cached and resumable per shard); training reads those targets. Cheaper
  per step, but an augmented view gets the target of its clean image, which is weaker KD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from pipeline.artifacts import clean_tmp, main_process, sha256_file
from pipeline.config import (
    RUNTIME_KEYS,
    Config,
    ConfigError,
    DistillConfig,
    PseudoLabelConfig,
    changed_keys,
    per_round,
    to_dict,
)
from pipeline.data import limits, noise
from pipeline.data.dataset import PreparedData, Preprocessing
from pipeline.data.stream import StreamSpec
from pipeline.data.transforms import train_transform
from pipeline.evaluate import evaluation
from pipeline.evaluate.finish import Trained, finish
from pipeline.modeling import finite, models
from pipeline.pseudo import labeling, pseudo_labels
from pipeline.runtime import make_accelerator
from pipeline.tracking import log
from pipeline.training.experiment import card, check_same_data, round_dir
from pipeline.training.objectives import Batch, Objective
from pipeline.training.trainer import Job, train


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float,
            labels_b: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """Mean over the batch of the per-sample KD loss; ``labels < 0`` marks unlabeled samples.

    With mixup (``labels_b``, ``lam``) a sample counts as labeled only when both mixed images are,
    and its CE is ``lam * CE(labels) + (1 - lam) * CE(labels_b)``.
    """
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=1)
    log_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1) * (t * t)
    labeled = labels >= 0
    ce = F.cross_entropy(student.float(), labels.clamp(min=0), reduction="none")
    if labels_b is not None:
        labeled = labeled & (labels_b >= 0)
        ce = lam * ce + (1 - lam) * F.cross_entropy(student.float(), labels_b.clamp(min=0), reduction="none")
    return torch.where(labeled, alpha * kl + (1 - alpha) * ce, kl).mean()


class OnlineKD(Objective):
    """The teacher labels the exact (augmented, mixed) batch the student is about to see."""

    def __init__(self, teacher: torch.nn.Module, temperature: float, alpha: float, mixup: float = 0.0,
                 name: str = "teacher"):
        self.teacher, self.name = teacher.eval(), name
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha, self.mixup = temperature, alpha, mixup
        self.teacher_logits: torch.Tensor | None = None
        self.labels_b: torch.Tensor | None = None
        self.lam = 1.0

    def inputs(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.labels_b, self.lam = None, 1.0
        if self.mixup > 0:
            self.lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            perm = torch.randperm(len(x), device=x.device)
            x = self.lam * x + (1 - self.lam) * x[perm]
            self.labels_b = batch.labels[perm]
        with torch.no_grad():
            self.teacher_logits = self.teacher(x).float()
        finite.check_outputs(self.teacher_logits, self.name, "logits")
        return x

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return kd_loss(logits, self.teacher_logits, batch.labels, self.temperature, self.alpha, self.labels_b, self.lam)


class OfflineKD(Objective):
    """Targets read from the teacher's cached Parquet: (probabilities, label or -1) per sample."""

    def __init__(self, temperature: float, alpha: float):
        self.temperature, self.alpha = temperature, alpha

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        probs, labels = batch.labels
        # log p = logits - logsumexp: the same softmax at any temperature, so probabilities suffice
        return kd_loss(logits, probs.float().clamp_min(1e-12).log(), labels, self.temperature, self.alpha)


class TeacherTargets:
    """Every sample of a shard once, with the teacher's probabilities from its Parquet file. Picklable."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __call__(self, shard: str) -> dict[str, tuple[int, torch.Tensor]]:
        t = pq.read_table(self.directory / pseudo_labels.parquet_name(shard), columns=["key", "probs"])
        probs = np.asarray(t.column("probs").combine_chunks().flatten()).reshape(t.num_rows, -1)
        return {k: (1, torch.from_numpy(probs[i].copy())) for i, k in enumerate(t.column("key").to_pylist())}


def default_teacher(cfg: Config) -> Path:
    """The experiment's last finished round."""
    k, last = 0, None
    while (made := card(round_dir(cfg, k))) is not None:
        check_same_data(cfg, k, made)
        last, k = round_dir(cfg, k), k + 1
    if last is None:
        raise ConfigError(f"distill.teacher not given and experiment '{cfg.name}' has no finished round")
    return last


def _offline_targets(cfg: Config, out: Path, teacher: torch.nn.Module, teacher_sha: str, shards: list[Path],
                     rows: dict[str, int], names: list[str], prep: Preprocessing, data: PreparedData, accelerator,
                     model_name: str) -> Path:
    """The teacher's probabilities for every labeled and unlabeled sample (cached, resumable per shard)."""
    tdir = out / "targets"
    why = pseudo_labels.problem(tdir, rows, teacher_sha, names)
    if why is None:
        return tdir
    if (tdir / pseudo_labels.MANIFEST).is_file():
        raise ConfigError(why)  # made for another teacher or other classes: never mixed in silently
    labeling.label_shards(teacher, shards, tdir, shard_rows=rows, teacher_sha256=teacher_sha,
                               class_names=names, prep=prep, opts=PseudoLabelConfig(
                                   batch_size=cfg.pseudo_label.batch_size, workers=cfg.pseudo_label.workers),
                               accelerator=accelerator, progress=cfg.progress, max_bad_share=cfg.data.max_bad_share,
                               model_name=model_name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stats = {"samples": sum(rows.values())}
        pseudo_labels.write_manifest(tdir, shards, Path("teacher"), teacher_sha, names, stats,
                                     data.manifest_sha256)
    accelerator.wait_for_everyone()
    pseudo_labels.check(tdir, rows, teacher_sha, names)
    return tdir


def _relevant(dcfg: DistillConfig) -> dict:
    """What a distilled model depends on: the distill section without its runtime keys."""
    runtime = {k.split(".", 1)[1] for k in RUNTIME_KEYS if k.startswith("distill.")}
    return {k: v for k, v in to_dict(dcfg).items() if k not in runtime}


def _train_and_save(out: Path, student: torch.nn.Module, job: Job, arch: str, card_fields: dict, ctx: _Context,
                    cfg: Config) -> dict:
    """Train (resumable), then write the model directory, its test score and its card (``finish``)."""
    stats = [train(student, job, out / "state", cfg.progress)]
    metrics = {"test_top1": None, "model": arch, "params": models.num_params(student),
               "train_seconds": stats[0]["seconds"], "train_img_s": stats[0]["img_s"]}
    done = Trained(out, student, ctx.names, ctx.prep, metrics, {"role": "distilled", "arch": arch, "train": stats,
                                                              **card_fields})
    return finish(done, {"test": evaluation.test_set(ctx.data)}, cfg, ctx.accelerator)


def _student(dcfg: DistillConfig, num_classes: int, in_chans: int) -> torch.nn.Module:
    extra = {"channels": tuple(dcfg.channels)} if dcfg.channels else {}
    return models.create_model(dcfg.arch, num_classes, in_chans, False, **noise.model_noise(dcfg), **extra)


def _steps(samples: int, world: int, dcfg: DistillConfig) -> int:
    """Optimizer steps per epoch over ``samples`` images, as the trainer counts them."""
    return max(1, samples // (world * dcfg.batch_size) // dcfg.grad_accum)


@dataclass
class _Context:
    """What both distillation jobs read: the data, the teacher and what identifies them."""

    accelerator: object
    data: PreparedData
    teacher_dir: Path
    teacher: torch.nn.Module
    teacher_sha: str
    prep: Preprocessing
    names: list[str]

    @property
    def parents(self) -> dict:
        return {"teacher_dir": str(self.teacher_dir), "teacher_sha256": self.teacher_sha,
                "data_manifest_sha256": self.data.manifest_sha256}


def distill(cfg: Config) -> dict:
    """Train ``distill.arch`` from the teacher into ``<experiment>/distilled/<name>/`` (resumable);
    with ``distill.labels_only`` also the same architecture on the labels alone, same budget."""
    limits.use(limits.Limits.of(cfg.data))
    dcfg = cfg.distill
    teacher_dir = Path(dcfg.teacher) if dcfg.teacher else default_teacher(cfg)
    if card(teacher_dir) is None and not (teacher_dir / models.WEIGHTS).is_file():
        raise ConfigError(f"distill.teacher: not a model directory: {teacher_dir}")
    teacher_sha = sha256_file(teacher_dir / models.WEIGHTS)
    out = cfg.run_dir / "distilled" / dcfg.name
    if main_process():
        clean_tmp(out)
    results = {}
    done = _finished(out, dcfg, teacher_sha)
    if done is not None:
        results["student"] = done
    data = PreparedData.open(cfg)
    teacher, tconf = models.load_model_dir(teacher_dir)
    ctx = _Context(make_accelerator(), data, teacher_dir, teacher, teacher_sha, models.preprocessing(tconf),
                   list(tconf.get("label_names") or data.class_names))
    if ctx.names != data.class_names:
        raise ConfigError(f"teacher {teacher_dir} predicts {ctx.names[:4]}..., the data has "
                          f"{data.class_names[:4]}...")
    models.check_arch(dcfg.arch, "distill.arch")
    if "student" not in results:
        results["student"] = _distill_student(cfg, ctx, out)
    if dcfg.labels_only:
        results["labels_only"] = _labels_only(cfg, ctx)
    results["teacher_dir"] = str(teacher_dir)
    return results


def _finished(out: Path, dcfg: DistillConfig, teacher_sha: str) -> dict | None:
    """The card of a finished distillation into ``out``; one made otherwise is refused, never reused."""
    done = card(out)
    if done is None:
        return None
    old, new = done.get("distill", {}), _relevant(dcfg)
    key = "teacher" if done["parents"]["teacher_sha256"] != teacher_sha else next(iter(changed_keys(old, new)), None)
    if key is not None:
        what = f"distill.{key}={old.get(key)!r}, this run asks {new.get(key)!r}" if key != "teacher" else "another teacher"
        raise ConfigError(f"distilled/{dcfg.name} was made with {what}; give a new distill.name=...")
    return done


def _distill_student(cfg: Config, ctx: _Context, out: Path) -> dict:
    """The student on labeled + unlabeled images against the teacher (online or from cached targets)."""

    dcfg, acc, data = cfg.distill, ctx.accelerator, ctx.data
    shards = data.shards("labeled") + data.shards("unlabeled")
    rows = {**data.rows("labeled"), **data.rows("unlabeled")}
    total, epochs = sum(rows.values()), per_round(dcfg.epochs, 1)
    set_seed(cfg.seed)
    student, teacher_params = _student(dcfg, len(ctx.names), ctx.prep.in_chans), models.num_params(ctx.teacher)
    if models.num_params(student) >= teacher_params:
        raise ConfigError(f"distill.arch={dcfg.arch} has {models.num_params(student)} parameters, not fewer "
                          f"than the teacher's {teacher_params}")
    teacher = ctx.teacher.to(acc.device)
    if dcfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    if dcfg.mode == "offline":
        tdir = _offline_targets(cfg, out, teacher, ctx.teacher_sha, shards, rows, ctx.names, ctx.prep, data, acc,
                                str(ctx.teacher_dir))
        objective, targets = OfflineKD(dcfg.temperature, dcfg.alpha), TeacherTargets(tdir)
    else:
        objective, targets = OnlineKD(teacher, dcfg.temperature, dcfg.alpha, dcfg.mixup, str(ctx.teacher_dir)), None
    spec = StreamSpec(shards=[str(s) for s in shards], mode=ctx.prep.mode,
                      transform=train_transform(ctx.prep.size, dcfg), rank=acc.process_index,
                      world=acc.num_processes, seed=cfg.seed + 104729, buffer=5000, targets=targets, missing_label=-1,
                      with_label=targets is not None, rows=rows)
    job = Job(phase="distill", cfg=dcfg, epochs=epochs, lr=dcfg.lr, labeled=spec, labeled_total=total,
              prep=ctx.prep, objective=objective, max_bad_share=cfg.data.max_bad_share,
              log_with=cfg.log_with or [], log_every=cfg.log_every, run_dir=cfg.run_dir)
    log.info(f"distill: {ctx.teacher_dir} ({teacher_params} params) -> {dcfg.arch} "
              f"({models.num_params(student)} params), {dcfg.mode}, T={dcfg.temperature}, "
              f"alpha={dcfg.alpha}, {epochs} epochs over {total} images")
    return _train_and_save(out, student, job, dcfg.arch, {"parents": ctx.parents, "distill": _relevant(dcfg),
                                                          "mode": dcfg.mode}, ctx, cfg)


def _labels_only(cfg: Config, ctx: _Context) -> dict:
    """The same architecture, optimizer and number of steps x batch size, on the labeled images alone."""

    dcfg, acc, data = cfg.distill, ctx.accelerator, ctx.data
    lo_out = cfg.run_dir / "distilled" / f"{dcfg.name}-labels-only"
    done = card(lo_out)
    if done is not None and not changed_keys(done.get("distill", {}), _relevant(dcfg)):
        return done
    set_seed(cfg.seed)
    student = _student(dcfg, len(ctx.names), ctx.prep.in_chans)
    total = sum(data.rows("labeled").values()) + sum(data.rows("unlabeled").values())
    steps = _steps(total, acc.num_processes, dcfg) * per_round(dcfg.epochs, 1)
    labeled_total = sum(data.rows("labeled").values())
    per_epoch = _steps(labeled_total, acc.num_processes, dcfg)
    spec = StreamSpec(shards=[str(s) for s in data.shards("labeled")], mode=ctx.prep.mode,
                      transform=train_transform(ctx.prep.size, dcfg), rank=acc.process_index,
                      world=acc.num_processes, seed=cfg.seed + 130363, buffer=2000,
                      rows=data.rows("labeled"))
    job = Job(phase="labels-only", cfg=dcfg, epochs=math.ceil(steps / per_epoch), lr=dcfg.lr, labeled=spec,
              labeled_total=labeled_total, prep=ctx.prep, max_bad_share=cfg.data.max_bad_share,
              log_with=cfg.log_with or [], log_every=cfg.log_every, run_dir=cfg.run_dir)
    log.info(f"labels only: {dcfg.arch} on {labeled_total} labeled images, {job.epochs} epochs "
              f"(~{steps} steps, the distillation's budget)")
    parents = {"data_manifest_sha256": ctx.parents["data_manifest_sha256"]}
    return _train_and_save(lo_out, student, job, dcfg.arch, {"parents": parents, "distill": _relevant(dcfg),
                                                             "mode": "labels-only"}, ctx, cfg)
