"""Clean-set metrics beyond top-1: calibration (ECE, reliability diagram, NLL), top-k accuracy and the
confusion matrix. Noisy Student reports that self-training with soft pseudo labels changes how confident
a student is, so a run card needs more than accuracy to show it. Pure tensor math on CPU, no I/O.

Inputs: ``probs`` is an (N, K) tensor of class probabilities (rows summing to 1, e.g. a softmax) and
``labels`` an (N,) integer tensor of true classes. Sums are accumulated in float64.

Confidence binning (``ece`` and ``reliability``): ``bins`` equal-width bins over (0, 1], bin ``b`` holding
confidences in ``(b / bins, (b + 1) / bins]``. A confidence ``c`` goes to bin
``min(ceil(c * bins) - 1, bins - 1)`` clamped to ``>= 0``, so a confidence exactly on an edge belongs to
the bin below it, ``c == 1.0`` goes to the last bin and ``c == 0`` to the first. Edges are compared in
the dtype of ``probs`` (a float32 ``0.2`` is on the float32 edge ``0.2``).
"""

from __future__ import annotations

import torch
from timm.utils import accuracy


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, K), got shape {tuple(probs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels must be (N,) with N={probs.shape[0]}, got shape {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("no samples: probs and labels are empty")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _bin_stats(probs: torch.Tensor, labels: torch.Tensor, bins: int):
    """Per-bin sample count, sum of correctness and sum of confidence (float64), and the edges."""
    _check(probs, labels)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    probs = probs.detach()
    if not probs.is_floating_point():
        probs = probs.double()
    conf, pred = probs.max(dim=1)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    # bucketize(right=False) returns i with edges[i-1] < c <= edges[i]: the (lo, hi] convention.
    idx = torch.bucketize(conf, edges.to(probs.dtype)[1:-1].contiguous(), right=False)
    idx = idx.clamp(0, bins - 1)
    correct = (pred == labels.to(pred.device)).double()
    count = torch.bincount(idx, minlength=bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=bins)
    conf_sum = torch.bincount(idx, weights=conf.double(), minlength=bins)
    return count, acc_sum, conf_sum, edges


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error as a fraction: ``sum_b (n_b / N) * |acc_b - conf_b|`` over the confidence
    bins described in the module docstring; empty bins contribute 0. 0 means confidence matches accuracy."""
    count, acc_sum, conf_sum, _ = _bin_stats(probs, labels, bins)
    # (n_b / N) * |acc_b - conf_b| == |sum correct - sum conf| / N, which needs no division by n_b.
    return float((acc_sum - conf_sum).abs().sum() / count.sum())


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """The data of a reliability diagram, JSON-ready: ``edges`` (bins + 1 floats), per bin ``count`` (int),
    ``accuracy`` and mean ``confidence`` (fractions; ``None`` for an empty bin). Same bins as ``ece``."""
    count, acc_sum, conf_sum, edges = _bin_stats(probs, labels, bins)
    counts = [int(n) for n in count]
    return {"edges": [float(e) for e in edges],
            "count": counts,
            "accuracy": [float(a) / n if n else None for a, n in zip(acc_sum.tolist(), counts, strict=True)],
            "confidence": [float(c) / n if n else None for c, n in zip(conf_sum.tolist(), counts, strict=True)]}


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class, ``mean(-log p_true)``; ``p_true`` is clamped to
    ``eps`` so a confidently wrong zero probability gives a large finite value instead of inf."""
    _check(probs, labels)
    p_true = probs.detach().double().gather(1, labels.long().view(-1, 1)).squeeze(1)
    return float(-p_true.clamp_min(eps).log().mean())


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of samples whose true class is among the ``k`` highest scores (ties broken by ``torch.topk``).
    Works on logits as well as probabilities, since only the ranking matters."""
    _check(probs, labels)
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k must lie in [1, {probs.shape[1]}] (the number of classes), got {k}")
    return float(accuracy(probs.detach(), labels.long(), topk=(k,))[0])


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, row = true class, column = predicted class, so row sums
    are the class supports and the diagonal the correct predictions."""
    if preds.dim() != 1 or labels.dim() != 1 or preds.shape != labels.shape:
        raise ValueError(f"preds and labels must be (N,) of equal length, got {tuple(preds.shape)} "
                         f"and {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    preds, labels = preds.long().cpu(), labels.long().cpu()
    for name, t in (("preds", preds), ("labels", labels)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")
    flat = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).to(torch.int64)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Percent correct per true class (diagonal over row sum); ``None`` for a class with no samples, so the
    list holds no NaN and stays JSON-serialisable."""
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got shape {tuple(confusion.shape)}")
    support = confusion.sum(dim=1).tolist()
    diag = confusion.diagonal().tolist()
    return [100.0 * float(d) / float(s) if s else None for d, s in zip(diag, support, strict=True)]
