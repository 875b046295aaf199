"""Training objectives: what a batch's logits are scored against. The one training loop
(``trainer.train``) calls an objective and knows nothing about teachers, students or pseudo labels.

A batch is ``Batch(x, labels, n_labeled, soft)``: the labeled images first, then (for a Noisy
Student) the pseudo-labeled ones with their target probabilities. An objective has two calls:
``inputs(x, batch)`` under autocast before the forward pass (where online distillation lets its
teacher see the exact augmented batch, and mixes it), and ``loss(logits, batch)``.

    supervised      CE(labeled, label smoothing)                                   teacher, fine-tune
    noisy student   CE(labeled) + w * CE(pseudo-labeled, soft targets)             students
                    (optionally on mixup: labeled mixed with labeled, pseudo-labeled with pseudo-labeled)
    online KD       alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * CE      distill.mode=online
    offline KD      the same against the teacher's cached probabilities            distill.mode=offline
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device


@dataclass
class Batch:
    """One step's data: ``x[:n_labeled]`` are labeled (``labels``), the rest carry ``soft`` targets."""

    x: torch.Tensor
    labels: Any  # class ids, or what the objective reads (distillation: (probs, labels) or labels with -1)
    n_labeled: int
    soft: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(send_to_device(self.x, device, non_blocking=True),
                     send_to_device(self.labels, device, non_blocking=True), self.n_labeled,
                     None if self.soft is None else send_to_device(self.soft, device, non_blocking=True))


class Objective:
    """The loss of a batch. Subclasses override ``loss`` (and ``inputs`` to see or change the batch)."""

    def inputs(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return x

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


class Supervised(Objective):
    """Cross-entropy with label smoothing on the labeled images (a teacher, a fine-tune)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits[:batch.n_labeled], batch.labels, label_smoothing=self.label_smoothing)


class NoisyStudent(Supervised):
    """Supervised loss on the labeled images plus ``weight`` x cross-entropy against the teacher's
    (selected, possibly sharpened) probabilities on the pseudo-labeled ones (Xie et al., eq. 2).
    The noise (augmentation, dropout, stochastic depth) is the data's and the model's; ``mixup``
    (Beta(a, a)) adds one more, mixing each group within itself so each keeps its own weight."""

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0, mixup: float = 0.0):
        super().__init__(label_smoothing)
        self.weight, self.mixup = weight, mixup
        self.lam, self.perm = 1.0, None

    def inputs(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.lam, self.perm = 1.0, None
        if self.mixup > 0:
            self.lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            n = batch.n_labeled
            self.perm = torch.cat([torch.randperm(n, device=x.device),
                                   n + torch.randperm(len(x) - n, device=x.device)])
            x = self.lam * x + (1 - self.lam) * x[self.perm]
        return x

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        n, soft = batch.n_labeled, batch.soft
        labeled = super().loss(logits, batch)
        if self.perm is not None:
            other = F.cross_entropy(logits[:n], batch.labels[self.perm[:n]], label_smoothing=self.label_smoothing)
            labeled = self.lam * labeled + (1 - self.lam) * other
            soft = self.lam * soft + (1 - self.lam) * soft[self.perm[n:] - n]
        return labeled + self.weight * soft_cross_entropy(logits[n:], soft)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c targets_c * log_softmax(logits)_c (targets rows sum to 1):
    ``F.cross_entropy`` with probability targets."""
    return F.cross_entropy(logits.float(), targets)
