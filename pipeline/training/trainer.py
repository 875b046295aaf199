"""The one training loop (teacher, student, distillation, fine-tune): Accelerate, resumable per epoch.

What the loss is belongs to the job's objective (``objectives.py``); the loop only moves batches:
each step takes a labeled batch and, when the job has an unlabeled stream (a student), an
unlabeled batch ``unlabeled_ratio`` times larger, both through one forward pass. A step whose loss
or gradient norm is not finite changes nothing (``guard.py``). After every
epoch ``accelerator.save_state`` writes ``state/<phase>-eNNNN`` (to a temporary name, then
renamed), so a killed run resumes at the last finished epoch with the same data order (the order
is a function of seed and epoch).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from pipeline import failpoints
from pipeline.artifacts import TMP_PREFIX, read_json, write_json_atomic
from pipeline.config import TrainConfig, flatten, to_dict
from pipeline.data.bad_samples import SkipLog
from pipeline.data.dataset import Preprocessing
from pipeline.data.stream import StreamSpec, endless_batches, epoch_batches
from pipeline.data.transforms import batch_augment, normalize
from pipeline.errors import ConfigError
from pipeline.modeling import precision
from pipeline.runtime import make_accelerator
from pipeline.tracking import Trackers, bar, log, write_summary
from pipeline.training.guard import StepGuard
from pipeline.training.objectives import Batch, Objective, Supervised


@dataclass
class Job:
    """What one training phase needs besides the model: data, schedule and objective."""

    phase: str  # "train", "finetune", "distill", ...: names the checkpoints
    cfg: TrainConfig
    epochs: int
    lr: float
    labeled: StreamSpec
    labeled_total: int
    prep: Preprocessing  # mode, size, mean, std
    unlabeled: StreamSpec | None = None
    unlabeled_total: int = 0
    unlabeled_ratio: int = 0
    objective: Objective | None = None  # default: supervised CE with cfg.label_smoothing
    max_bad_share: float = 0.01  # data.max_bad_share: skipped share of samples that stops the run
    log_with: list[str] = field(default_factory=list)  # the config's log_with: trackers under <out>/logs/
    log_every: int = 50  # optimizer steps between tracker points
    run_dir: Path | None = None  # the experiment's directory: where a bf16 fallback is recorded and read
    deadline_s: float | None = None  # a budget's training seconds for the phase: fewer epochs if they would pass it
    min_epochs: int = 1  # what a deadline never cuts below (a budgeted teacher's fixed epochs)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """timm's factory: SGD with Nesterov momentum or AdamW; no weight decay on 1-d parameters (biases, norms)."""
    extra = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    return create_optimizer_v2(model, cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay, **extra)


def _cosine(total: int, warmup: int):
    """Linear warmup then cosine decay, per step, as a factor of the base lr (for torch's LambdaLR).

    Kept over torch's SequentialLR(LinearLR, CosineAnnealingLR) and timm's CosineLRScheduler: the
    closed form gives the same lr at every step as the checkpoints already written, whose results
    (bench/results) this keeps reproducible; CosineAnnealingLR's recursive form drifts from it in
    float and timm's warmup starts from ``warmup_lr_init``, not from lr / warmup."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def _latest_state(state_root: Path, phase: str) -> tuple[Path | None, dict]:
    best, info = None, {}
    for d in sorted(state_root.glob(f"{phase}-e*")):
        if d.is_dir() and (d / "progress.json").is_file():
            best, info = d, read_json(d / "progress.json")
    return best, info


def steps_per_epoch(job: Job, world: int) -> int:
    bs = job.cfg.batch_size
    if job.unlabeled is not None:
        n = job.unlabeled_total // (world * bs * job.unlabeled_ratio)
    else:
        n = job.labeled_total // (world * bs)
    return max(1, n // job.cfg.grad_accum)


PROBE_WARMUP = 2  # first steps of a probe left out of its rate (allocation, first-call costs)


def images_per_step(job: Job, world: int) -> int:
    """Training images of one optimizer step over all ranks (labeled + pseudo-labeled, accumulation included)."""
    unlabeled = job.unlabeled_ratio if job.unlabeled is not None else 0
    return job.cfg.batch_size * (1 + unlabeled) * job.cfg.grad_accum * world


@dataclass
class _Run:
    """One phase's training as ``_setup`` made it: what each step and the finish use."""

    job: Job
    accelerator: object
    wrapped: torch.nn.Module  # the model as Accelerate prepared it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: object | None
    objective: Objective
    guard: StepGuard
    precision_reason: str | None  # why the phase started in another precision than its config's
    autocast: object
    scaler: object | None
    augment: object | None
    mean: torch.Tensor
    std: torch.Tensor
    steps_per_epoch: int
    images_per_step: int
    start_epoch: int = 0
    elapsed: float = 0.0
    cut: dict | None = None  # epochs left out to end by ``job.deadline_s`` (``_fit_deadline``)
    history: list = field(default_factory=list)
    trackers: Trackers | None = None


def train(model: torch.nn.Module, job: Job, state_root: Path, progress: bool = True, probe: int = 0) -> dict:
    """Run ``job`` on ``model`` (resuming from ``state_root`` if a checkpoint exists); returns stats.

    On return the unwrapped ``model`` holds the final weights (the EMA weights when enabled).
    A fresh Accelerator per phase keeps its checkpoint contents to this phase's objects.
    ``probe``: run only that many steps of the first epoch, save and resume nothing, and return
    ``{"img_s": ...}`` measured after the first ``PROBE_WARMUP`` steps (the budget's rate; pass a copy
    of the model, since it is trained).
    """
    run = _setup(model, job)
    run.trackers = Trackers(job.log_with if not probe else [], state_root.parent, job.phase, _scalars(job),
                            run.accelerator.is_main_process)
    if not probe:
        _resume(run, state_root)
    acc, spe = run.accelerator, run.steps_per_epoch
    steps = bar(progress and acc.is_main_process, total=spe * job.epochs, initial=run.start_epoch * spe,
                desc=job.phase, unit="step", smoothing=0.05)
    world = acc.num_processes
    skips = SkipLog(job.phase + (f" (rank {acc.process_index})" if world > 1 else ""), job.max_bad_share,
                    quiet=not acc.is_main_process and world > 1)
    for epoch in range(run.start_epoch, job.epochs):
        if epoch >= job.epochs:  # a deadline cut the phase short (``_fit_deadline``)
            break
        t0 = time.time()
        run.wrapped.train()
        batches = _batches(job, epoch, spe * job.cfg.grad_accum, skips)
        loss_sum = torch.zeros((), device=acc.device)
        skipped_before = run.guard.skipped
        for step in range(spe):
            if probe and step == min(PROBE_WARMUP, min(probe, spe) - 1):  # the steps measured start here
                t_probe, probed = time.time(), step
            summed, last = _step(run, batches, epoch, step)
            loss_sum += summed
            if probe and step + 1 >= min(probe, spe):
                steps.close()
                return {"img_s": (step + 1 - probed) * run.images_per_step / max(time.time() - t_probe, 1e-9)}
            _report(run, steps, epoch, step, last, t0)
        skips.check()
        _end_epoch(run, epoch, loss_sum, time.time() - t0, state_root, run.guard.skipped - skipped_before)
    steps.close()
    run.trackers.close()
    return _finish(model, run, skips)


def _report(run: _Run, steps, epoch: int, step: int, last: torch.Tensor, t0: float) -> None:
    """Advance the bar; every 10 steps show loss, img/s and lr on it, every ``log_every`` send them to
    the trackers (the only places the loss leaves the device during an epoch)."""
    job, spe = run.job, run.steps_per_epoch
    done = epoch * spe + step + 1
    tracked = bool(run.trackers.trackers) and done % job.log_every == 0
    if (step + 1) % 10 == 0 or step + 1 == spe or tracked:
        point = {"loss": last.item(), "lr": run.scheduler.get_last_lr()[0],
                 "img_s": (step + 1) * run.images_per_step / max(time.time() - t0, 1e-9)}
        steps.set_postfix(epoch=f"{epoch + 1}/{job.epochs}", loss=f"{point['loss']:.3f}",
                          img_s=f"{point['img_s']:.0f}", lr=f"{point['lr']:.2e}")
        if tracked:
            run.trackers.log({f"{job.phase}/{k}": v for k, v in point.items()}, done)
    steps.update(1)


def _setup(model: torch.nn.Module, job: Job) -> _Run:
    """Accelerator, optimizer, cosine schedule, EMA, precision and batch augmentation for ``job``."""
    accelerator = make_accelerator()
    cfg, device = job.cfg, accelerator.device
    world = accelerator.num_processes
    spe = steps_per_epoch(job, world)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, cfg, job.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(spe * job.epochs, int(cfg.warmup_epochs * spe)))
    # timm's EMA warmup (decay 1 - (1 + t)^-2/3 up to ema_decay): a fixed decay would leave a round
    # of a few thousand steps with a fair share of its starting weights in the EMA
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    precision.compile_model(model, cfg.compile)  # after the EMA's copy: it stays uncompiled
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    # the scheduler's and the EMA's state are saved by us (JSON, safetensors), not registered with
    # Accelerate, whose custom checkpoints are pickles it loads with weights_only=False
    dtype, reason = precision.for_training(cfg.mixed_precision, device, job.run_dir)
    if reason:
        log.info(f"{job.phase}: fp32 instead of bf16: {reason}")
    guard = StepGuard(job.phase, cfg.max_nonfinite_steps, dtype, buffers=list(model.buffers()),
                      main=accelerator.is_main_process)
    return _Run(job=job, accelerator=accelerator, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, ema=ema,
                objective=job.objective or Supervised(cfg.label_smoothing), guard=guard, precision_reason=reason,
                autocast=precision.autocast(dtype, device), scaler=precision.grad_scaler(dtype),
                augment=batch_augment(cfg),  # None: the stream's per-image transform did it
                mean=torch.tensor(job.prep.mean, device=device), std=torch.tensor(job.prep.std, device=device),
                steps_per_epoch=spe, images_per_step=images_per_step(job, world))


def _resume(run: _Run, state_root: Path) -> None:
    """Load the last finished epoch's checkpoint of this phase, if there is one."""
    latest, info = _latest_state(state_root, run.job.phase)
    if latest is None:
        return
    try:
        run.accelerator.load_state(str(latest))
        run.scheduler.load_state_dict(info["scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:  # another version's optimizer groups or model layout
        raise ConfigError(f"{latest} was written by another version of this tool and cannot be resumed "
                          f"({str(e).splitlines()[0][:120]}); start a new experiment name=...") from None
    if run.ema is not None:
        run.ema.module.load_state_dict(load_file(str(latest / EMA_FILE)))
    run.start_epoch, run.elapsed, run.history = info["epoch"] + 1, info["seconds"], list(info.get("history", []))
    if info.get("cut"):  # a deadline cut before the kill: the same epochs and schedule
        run.cut = info["cut"]
        _set_epochs(run, run.cut["epochs"])
    run.guard.resume(info)
    run.autocast = precision.autocast(run.guard.precision, run.accelerator.device)
    log.info(f"resuming {run.job.phase} from {latest.name} (epoch {run.start_epoch}/{run.job.epochs})")


def _batches(job: Job, epoch: int, n: int, skips: SkipLog) -> Iterator[Batch]:
    """The epoch's ``n`` batches: labeled, or labeled + pseudo-labeled (a student's) in one tensor."""
    cfg = job.cfg
    if job.unlabeled is None:
        for x, y in epoch_batches(job.labeled, epoch, n, cfg.batch_size, cfg.workers, skips):
            yield Batch(x, y, len(x))
        return
    lab = endless_batches(job.labeled, epoch, cfg.batch_size, cfg.workers, skips)
    unl = epoch_batches(job.unlabeled, epoch, n, cfg.batch_size * job.unlabeled_ratio, cfg.workers, skips)
    for _ in range(n):  # labeled first: both draw from the global RNG (augmentation), in this order
        xl, yl = next(lab)
        xu, soft = next(unl)
        yield Batch(torch.cat([xl, xu]), yl, len(xl), soft)


def _step(run: _Run, batches: Iterator[Batch], epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``grad_accum`` batches: (summed loss, last batch's loss), detached.

    A non-finite loss or gradient norm skips the update (``guard.py``); the schedule and the data
    move on either way, so a skipped step costs one batch, never the alignment of a resume."""
    acc, cfg = run.accelerator, run.job.cfg
    saved = run.guard.snapshot()
    summed = torch.zeros((), device=acc.device)
    for micro in range(cfg.grad_accum):
        batch = next(batches).to(acc.device)
        x = normalize(run.augment(batch.x) if run.augment is not None else batch.x, run.mean, run.std,
                      cfg.channels_last)
        sync = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.wrapped):
            with run.autocast:
                x = run.objective.inputs(x, batch)
                logits = run.wrapped(x).float()
            loss = run.objective.loss(logits, batch)
            scaled = loss / cfg.grad_accum
            acc.backward(run.scaler.scale(scaled) if run.scaler is not None else scaled)
        summed += loss.detach()
    if failpoints.due("nonfinite_grad"):
        next(p for p in run.wrapped.parameters() if p.grad is not None).grad.fill_(float("nan"))
    norm = _grad_norm(run)
    if run.guard.finite(summed, norm, acc):
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(run.wrapped.parameters(), cfg.clip_grad, norm)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        if run.ema is not None:
            run.ema.update(acc.unwrap_model(run.wrapped), step=epoch * run.steps_per_epoch + step)
        run.guard.passed()
    elif run.guard.skip(saved, summed, norm, epoch, step):  # bf16 -> fp32 for the rest of the phase
        run.autocast = precision.autocast("fp32", acc.device)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    failpoints.hit("train_step")
    return summed, loss.detach()


def _grad_norm(run: _Run) -> torch.Tensor:
    """The gradients' total 2-norm in one fused reduction (unscaled first under fp16)."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grads = [p.grad for p in run.wrapped.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=run.accelerator.device)


def _end_epoch(run: _Run, epoch: int, loss_sum: torch.Tensor, seconds: float, state_root: Path,
               skipped: int) -> None:
    """Record the epoch (``skipped``: its non-finite steps) and checkpoint it (the point a killed run resumes from)."""
    acc, cfg = run.accelerator, run.job.cfg
    epoch_loss = acc.reduce(loss_sum, "mean").item() / (run.steps_per_epoch * cfg.grad_accum)
    run.elapsed += seconds
    _fit_deadline(run, epoch)
    run.history.append({"epoch": epoch, "loss": round(epoch_loss, 5), "lr": run.scheduler.get_last_lr()[0],
                        "seconds": round(seconds, 2),
                        "img_s": round(run.steps_per_epoch * run.images_per_step / seconds, 1),
                        "nonfinite_steps": skipped, "precision": run.guard.precision})
    if acc.is_main_process:  # timm's summary.csv: one row per epoch, rewritten whole (a resume repeats none)
        name = "summary.csv" if run.job.phase == "train" else f"summary-{run.job.phase}.csv"
        write_summary(state_root.parent / name, run.history)
        run.trackers.log({f"{run.job.phase}/epoch_loss": epoch_loss}, (epoch + 1) * run.steps_per_epoch)
    switch = run.guard.switch
    if switch and acc.is_main_process and run.job.run_dir is not None:  # later phases and rounds start in fp32
        precision.record_fallback(run.job.run_dir, f"{state_root.parent.name} {run.job.phase}, epoch "
                                                   f"{switch['epoch'] + 1}, step {switch['step'] + 1}")
    _save(acc, state_root, run.job.phase, epoch, {"epoch": epoch, "seconds": run.elapsed, "history": run.history,
                                                  "scheduler": run.scheduler.state_dict(), "cut": run.cut,
                                                  **run.guard.state()},
          run.ema)
    failpoints.hit("epoch_end")


def _fit_deadline(run: _Run, epoch: int) -> None:
    """End a budgeted phase by ``job.deadline_s``: when the epochs left would pass it at the pace of
    those done (the throughput of a shared machine drifts after the budget's short probe), keep
    fewer and re-fit the cosine schedule to end with them, so the learning rate still decays to
    zero. At least one more epoch is kept: a phase cut mid-schedule would end at a high rate."""
    job, acc = run.job, run.accelerator
    done = epoch + 1
    if job.deadline_s is None or done >= job.epochs:
        return
    elapsed = acc.reduce(torch.tensor(run.elapsed, device=acc.device), "mean").item()  # one verdict on all ranks
    pace = elapsed / done
    fits = int((job.deadline_s - elapsed) // pace)
    if done + fits >= job.epochs:
        return
    keep = max(done + max(1, fits), job.min_epochs)
    if keep >= job.epochs:
        return
    log.info(f"{job.phase}: at {pace:.0f} s an epoch, {job.epochs} epochs would end "
             f"{elapsed + pace * (job.epochs - done) - job.deadline_s:.0f} s past the budget's "
             f"{job.deadline_s:.0f} s: {keep} epochs, the learning rate re-fitted to end with them")
    run.cut = {"after_epoch": epoch, "planned_epochs": (run.cut or {}).get("planned_epochs", job.epochs),
               "epochs": keep}
    _set_epochs(run, keep)


def _set_epochs(run: _Run, epochs: int) -> None:
    run.job.epochs = epochs
    spe = run.steps_per_epoch
    run.scheduler.lr_lambdas = [_cosine(spe * epochs, int(run.job.cfg.warmup_epochs * spe))
                                for _ in run.scheduler.lr_lambdas]


def _finish(model: torch.nn.Module, run: _Run, skips: SkipLog) -> dict:
    """Put the final (or EMA) weights into ``model`` and return the phase's stats, counted over all ranks."""
    acc, job = run.accelerator, run.job
    final = run.ema.module if run.ema is not None else acc.unwrap_model(run.wrapped)
    if final is not model:
        model.load_state_dict(final.state_dict())
    model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    if acc.device.type == "cuda":  # on CPU it is only a full gc.collect (0.2 s)
        acc.free_memory()
    samples = run.steps_per_epoch * run.images_per_step * job.epochs
    bad = skips.metrics()
    counts = acc.reduce(torch.tensor([bad["skipped"], bad["used"]], device=acc.device), "sum").tolist()
    bad.update(skipped=int(counts[0]), used=int(counts[1]),
               skipped_share=round(counts[0] / max(counts[0] + counts[1], 1), 6))
    history = run.history
    return {"phase": job.phase, "epochs": job.epochs, "steps": run.steps_per_epoch * job.epochs,
            "seconds": round(run.elapsed, 1), "deadline_cut": run.cut, **run.guard.state(),
            "precision_reason": run.precision_reason,
            "compile": precision.compile_backend(job.cfg.compile),
            "img_s": round(samples / max(run.elapsed, 1e-9), 1), "history": history,
            "final_loss": history[-1]["loss"] if history else None, "bad_samples": bad}


def _scalars(job: Job) -> dict:
    """The phase's settings as the flat scalars trackers store (TensorBoard's hparams take no lists)."""
    flat = flatten(to_dict(job.cfg))
    return {"phase": job.phase, "epochs": job.epochs, **{k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                          for k, v in flat.items()}}


EMA_FILE = "ema.safetensors"


def _save(accelerator, state_root: Path, phase: str, epoch: int, progress: dict, ema=None) -> None:
    """save_state into a temporary directory, then rename: a state dir that exists is complete."""
    final = state_root / f"{phase}-e{epoch:04d}"
    tmp = state_root / f"{TMP_PREFIX}{phase}-e{epoch:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        state_root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except RuntimeError:  # torch reports a full disk as "[enforce fail ...] file write failed"
        shutil.rmtree(tmp, ignore_errors=True)
        if shutil.disk_usage(state_root).free < 1 << 28:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / EMA_FILE))
        write_json_atomic(tmp / "progress.json", progress)
        failpoints.hit("checkpoint_write", tmp)
        tmp.rename(final)
        for old in state_root.glob(f"{phase}-e*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
