"""The one training loop (teacher, student, fine-tune): Accelerate, resumable per epoch.

Each step takes a labeled batch and, for a student, an unlabeled batch ``unlabeled_ratio`` times
larger; both go through one forward pass. Loss = CE(labeled, label smoothing)
+ unlabeled_weight x soft CE(pseudo-labeled). After every epoch ``accelerator.save_state`` writes
``state/<phase>-eNNNN`` (to a temporary name, then renamed), so a killed run resumes at the last
finished epoch with the same data order (the order is a function of seed and epoch).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import failpoints, precision
from .artifacts import TMP_PREFIX, read_json, write_json_atomic
from .bad_samples import SkipLog
from .config import TrainConfig
from .loaders import StreamSpec, endless_batches, epoch_batches
from .losses import soft_cross_entropy
from .runtime import make_accelerator
from .transforms import batch_augment, normalize


@dataclass
class Job:
    """What one training phase needs besides the model."""

    phase: str  # "train" or "finetune": names the checkpoints
    cfg: TrainConfig
    epochs: int
    lr: float
    labeled: StreamSpec
    labeled_total: int
    prep: dict  # mode, size, mean, std
    unlabeled: StreamSpec | None = None
    unlabeled_total: int = 0
    unlabeled_ratio: int = 0
    unlabeled_weight: float = 1.0
    # a loss of its own (distillation): ``prepare(x, target) -> (x, target)`` before the forward pass
    # (a teacher sees the same batch there), then ``criterion(logits, target) -> loss``
    criterion: object | None = None
    max_bad_share: float = 0.01  # data.max_bad_share: skipped share of samples that stops the run


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def _cosine(total: int, warmup: int):
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


def train(model: torch.nn.Module, job: Job, state_root: Path, progress: bool = True, probe: int = 0) -> dict:
    """Run ``job`` on ``model`` (resuming from ``state_root`` if a checkpoint exists); returns stats.

    On return the unwrapped ``model`` holds the final weights (the EMA weights when enabled).
    A fresh Accelerator per phase keeps its checkpoint contents to this phase's objects.
    ``probe``: run only that many steps of the first epoch, save and resume nothing, and return
    ``{"img_s": ...}`` measured after the first ``PROBE_WARMUP`` steps (the budget's rate; pass a copy
    of the model, since it is trained).
    """
    from timm.utils import ModelEmaV3

    accelerator = make_accelerator()

    cfg, device = job.cfg, accelerator.device
    world = accelerator.num_processes
    spe = steps_per_epoch(job, world)
    total = spe * job.epochs
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, cfg, job.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total, int(cfg.warmup_epochs * spe)))
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    precision.compile_model(model, cfg.compile)  # after the EMA's copy: it stays uncompiled
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    # the scheduler's and the EMA's state are saved by us (JSON, safetensors), not registered with
    # Accelerate, whose custom checkpoints are pickles it loads with weights_only=False
    dtype = precision.resolve(cfg.mixed_precision, device)
    autocast, scaler = precision.autocast(dtype, device), precision.grad_scaler(dtype)
    augment = batch_augment(cfg)  # None: the stream's per-image transform did it
    mean = torch.tensor(job.prep["mean"], device=device)
    std = torch.tensor(job.prep["std"], device=device)

    start_epoch, elapsed = 0, 0.0
    latest, info = _latest_state(state_root, job.phase) if not probe else (None, {})
    if latest is not None:
        accelerator.load_state(str(latest))
        scheduler.load_state_dict(info["scheduler"])
        if ema is not None:
            from safetensors.torch import load_file

            ema.module.load_state_dict(load_file(str(latest / EMA_FILE)))
        start_epoch, elapsed = info["epoch"] + 1, info["seconds"]
        accelerator.print(f"resuming {job.phase} from {latest.name} (epoch {start_epoch}/{job.epochs})")

    bs_l = cfg.batch_size
    bs_u = bs_l * job.unlabeled_ratio if job.unlabeled is not None else 0
    per_step = images_per_step(job, world)
    bar = tqdm(total=total, initial=start_epoch * spe, desc=f"{job.phase}", unit="step",
               disable=not (progress and accelerator.is_main_process), smoothing=0.05)
    history = list(info.get("history", []))
    skips = SkipLog(job.phase + (f" (rank {accelerator.process_index})" if world > 1 else ""), job.max_bad_share,
                    quiet=not accelerator.is_main_process and world > 1)
    for epoch in range(start_epoch, job.epochs):
        t0 = time.time()
        wrapped.train()
        n_micro = spe * cfg.grad_accum
        if job.unlabeled is not None:
            lab = endless_batches(job.labeled, epoch, bs_l, cfg.workers, skips)
            unl = epoch_batches(job.unlabeled, epoch, n_micro, bs_u, cfg.workers, skips)
        else:
            lab = epoch_batches(job.labeled, epoch, n_micro, bs_l, cfg.workers, skips)
            unl = None
        loss_sum = torch.zeros((), device=device)
        for step in range(spe):
            if probe and step == min(PROBE_WARMUP, min(probe, spe) - 1):  # the steps measured start here
                t_probe, probed = time.time(), step
            for micro in range(cfg.grad_accum):
                xl, yl = next(lab)
                x, n_l = xl, len(xl)
                if unl is not None:
                    xu, tu = next(unl)
                    x = torch.cat([xl, xu])
                x = x.to(device, non_blocking=True)
                x = normalize(augment(x) if augment is not None else x, mean, std, cfg.channels_last)
                sync = micro == cfg.grad_accum - 1
                ctx = contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)
                with ctx:
                    if job.criterion is not None:
                        yl = _to(yl, device)
                        with autocast:
                            x, yl = job.criterion.prepare(x, yl)
                    with autocast:
                        logits = wrapped(x).float()
                    if job.criterion is not None:
                        loss = job.criterion(logits, yl)
                    else:
                        loss = F.cross_entropy(logits[:n_l], yl.to(device), label_smoothing=cfg.label_smoothing)
                    if unl is not None:
                        loss = loss + job.unlabeled_weight * soft_cross_entropy(logits[n_l:], tu.to(device))
                    scaled = loss / cfg.grad_accum
                    if scaler is not None:
                        scaled = scaler.scale(scaled)
                    accelerator.backward(scaled)
                loss_sum += loss.detach()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(wrapped), step=epoch * spe + step)
            failpoints.hit("train_step")
            if probe and step + 1 >= min(probe, spe):
                bar.close()
                return {"img_s": (step + 1 - probed) * per_step / max(time.time() - t_probe, 1e-9)}
            if (step + 1) % 10 == 0 or step + 1 == spe:
                rate = (step + 1) * per_step / max(time.time() - t0, 1e-9)
                bar.set_postfix(epoch=f"{epoch + 1}/{job.epochs}", loss=f"{loss.item():.3f}",
                                img_s=f"{rate:.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
        skips.check()
        epoch_loss = accelerator.reduce(loss_sum, "mean").item() / (spe * cfg.grad_accum)
        dt = time.time() - t0
        elapsed += dt
        history.append({"epoch": epoch, "loss": round(epoch_loss, 5), "seconds": round(dt, 2),
                        "img_s": round(spe * per_step / dt, 1)})
        _save(accelerator, state_root, job.phase, epoch, {"epoch": epoch, "seconds": elapsed, "history": history,
                                                          "scheduler": scheduler.state_dict()}, ema)
        failpoints.hit("epoch_end")
    bar.close()
    final = ema.module if ema is not None else accelerator.unwrap_model(wrapped)
    if final is not model:
        model.load_state_dict(final.state_dict())
    model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    if device.type == "cuda":  # on CPU it is only a full gc.collect (0.2 s)
        accelerator.free_memory()
    samples = spe * per_step * job.epochs
    bad = skips.metrics()
    counts = accelerator.reduce(torch.tensor([bad["skipped"], bad["used"]], device=device), "sum").tolist()
    bad.update(skipped=int(counts[0]), used=int(counts[1]),
               skipped_share=round(counts[0] / max(counts[0] + counts[1], 1), 6))
    return {"phase": job.phase, "epochs": job.epochs, "steps": total, "seconds": round(elapsed, 1),
            "precision": dtype, "compile": precision.compile_backend(cfg.compile),
            "img_s": round(samples / max(elapsed, 1e-9), 1), "history": history,
            "final_loss": history[-1]["loss"] if history else None, "bad_samples": bad}


def _to(target, device):
    if isinstance(target, (list, tuple)):
        return type(target)(_to(t, device) for t in target)
    return target.to(device, non_blocking=True)


EMA_FILE = "ema.safetensors"


def _save(accelerator, state_root: Path, phase: str, epoch: int, progress: dict, ema=None) -> None:
    """save_state into a temporary directory, then rename: a state dir that exists is complete."""
    final = state_root / f"{phase}-e{epoch:04d}"
    tmp = state_root / f"{TMP_PREFIX}{phase}-e{epoch:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        state_root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / EMA_FILE))
        write_json_atomic(tmp / "progress.json", progress)
        failpoints.hit("checkpoint_write")
        tmp.rename(final)
        for old in state_root.glob(f"{phase}-e*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
