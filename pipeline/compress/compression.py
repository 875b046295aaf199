"""What compression costs and keeps: size, MACs, CPU speed and accuracy of teacher vs distilled student.

Speeds are measured in one process with the same thread count, alternating teacher and student
several times and keeping medians, so machine noise hits both sides alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from pipeline.artifacts import read_json, write_bytes_atomic, write_json_atomic
from pipeline.config import Config
from pipeline.evaluate import evaluation
from pipeline.modeling import models
from pipeline.runtime import make_accelerator


@torch.inference_mode()
def _latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def _img_s(model: torch.nn.Module, x: torch.Tensor, batches: int) -> float:
    t0 = time.perf_counter()
    for _ in range(batches):
        model(x)
    return len(x) * batches / (time.perf_counter() - t0)


def speeds(model_dirs: list[Path], repeats: int = 3, runs: int = 30, batches: int = 8) -> list[dict]:
    """CPU latency at batch 1 (ms) and img/s at batch 64 for each model, medians of alternating repeats."""
    loaded = []
    for d in model_dirs:
        m, conf = models.load_model_dir(d)
        prep = models.preprocessing(conf)
        c = prep.in_chans
        g = torch.Generator().manual_seed(0)
        x1 = torch.randn(1, c, prep.size, prep.size, generator=g)
        x64 = torch.randn(64, c, prep.size, prep.size, generator=g)
        _latency_ms(m, x1, 3), _img_s(m, x64, 1)  # warm-up
        loaded.append((m, x1, x64))
    lat: list[list[float]] = [[] for _ in loaded]
    thr: list[list[float]] = [[] for _ in loaded]
    for _ in range(repeats):
        for i, (m, x1, x64) in enumerate(loaded):
            lat[i].append(_latency_ms(m, x1, runs))
            thr[i].append(_img_s(m, x64, batches))
    return [{"latency_ms_b1": round(statistics.median(a), 3), "img_s_b64": round(statistics.median(b), 1),
             "threads": torch.get_num_threads()} for a, b in zip(lat, thr, strict=True)]


def _describe(d: Path, card: dict, speed: dict) -> dict:
    m, conf = models.load_model_dir(d)
    prep = models.preprocessing(conf)
    name = conf.get("architecture", card.get("arch"))
    channels = conf.get("model_args", {}).get("channels")
    if channels:
        name += f" (channels {'/'.join(map(str, channels))})"
    return {"model": name, "dir": str(d), "params": models.num_params(m),
            "macs": evaluation.macs(m, prep.in_chans, prep.size),
            "file_bytes": (d / models.WEIGHTS).stat().st_size, "test_top1": card["metrics"]["test_top1"], **speed}


def compression_report(cfg: Config, results: dict) -> dict:
    """``compression.json`` and ``compression.md`` beside the distilled student (main process only)."""

    if not make_accelerator().is_main_process:
        return {}
    teacher_dir = Path(results["teacher_dir"])
    student_dir = cfg.run_dir / "distilled" / cfg.distill.name
    teacher_card = models_card(teacher_dir)
    sp = speeds([teacher_dir, student_dir])
    teacher = _describe(teacher_dir, teacher_card, sp[0])
    student = _describe(student_dir, results["student"], sp[1])
    labels_only = results.get("labels_only", {}).get("metrics", {}).get("test_top1")
    report = {"teacher": teacher, "student": student, "labels_only_top1": labels_only,
              "retained": round(100 * student["test_top1"] / teacher["test_top1"], 2),
              "params_ratio": round(student["params"] / teacher["params"], 4),
              "mode": cfg.distill.mode, "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
              "epochs": cfg.distill.epochs}
    write_json_atomic(student_dir / "compression.json", report)
    rows = [("teacher", teacher), ("student", student)]
    md = [f"## Compression: {teacher['model']} → {student['model']} ({cfg.distill.mode} KD, "
          f"T={cfg.distill.temperature:g}, alpha={cfg.distill.alpha:g})", "",
          "| model | arch | params | MACs | file (MB) | latency b1 (ms) | img/s b64 | test top-1 (%) |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {n} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | {r['file_bytes'] / 2**20:.2f} | "
           f"{r['latency_ms_b1']:.2f} | {r['img_s_b64']:.0f} | {r['test_top1']:.2f} |" for n, r in rows]
    md += ["", f"Top-1 retained (student / teacher): **{report['retained']:.2f} %** with "
           f"{100 * report['params_ratio']:.1f} % of the parameters."]
    if labels_only is not None:
        md.append(f"The same student architecture trained on the labeled images alone with the same budget: "
                  f"{labels_only:.2f} % (distillation: {student['test_top1'] - labels_only:+.2f} points).")
    md.append(f"Speeds: CPU, {sp[0]['threads']} threads, medians of alternating repeats in one process.")
    report["path"] = str(student_dir / "compression.md")
    write_bytes_atomic(student_dir / "compression.md", ("\n".join(md) + "\n").encode())
    return report


def models_card(d: Path) -> dict:
    p = d / models.CARD
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the teacher has no card.json (not made by this pipeline)")
    return read_json(p)
