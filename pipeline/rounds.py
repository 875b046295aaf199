"""The Noisy Student plan: round 0 trains the teacher; round k >= 1 pseudo-labels the pool with
round k-1's model and trains a noised (equal-or-larger) student. Every step asks "is this
done?" first, so ``iterate`` reruns cost nothing and a killed run resumes.

Run directory: ``<runs_dir>/<name>/round-<k>/`` holds config.json + model.safetensors (timm
local-dir layout), metrics.json, card.json (written last: its presence with matching hashes
means the round is finished) and ``state/`` while training. Round k's pseudo labels (k >= 1) are
``<runs_dir>/<name>/pseudo_labels/round=<k>/``: Hive partitions of one dataset.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from pipeline.artifacts import clean_tmp, main_process, read_json, sha256_file
from pipeline.config import (
    PER_ROUND_KEYS,
    RUNTIME_KEYS,
    Config,
    ConfigError,
    build,
    changed_keys,
    flatten,
    for_round,
    per_round,
    to_dict,
)
from pipeline.data import limits, noise
from pipeline.data.dataset import PreparedData
from pipeline.data.prepare import prepare
from pipeline.data.stream import StreamSpec
from pipeline.data.transforms import train_transform
from pipeline.evaluate import evaluation
from pipeline.evaluate.finish import Trained, finish
from pipeline.modeling import models
from pipeline.pseudo import labeling, pseudo_labels, selection
from pipeline.runtime import make_accelerator
from pipeline.tracking import Trackers, log
from pipeline.training import budget
from pipeline.training.experiment import card, check_same_data, pseudo_label_dir, round_dir
from pipeline.training.objectives import NoisyStudent
from pipeline.training.trainer import Job, train


def _relevant(cfg_dict: dict, k: int) -> dict:
    """The config values that shaped round k's model, per-round lists resolved to round k.

    Round 0 does not depend on student or pseudo-label settings; a student round depends on its
    own entries of per-round lists and on its architecture, so extending a list (or the
    students) for a later round does not count as changing a finished one.
    """
    flat = flatten(cfg_dict)
    skip = RUNTIME_KEYS | {"name", "model.students", "model.ladder"}
    out = {}
    for key, v in flat.items():
        if key in skip or key.startswith(("evaluate.", "distill.")) or (k == 0 and key.split(".")[0] in ("student", "pseudo_label")):
            continue
        out[key] = per_round(v, k) if key in PER_ROUND_KEYS and k >= 1 else v
    try:
        out["arch"] = arch_of(build(Config, cfg_dict), k)
    except ConfigError:
        out["arch"] = (flat.get("model.students"), flat.get("model.ladder"))
    return out


def check_unchanged(cfg: Config, k: int, made: dict) -> None:
    """Refuse a config that differs from the one that made finished round ``k``."""
    try:  # keys added since the round was made take their defaults, which is what made it
        made_cfg = to_dict(build(Config, made["config"]))
    except ConfigError:
        made_cfg = made["config"]
    old, new = _relevant(made_cfg, k), _relevant(to_dict(cfg), k)
    diff = changed_keys(old, new)
    if diff:
        key = diff[0]
        raise ConfigError(
            f"round-{k} of experiment '{cfg.name}' was made with {key}={old.get(key)!r}, this run asks "
            f"{key}={new.get(key)!r}" + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else "")
            + "; give a new name=... to start another experiment")
    check_same_data(cfg, k, made)


def arch_of(cfg: Config, k: int) -> str:
    arch = models.check_arch(cfg.model.arch)
    for r in range(1, k + 1):
        arch = models.student_arch(cfg.model, r, arch)
    return arch


def pseudo_label(cfg: Config, k: int, teacher_dir: Path | None = None) -> dict:
    """Label the unlabeled shards with round k-1's model into ``pseudo_label_dir(cfg, k)`` (resumable)."""
    limits.use(limits.Limits.of(cfg.data))
    accelerator = make_accelerator()
    data = PreparedData.open(cfg)
    own = teacher_dir is None
    teacher_dir = teacher_dir or round_dir(cfg, k - 1)
    made = card(teacher_dir)
    if made is None:
        raise ConfigError(f"teacher model not found or unfinished: {teacher_dir}")
    if own:
        check_same_data(cfg, k - 1, made)
    teacher_sha = sha256_file(teacher_dir / models.WEIGHTS)
    out = pseudo_label_dir(cfg, k)
    shards, rows, names = data.shards("unlabeled"), data.rows("unlabeled"), data.class_names
    done = pseudo_labels.finished(out, rows, teacher_sha, names, cfg.pseudo_label.tta)
    if done is not None:
        return done
    model, mconfig = models.load_model_dir(teacher_dir)
    t0 = time.time()
    mine = labeling.label_shards(
        model, shards, out, shard_rows=rows, teacher_sha256=teacher_sha, class_names=names,
        prep=models.preprocessing(mconfig), opts=cfg.pseudo_label, accelerator=accelerator, progress=cfg.progress,
        max_bad_share=cfg.data.max_bad_share, model_name=str(teacher_dir))
    counts = accelerator.gather(torch.tensor([mine["samples"]], device=accelerator.device)).sum().item()
    accelerator.wait_for_everyone()
    result = {}
    if accelerator.is_main_process:
        seconds = time.time() - t0
        prev = pseudo_label_dir(cfg, k - 1) if k >= 2 else None  # round 1's teacher is the first to label
        stats = pseudo_labels.pool_stats(out, shards, names, data.truth, cfg.student.threshold, prev)
        stats.update({"labeled_now": int(counts), "seconds": round(seconds, 1),
                      "img_s": round(counts / max(seconds, 1e-9), 1)})
        result = pseudo_labels.write_manifest(out, shards, teacher_dir, teacher_sha, names, stats,
                                              data.manifest_sha256, cfg.pseudo_label.tta)
        acc = stats.get("accuracy")
        log.info(
            f"pseudo-labeled {stats['samples']} samples ({counts} now on {accelerator.num_processes} process(es), "
            f"{stats['img_s']:.0f} img/s), mean "
            f"confidence {stats['mean_confidence']:.3f}" + (f", accuracy {acc:.2f}%" if acc is not None else "")
            + f"; classes {stats['class_histogram']}")
    accelerator.wait_for_everyone()
    return result or read_json(out / pseudo_labels.MANIFEST)


@dataclass
class Teacher:
    """Round k-1's finished model as round k uses it: checked and hashed once."""

    dir: Path
    sha256: str


@dataclass
class PseudoLabels:
    """Round k's pseudo labels as the student reads them: checked, selected (threshold, balance,
    sharpening) into per-shard targets."""

    dir: Path
    manifest: dict
    manifest_sha256: str
    targets: selection.StudentTargets
    chosen: dict  # what the selection kept, for the card


def train_round(cfg: Config, k: int) -> dict:
    """Train round k's model (k=0 teacher, else student) unless it is already finished; returns its card.

    One step per line, each returning what the next takes: the teacher and its pseudo labels, the
    noised model, the job (data streams with the input noise, objective, schedule), its plan under a
    budget, the training, the finished model directory."""
    limits.use(limits.Limits.of(cfg.data))
    out = round_dir(cfg, k)
    if main_process():
        clean_tmp(out)  # a model directory a killed run was writing
    done = card(out)
    if done is not None:
        check_unchanged(cfg, k, done)
        return done
    accelerator = make_accelerator()
    set_seed(cfg.seed + k)
    t0 = time.time()
    data = PreparedData.open(cfg)
    tcfg = for_round(cfg.teacher, 1) if k == 0 else for_round(cfg.student, k)
    teacher = _teacher(cfg, k) if k else None
    pseudo = _pseudo_labels(cfg, k, data, teacher) if teacher else None
    model, init = _create_or_grow(cfg, k, data, tcfg, teacher)
    job = _job(cfg, k, data, tcfg, pseudo, accelerator)
    job, planned = _plan(cfg, k, job, model, out, accelerator, data, pseudo)
    stats = _train(cfg, k, model, job, out)
    record = {"round": k, "role": "teacher" if k == 0 else "student", "arch": arch_of(cfg, k), "train": stats,
              "noise": noise.describe(tcfg), "selection": pseudo.chosen if pseudo else {},
              "parents": _parents(data, teacher, pseudo, init), "config": to_dict(cfg), "budget": planned}
    return _finish(cfg, k, _trained(k, out, model, data, job, pseudo, record, t0), data, accelerator)


def _teacher(cfg: Config, k: int) -> Teacher:
    d = round_dir(cfg, k - 1)
    if card(d) is None:
        raise ConfigError(f"round {k} needs the finished round {k - 1} model in {d}")
    return Teacher(d, sha256_file(d / models.WEIGHTS))


def _pseudo_labels(cfg: Config, k: int, data: PreparedData, teacher: Teacher) -> PseudoLabels:
    pl_dir, names = pseudo_label_dir(cfg, k), data.class_names
    manifest = pseudo_labels.check(pl_dir, data.rows("unlabeled"), teacher.sha256, names, cfg.pseudo_label.tta,
                                   data.keys("unlabeled"))
    manifest_sha = sha256_file(pl_dir / pseudo_labels.MANIFEST)  # what was checked, before training starts
    targets, chosen = selection.student_targets(pl_dir, data.shards("unlabeled"), cfg.student, len(names))
    log.info(f"round {k}: student {arch_of(cfg, k)}, {chosen['samples']} pseudo-labeled samples per "
             f"epoch ({chosen['kept']} kept at threshold {cfg.student.threshold})")
    return PseudoLabels(pl_dir, manifest, manifest_sha, targets, chosen)


def _create_or_grow(cfg: Config, k: int, data: PreparedData, tcfg, teacher: Teacher | None
                    ) -> tuple[torch.nn.Module, dict | None]:
    """Round k's model with its model noise (dropout, stochastic depth); a student with
    ``init_from_teacher`` starts from (grows from) its teacher. Returns (model, how it was initialised)."""
    arch = arch_of(cfg, k)
    if k == 0:
        log.info(f"round 0: teacher {arch} on {data.count('labeled')} labeled images")
    prep = data.preprocessing(cfg.model.image_size)
    model = models.create_model(arch, len(data.class_names), prep.in_chans, cfg.model.pretrained if k == 0 else False,
                                **noise.model_noise(tcfg))
    if teacher is None or not cfg.student.init_from_teacher:
        return model, None
    added = models.grow_from(model, load_file(str(teacher.dir / models.WEIGHTS)))
    return model, {"from": "teacher", "sha256": teacher.sha256, "new_tensors": added}


def _job(cfg: Config, k: int, data: PreparedData, tcfg, pseudo: PseudoLabels | None, accelerator) -> Job:
    """The round's training job: the labeled stream (and the pseudo-labeled one, with the Noisy Student
    objective), both through the round's input noise (``train_transform``: crop, flip, RandAugment, erasing)."""
    prep = data.preprocessing(cfg.model.image_size)
    inputs = train_transform(prep.size, tcfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    labeled = StreamSpec(shards=[str(p) for p in data.shards("labeled")], mode=prep.mode, transform=inputs,
                         rank=rank, world=world, seed=cfg.seed, buffer=2000, rows=data.rows("labeled"))
    job = Job(phase="train", cfg=tcfg, epochs=per_round(tcfg.epochs, 1), lr=tcfg.lr, labeled=labeled,
              labeled_total=data.count("labeled"), prep=prep, max_bad_share=cfg.data.max_bad_share,
              log_with=cfg.log_with or [], log_every=cfg.log_every, run_dir=cfg.run_dir)
    if pseudo is None:
        return job
    unlabeled = StreamSpec(shards=[str(s) for s in data.shards("unlabeled")], mode=prep.mode, transform=inputs,
                           rank=rank, world=world, seed=cfg.seed + 7919 * k, buffer=5000, targets=pseudo.targets,
                           rows=data.rows("unlabeled"))
    return dataclasses.replace(job, unlabeled=unlabeled, unlabeled_total=pseudo.targets.total,
                               unlabeled_ratio=cfg.student.unlabeled_ratio,
                               objective=NoisyStudent(tcfg.label_smoothing, cfg.student.unlabeled_weight,
                                                      cfg.student.mixup))


def _plan(cfg: Config, k: int, job: Job, model: torch.nn.Module, out: Path, accelerator, data: PreparedData,
          pseudo: PseudoLabels | None) -> tuple[Job, dict | None]:
    """Under ``cfg.budget``, the job with the epochs of the round's plan (``budget.py``), and the plan."""
    if cfg.budget is None:
        return job, None
    labeling_s = (pseudo.manifest.get("stats", {}).get("seconds") or 0.0) if pseudo else 0.0
    planned = budget.round_epochs(cfg, k, job, model, out / "state", accelerator, data.manifest, labeling_s)
    epochs = int(planned["epochs"])
    # the teacher keeps its fixed epochs whatever the machine's pace (budget.py)
    return dataclasses.replace(job, epochs=epochs, deadline_s=float(planned["share_s"]), min_epochs=min(
        epochs, int(planned["fixed_epochs"])) if k == 0 else job.min_epochs), planned


def _train(cfg: Config, k: int, model: torch.nn.Module, job: Job, out: Path) -> list[dict]:
    """The round's training, then (students with ``finetune_epochs``) a fine-tune on the labels alone."""
    stats = [train(model, job, out / "state", cfg.progress)]
    if k >= 1 and cfg.student.finetune_epochs:
        ft = Job(phase="finetune", cfg=job.cfg, epochs=cfg.student.finetune_epochs, lr=cfg.student.finetune_lr,
                 labeled=job.labeled, labeled_total=job.labeled_total, prep=job.prep,
                 max_bad_share=cfg.data.max_bad_share, log_with=job.log_with, log_every=job.log_every,
                 run_dir=job.run_dir)
        stats.append(train(model, ft, out / "state", cfg.progress))
    return stats


def _parents(data: PreparedData, teacher: Teacher | None, pseudo: PseudoLabels | None, init: dict | None) -> dict:
    """What the round was made from, with hashes: the data, its teacher and pseudo labels, its start."""
    parents: dict = {"data_manifest_sha256": data.manifest_sha256, "data_dir": str(data.dir)}
    if teacher is not None and pseudo is not None:
        parents.update({"teacher_dir": str(teacher.dir), "teacher_sha256": teacher.sha256,
                        "pseudo_labels_manifest_sha256": pseudo.manifest_sha256})
    if init is not None:
        parents["init"] = init
    return parents


def _trained(k: int, out: Path, model: torch.nn.Module, data: PreparedData, job: Job, pseudo: PseudoLabels | None,
             record: dict, t0: float) -> Trained:
    """The round's model with its metrics so far (the scores are added by ``finish``)."""
    pl_stats = pseudo.manifest.get("stats", {}) if pseudo else {}
    stats = record["train"]
    metrics = {"test_top1": None, "round": k, "model": record["arch"], "params": models.num_params(model),
               "pseudo_label_acc": pl_stats.get("accuracy") if k else None,
               "pseudo_label_seconds": pl_stats.get("seconds") if k else None,
               "train_seconds": round(sum(s["seconds"] for s in stats), 1), "train_img_s": stats[0]["img_s"]}
    return Trained(out, model, data.class_names, job.prep, metrics, record, started=t0,
                   earlier_s=metrics["pseudo_label_seconds"] or 0)


def _finish(cfg: Config, k: int, done: Trained, data: PreparedData, accelerator) -> dict:
    """Score the round (test unless ``evaluate.test`` is off, and val) and write its model directory and card."""
    scored = {}
    if cfg.evaluate.test:
        scored["test"] = evaluation.test_set(data)
    if data.count("val"):
        scored["val"] = evaluation.test_set(data, "val")
    result = finish(done, scored, cfg, accelerator)
    if accelerator.is_main_process:
        m = result["metrics"]
        rounds = Trackers(cfg.log_with or [], cfg.run_dir, "rounds")  # one curve over the rounds: step = k
        rounds.log({key: m[key] for key in ("test_top1", "val_top1", "pseudo_label_acc") if m.get(key) is not None}, k)
        rounds.close()
        scores = ", ".join(f"{split} top-1 {m[f'{split}_top1']:.2f}%" for split in ("test", "val")
                           if m.get(f"{split}_top1") is not None)
        log.info(f"round {k}: {m['model']} {scores or 'not scored (evaluate.test=false, no val split)'} "
                 f"-> {done.out}")
    return result


def iterate(cfg: Config, last_round: int) -> list[dict]:
    """Run or resume rounds 0..last_round; returns each round's metrics."""
    if last_round < 0:
        raise ConfigError(f"round: must be >= 0, got {last_round}")
    limits.use(limits.Limits.of(cfg.data))
    for k in range(last_round + 1):  # refuse a changed config before any work is done
        done = card(round_dir(cfg, k))
        if done is not None:
            check_unchanged(cfg, k, done)
    accelerator = make_accelerator()
    if accelerator.is_main_process:
        if cfg.budget is not None:
            budget.start(cfg, last_round)
        prepare(cfg)
    accelerator.wait_for_everyone()
    test = evaluation.test_set(PreparedData.open(cfg))
    rows = []
    for k in range(last_round + 1):
        if k >= 1 and card(round_dir(cfg, k)) is None:
            pseudo_label(cfg, k)
        row = dict(train_round(cfg, k)["metrics"])
        if cfg.evaluate.test:
            # clean metrics (cached in round-k/eval/); robustness and the report are `make report`'s
            clean = evaluation.clean(evaluation.load(round_dir(cfg, k)), test, cfg.evaluate, accelerator, cfg.progress,
                                     cfg.data.max_bad_share)
            row.update({"ece": clean["ece"], "nll": clean["nll"], "top5": clean["top5"]})
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of test top-1 per round."""
    def pct(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["| round | model | test top-1 (%) | val top-1 (%) | ECE | pseudo-label acc. (%) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ece = r.get("ece")
        lines.append(f"| {r['round']} | {r['model']} | {pct(r.get('test_top1'))} | {pct(r.get('val_top1'))} | "
                     f"{'-' if ece is None else f'{ece:.4f}'} | {pct(r.get('pseudo_label_acc'))} | {r['seconds']:.0f} |")
    return "\n".join(lines)


__all__ = ["check_unchanged", "iterate", "pseudo_label", "table", "train_round"]
