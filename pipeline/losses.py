"""Losses: cross-entropy against soft targets (pseudo labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c targets_c * log_softmax(logits)_c (targets rows sum to 1)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
