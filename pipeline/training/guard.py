"""The training loop's guard against non-finite steps.

A step whose loss or gradient norm is NaN or inf changes nothing: the loop takes no optimizer or
EMA step, and the buffers its forward pass moved (BatchNorm running statistics) are put back.
The step is counted and logged. In bf16 the first such step switches the rest of the phase to
fp32 (oneDNN's bf16 kernels on some CPUs return NaN gradients); in fp32, ``max_nonfinite_steps``
in a row stop the phase with a ``NumericError``, and a rerun resumes from the last epoch
checkpoint, whose weights no skipped step touched. fp16 keeps GradScaler's own skipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline.errors import NumericError
from pipeline.tracking import log


@dataclass
class StepGuard:
    """One phase's verdicts on its steps, and the precision they leave it in (saved with each checkpoint)."""

    phase: str
    limit: int  # max_nonfinite_steps: non-finite steps in a row that stop an fp32 phase
    precision: str  # what the next step runs in
    buffers: list[torch.Tensor] = field(default_factory=list)  # restored after a skipped step
    steps: dict[str, int] = field(default_factory=dict)  # optimizer steps run per precision
    skipped: int = 0
    in_a_row: int = 0
    switch: dict | None = None  # the bf16 -> fp32 switch: where and why
    main: bool = True  # logs its verdicts (the main process; every rank reaches the same ones)

    def snapshot(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.buffers]

    def finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, accelerator) -> bool:
        """Whether the step may update the model; every rank gets the same answer."""
        if self.precision == "fp16":
            return True  # GradScaler skips its own overflowing steps
        bad = (~torch.isfinite(torch.stack([loss.float(), grad_norm.float()]))).any().float()
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, "sum")
        return not bool(bad)

    def passed(self) -> None:
        self.steps[self.precision] = self.steps.get(self.precision, 0) + 1
        self.in_a_row = 0

    def skip(self, saved: list[torch.Tensor], loss: torch.Tensor, grad_norm: torch.Tensor, epoch: int,
             step: int) -> bool:
        """Undo the skipped step's buffer changes and count it; True when the phase switches to fp32.

        Raises ``NumericError`` when fp32 has had ``limit`` non-finite steps in a row."""
        for b, s in zip(self.buffers, saved, strict=True):
            b.copy_(s)
        ran = self.precision
        self.steps[ran] = self.steps.get(ran, 0) + 1
        self.skipped += 1
        self.in_a_row += 1
        where = f"{self.phase} epoch {epoch + 1}, step {step + 1}"
        values = f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
        if math.isfinite(loss.item()) and math.isfinite(grad_norm.item()):
            values += "; not finite on another rank"
        if ran == "bf16":
            self.precision, self.in_a_row = "fp32", 0
            self.switch = {"from": "bf16", "to": "fp32", "epoch": epoch, "step": step,
                           "reason": f"non-finite step in bf16 ({values})"}
            if self.main:
                log.warning(f"warning: {where}: non-finite step in bf16 ({values}) skipped; "
                            "the rest of the phase runs in fp32")
            return True
        if self.main:
            log.warning(f"warning: {where}: non-finite step in {ran} ({values}) skipped "
                        f"({self.in_a_row} in a row, {self.limit} stop the phase)")
        if self.in_a_row >= self.limit:
            raise NumericError(
                f"{where}: {self.in_a_row} non-finite steps in a row in {ran} ({values}); likely a learning "
                "rate too high for this model, no clip_grad, or inputs that overflow: lower lr or set clip_grad; "
                "a rerun resumes from the last epoch checkpoint")
        return False

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed phase goes on in the same precision."""
        return {"precision": self.precision, "precision_steps": dict(self.steps), "nonfinite_steps": self.skipped,
                "precision_switch": self.switch}

    def resume(self, state: dict) -> None:
        """Take up a checkpoint's counts; a phase that had switched to fp32 stays there. A checkpoint
        written before the guard existed has none of it."""
        if "precision_steps" not in state:
            return
        self.steps, self.skipped = dict(state["precision_steps"]), int(state["nonfinite_steps"])
        self.switch = state.get("precision_switch")
        if self.switch:
            self.precision = "fp32"
