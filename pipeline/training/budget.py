"""A time budget for ``make iterate``: each training phase's length is planned from the throughput
measured in its own first steps, so the whole run ends within the budget on whatever machine runs
it (CPUs differ several-fold per training step: README, "A time budget").

The budget is shared out in proportion to the fixed schedule's work (images trained per round),
after setting aside what is not training: pseudo-labeling, estimated from the same rate; each
round's probe, scoring and writes, at least as long as the last finished round took them; the
run's start-up. ``budget_teacher_share`` can give the teacher its own share instead (labels alone
plateau, so a teacher's extra epochs may buy less than a student's). Either way the teacher keeps
its fixed epochs whenever what is left covers them: a budget never makes a worse teacher than no
budget.
Each phase is planned when it starts, from what is really left, so a slow phase shortens the
later ones. The plan is written to ``<run dir>/budget.json``; a resumed run keeps the plan
of every phase already planned (same epochs, same learning-rate schedule).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import read_json, write_json_atomic
from pipeline.config import ConfigError, parse_duration, per_round
from pipeline.tracking import log
from pipeline.training.trainer import images_per_step, steps_per_epoch, train

PLAN_FILE = "budget.json"
# a pseudo-labeled image costs about this share of a training image
INFERENCE_COST = 0.35
# a scored image (validation, test), the round's probe and writes included
EVAL_COST = 1.0
# the round's other seconds as the last round measured them, times this: the machine's pace drifts
EVAL_MARGIN = 1.5
# the share of the budget no phase's clock counts: process start-up and imports, the hand-over between rounds
START_SHARE = 0.01


@dataclass
class Phase:
    """One training phase as the fixed schedule has it."""

    round: int
    epochs: int  # the config's epochs
    images_per_epoch: int  # training images per epoch (labeled + pseudo-labeled)
    label_images: int = 0  # pool images it pseudo-labels for the next round
    eval_images: int = 0  # validation and test images it scores

    @property
    def work(self) -> float:
        return float(self.epochs * self.images_per_epoch)


def _weights(phases: list[Phase], teacher_share: float | None) -> list[float]:
    """Each phase's weight in sharing out the time left: its fixed-schedule work, or the teacher
    (round 0) ``teacher_share`` and the students the rest in proportion to their work."""
    if teacher_share is None or phases[0].round != 0 or len(phases) == 1:
        return [p.work for p in phases]
    students = sum(p.work for p in phases[1:])
    return [teacher_share] + [(1 - teacher_share) * p.work / max(students, 1.0) for p in phases[1:]]


def plan_epochs(budget_s: float, spent_s: float, phase: Phase, later: list[Phase], img_s: float,
                teacher_share: float | None = None, other_s: float | None = None) -> dict:
    """Epochs for ``phase`` so that it and the ``later`` phases fit in what is left of the budget.

    What is left, less ``START_SHARE`` of the budget and each phase's seconds besides training
    (labelling at ``INFERENCE_COST`` of the measured training rate ``img_s``; its scoring at
    ``EVAL_COST``, or ``EVAL_MARGIN`` times ``other_s``, what the last finished round took besides
    training, where that is more), is shared by the phases' weights (``_weights``); this phase gets
    its share's worth of epochs at ``img_s`` (at least 1). The teacher gets at least its fixed
    epochs when they fit with one epoch of every later phase."""
    if img_s <= 0:
        raise ValueError("img_s must be positive")
    phases = [phase, *later]
    inference_s = START_SHARE * budget_s + sum(p.label_images * INFERENCE_COST / img_s + max(
        EVAL_MARGIN * (other_s or 0.0), p.eval_images * EVAL_COST / img_s) for p in phases)
    left = max(0.0, budget_s - spent_s - inference_s)
    weights = _weights(phases, teacher_share)
    share = left * weights[0] / max(sum(weights), 1e-12)
    if phase.round == 0:
        fixed_s = phase.work / img_s
        if share < fixed_s <= left - sum(p.images_per_epoch for p in later) / img_s:
            share = fixed_s
    epochs = max(1, int(share * img_s // phase.images_per_epoch))
    return {"round": phase.round, "epochs": epochs, "fixed_epochs": phase.epochs, "img_s": round(img_s, 1),
            "share_s": round(share, 1), "teacher_share": teacher_share, "spent_s": round(spent_s, 1), "planned_s": round(
                epochs * phase.images_per_epoch / img_s, 1), "reserved_s": round(inference_s, 1)}


class BudgetPlan:
    """``<run dir>/budget.json``: the budget and each planned phase, kept across resumes."""

    def __init__(self, run_dir: Path, budget_s: float):
        self.path = Path(run_dir) / PLAN_FILE
        self.data = read_json(self.path) if self.path.is_file() else {"budget_s": budget_s, "phases": {}}
        if self.data["budget_s"] != budget_s:
            raise ConfigError(f"budget: this run was planned for {self.data['budget_s']:.0f} s "
                              f"({self.path}); give the same budget to resume it, or a new name=...")

    @property
    def budget_s(self) -> float:
        return float(self.data["budget_s"])

    def get(self, k: int) -> dict | None:
        return self.data["phases"].get(str(k))

    def record(self, k: int, entry: dict) -> None:
        self.data["phases"][str(k)] = entry
        self.record_meta()

    def record_meta(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)


PROBE_STEPS = 12  # training steps measured (on a copy of the model) before a phase is planned


def spent_seconds(run_dir: Path, data_manifest: dict, k: int, pseudo_label_s: float = 0.0) -> float:
    """Seconds the run has used before round ``k`` trains: prepare, finished rounds, this round's labelling."""
    spent = float(data_manifest.get("seconds") or 0.0) + pseudo_label_s
    for j in range(k):
        metrics = Path(run_dir) / f"round-{j}" / "metrics.json"
        if metrics.is_file():
            spent += float(read_json(metrics).get("seconds") or 0.0)
    return spent


def other_seconds(run_dir: Path, k: int) -> float | None:
    """Seconds the last finished round before ``k`` spent besides labelling and training (its
    probe, scoring and writes), or None before any round has finished. A resumed round's training
    seconds include the killed process's, so it can read low: ``plan_epochs`` keeps the estimate
    then."""
    for j in range(k - 1, -1, -1):
        metrics = Path(run_dir) / f"round-{j}" / "metrics.json"
        if metrics.is_file():
            m = read_json(metrics)
            return max(0.0, m["seconds"] - m["train_seconds"] - (m.get("pseudo_label_seconds") or 0.0))
    return None


def phases(cfg, k: int, last_round: int, images_per_epoch: int, data_manifest: dict, infer_factor: int) -> tuple[
        Phase, list[Phase]]:
    """Round ``k``'s phase (its real epoch size) and the later rounds' (estimated from the pool)."""

    splits = data_manifest["splits"]
    pool = splits.get("unlabeled", {}).get("count", 0)
    scored = splits.get("val", {}).get("count", 0) + (splits.get("test", {}).get("count", 0) if cfg.evaluate.test else 0)
    labelling = pool * infer_factor * (2 if cfg.pseudo_label.tta else 1)

    def phase(j: int, epochs, images_per_epoch: int) -> Phase:
        return Phase(j, int(epochs), images_per_epoch, labelling if j < last_round else 0, scored * infer_factor)

    this = phase(k, per_round(cfg.teacher.epochs, 1) if k == 0 else per_round(cfg.student.epochs, k), images_per_epoch)
    student_epoch = int(pool * (1 + 1 / cfg.student.unlabeled_ratio))
    later = [phase(j, per_round(cfg.student.epochs, j), student_epoch)
             for j in range(k + 1, last_round + 1)]
    return this, later


def round_epochs(cfg, k: int, job, model, state_root: Path, accelerator, data_manifest: dict,
                 pseudo_label_s: float = 0.0) -> dict:
    """Round ``k``'s plan under ``cfg.budget`` (``epochs`` and how they were planned): the recorded
    one, else measured and planned now."""

    budget_s = parse_duration(cfg.budget)
    plan = BudgetPlan(cfg.run_dir, budget_s)
    entry = plan.get(k)
    if entry is None:
        img_s = train(copy.deepcopy(model), job, state_root / "probe", progress=False, probe=PROBE_STEPS)["img_s"]
        if accelerator.is_main_process:
            world = accelerator.num_processes
            per_epoch = steps_per_epoch(job, world) * images_per_step(job, world)
            this, later = phases(cfg, k, max(k, plan.data.get("last_round", k)), per_epoch,
                                 data_manifest, 2 if getattr(model, "flip_tta", False) else 1)
            entry = plan_epochs(budget_s, spent_seconds(cfg.run_dir, data_manifest, k, pseudo_label_s), this, later,
                                img_s * world, cfg.budget_teacher_share, other_seconds(cfg.run_dir, k))
            plan.record(k, entry)
            log.info(f"budget: round {k} gets {entry['share_s']:.0f} s of the {budget_s:.0f} s budget "
                              f"({entry['spent_s']:.0f} s spent): {entry['epochs']} epochs at {entry['img_s']:.0f} img/s "
                              f"(fixed schedule: {entry['fixed_epochs']}) -> {plan.path}")
        accelerator.wait_for_everyone()
        entry = BudgetPlan(cfg.run_dir, budget_s).get(k)
    else:
        log.info(f"budget: round {k} keeps its planned {entry['epochs']} epochs ({plan.path})")
    return entry


def start(cfg, last_round: int) -> None:
    """Record the rounds a budgeted ``iterate`` covers (kept by a resumed run) and say what it plans."""
    plan = BudgetPlan(cfg.run_dir, parse_duration(cfg.budget))
    if plan.data.get("last_round", last_round) < last_round and plan.data["phases"]:
        raise ConfigError(f"budget: this run was planned for rounds 0..{plan.data['last_round']} ({plan.path}); "
                          f"continue it without budget=..., or start a new name=...")
    if "last_round" not in plan.data:
        plan.data["last_round"] = last_round
        plan.record_meta()
    log.info(f"budget {plan.budget_s:.0f} s for rounds 0..{plan.data['last_round']}: each round's epochs are planned "
          f"from the img/s of its first {PROBE_STEPS} steps ({plan.path})")
