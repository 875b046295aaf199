"""No non-finite model leaves a stage: weights are checked when saved and when loaded, and a model's
outputs before anything made from them (pseudo labels, distillation targets, predictions, scores)
is written. Each refusal is one line naming the model."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import NumericError


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or inf, else None."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_weights(state: dict[str, torch.Tensor], where: str, doing: str) -> None:
    """Refuse (``doing``: "save" or "load") weights with NaN or inf, naming the first such tensor."""
    name = first_nonfinite(state)
    if name is not None:
        raise NumericError(f"{where}: refusing to {doing} weights that are not finite (NaN or inf in {name}); "
                           "train again under a new name=... (lower lr, set clip_grad, or mixed_precision=no)")


def check_outputs(values: torch.Tensor | np.ndarray, model: str, what: str = "outputs") -> None:
    """Refuse a batch of a model's ``what`` (logits or probabilities) that holds NaN or inf."""
    ok = np.isfinite(values) if isinstance(values, np.ndarray) else torch.isfinite(values)
    rows = ~ok.all(1)
    if bool(rows.any()):
        raise NumericError(f"model {model}: {what} are not finite for {int(rows.sum())} of {len(rows)} images "
                           "(its weights overflow); nothing was written from them")
