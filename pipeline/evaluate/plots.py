"""The report's figures, one function a figure, each written atomically as a PNG.

matplotlib runs headless (Agg); every figure is closed after saving so a long report does not
hold them all in memory.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.artifacts import atomic_path  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return path


def accuracy_per_round(path: Path, labels: list[str], top1: list[float], reference: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(labels)), 3.8))
    x = np.arange(len(labels))
    rounds = [i for i, label in enumerate(labels) if label.startswith("round ")]
    others = [i for i in range(len(labels)) if i not in rounds]
    ax.plot(x[rounds], [top1[i] for i in rounds], marker="o", label="self-training rounds")
    if others:  # distilled or other models: points, not a trend
        ax.plot(x[others], [top1[i] for i in others], "s", color="tab:red", label="other models")
    for xi, v in zip(x, top1, strict=True):
        ax.annotate(f"{v:.2f}", (xi, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=1, label="round-0 teacher")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(x, [label.replace(" ", "\n", 1) for label in labels], fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Test accuracy per model")
    ax.grid(alpha=0.3)
    lo, hi = min(top1), max(top1)
    ax.set_ylim(lo - max(1.0, 0.15 * (hi - lo)), hi + max(1.0, 0.2 * (hi - lo)))
    return _save(fig, path)


def corruption_errors(path: Path, labels: list[str], errors: list[dict[str, list[float]]],
                      clean_errors: list[float]) -> Path:
    """Grouped bars: mean error over severities per corruption, one bar per model."""
    names = list(errors[0])
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(labels)
    x = np.arange(len(names) + 1)
    for i, (label, err, ce) in enumerate(zip(labels, errors, clean_errors, strict=True)):
        vals = [ce] + [float(np.mean(err[n])) for n in names]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x, ["clean"] + [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylabel("top-1 error (%), mean of 5 severities")
    ax.set_title("Corruption error by type")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def reliability_diagrams(path: Path, labels: list[str], diagrams: list[dict], eces: list[float]) -> Path:
    n = len(labels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, label, rel, ece in zip(axes[0], labels, diagrams, eces, strict=True):
        edges = np.asarray(rel["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        acc = np.array([np.nan if a is None else a for a in rel["accuracy"]], dtype=float)
        ax.bar(centers, acc, width=edges[1] - edges[0], edgecolor="k", lw=0.5, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", lw=1, label="perfect")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{label}\nECE {ece:.4f}", fontsize=9)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def confidence_histograms(path: Path, rounds: list[int], healths: list[dict]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k, h in zip(rounds, healths, strict=True):
        edges = np.linspace(0, 1, h["bins"] + 1)
        for ax, key in zip(axes, ("confidence_hist", "entropy_hist"), strict=True):
            share = np.asarray(h[key]) / max(h["samples"], 1)
            ax.stairs(share, edges, label=f"round {k} (labels by round {k - 1})")
    axes[0].axvline(healths[-1]["threshold"], color="gray", ls="--", lw=1, label="threshold")
    axes[0].set_xlabel("teacher confidence (max probability)")
    axes[1].set_xlabel("normalised entropy")
    for ax in axes:
        ax.set_ylabel("share of pool")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Pseudo-label confidence and entropy")
    return _save(fig, path)


def accuracy_vs_threshold(path: Path, rounds: list[int], healths: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax2 = ax.twinx()
    for k, h in zip(rounds, healths, strict=True):
        rows = [r for r in h["accuracy_at_threshold"] if r["accuracy"] is not None]
        line = ax.plot([r["threshold"] for r in rows], [r["accuracy"] for r in rows], marker=".",
                       label=f"round {k}: accuracy")[0]
        ax2.plot([r["threshold"] for r in rows], [100 * r["kept_share"] for r in rows], ls=":",
                 color=line.get_color(), label=f"round {k}: kept")
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("pseudo-label accuracy of kept (%)")
    ax2.set_ylabel("share of pool kept (%) (dotted)")
    ax.set_title("Pseudo-label accuracy vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def audit_grid(path: Path, kept: list[list[np.ndarray]], rejected: list[list[np.ndarray]], names: list[str],
               threshold: float, k: int) -> Path:
    """Rows are pseudo-label classes; kept images on the left, rejected ones on the right."""
    per = max([len(v) for v in kept + rejected] + [1])
    sample = next((im for v in kept + rejected for im in v), np.zeros((8, 8), np.uint8))
    h, w = sample.shape[:2]
    gray = sample.ndim == 2
    pad = 2
    gap = w // 2 + pad
    cols_w = 2 * per * (w + pad) + gap
    canvas = np.full((len(names) * (h + pad), cols_w) + (() if gray else (3,)), 255, np.uint8)
    for c in range(len(names)):
        for side, images in enumerate((kept[c], rejected[c])):
            for i, im in enumerate(images):
                y = c * (h + pad)
                x = side * (per * (w + pad) + gap) + i * (w + pad)
                canvas[y:y + h, x:x + w] = im[:h, :w]
    fig_w = min(2 + cols_w / 18, 16)
    fig, ax = plt.subplots(figsize=(fig_w, 1 + len(names) * (h + pad) / 18 * fig_w / (2 + cols_w / 18)))
    ax.imshow(canvas, cmap="gray" if gray else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([c * (h + pad) + h / 2 for c in range(len(names))], names, fontsize=8)
    none = " — none" if not any(rejected) else ""
    ax.set_xticks([per * (w + pad) / 2, per * (w + pad) + gap + per * (w + pad) / 2],
                  [f"kept (confidence ≥ {threshold:g})", f"rejected (< {threshold:g}){none}"], fontsize=9)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(f"Round {k} pseudo labels: random samples per class, for audit", fontsize=10)
    return _save(fig, path)
