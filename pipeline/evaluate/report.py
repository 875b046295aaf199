"""The evaluate stage over an experiment (or any model directories) and its report.

``evaluate_models`` measures every model (cached per model in its ``eval/`` directory);
``write_report`` turns the results into ``report.md``, a self-contained ``report.html`` (images
inlined) and ``plots/*.png``. mCE and mFR are normalised by a reference model's errors, the
round-0 teacher by default, evaluated on the same images with the same seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import (
    TMP_PREFIX,
    clean_tmp,
    clean_tmp_of,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from pipeline.config import Config, ConfigError, to_dict
from pipeline.data import limits
from pipeline.data.dataset import PreparedData
from pipeline.data.prepare import prepare_test
from pipeline.evaluate import evaluation, health, plots, robustness
from pipeline.evaluate.document import Document, fmt, human
from pipeline.modeling import models
from pipeline.runtime import make_accelerator
from pipeline.training.experiment import card, pseudo_label_dir, round_dir


@dataclass
class Entry:
    """One evaluated model and everything measured about it."""

    label: str
    directory: Path
    round: int | None = None
    arch: str = ""
    params: int = 0
    macs: int = 0
    card: dict | None = None
    clean: dict = field(default_factory=dict)
    corruptions: dict | None = None
    perturbations: dict | None = None
    health: dict | None = None
    mce: float | None = None
    relative_mce: float | None = None
    mfr: float | None = None
    left_out: list[str] = field(default_factory=list)  # kinds the reference never errs on: not normalisable


def experiment_models(cfg: Config) -> list[tuple[str, Path, int | None]]:
    """Finished rounds 0, 1, ... in order, then distilled models (``distilled/<name>``)."""
    found = []
    k = 0
    while card(round_dir(cfg, k)) is not None:
        found.append((f"round {k}", round_dir(cfg, k), k))
        k += 1
    distilled = cfg.run_dir / "distilled"
    if distilled.is_dir():
        for d in sorted(p for p in distilled.iterdir() if card(p) is not None):
            found.append((f"distilled {d.name}", d, None))
    if not found:
        raise ConfigError(f"no finished model in experiment '{cfg.name}' ({cfg.run_dir}): run make iterate first")
    return found


def evaluate_models(cfg: Config, targets: list[tuple[str, Path, int | None]], test: evaluation.TestSet,
                    robust: bool, accelerator) -> list[Entry]:
    """Clean metrics for every model; corruptions, perturbations and mCE/mFR when ``robust``."""
    ecfg = cfg.evaluate
    entries = []
    reference: Entry | None = None
    ref_dir = Path(ecfg.reference) if ecfg.reference else (round_dir(cfg, 0) if card(round_dir(cfg, 0)) else None)
    for label, directory, k in targets:
        m = evaluation.load(directory)
        cfg_json = read_json(directory / models.TIMM_CONFIG)
        e = Entry(label, directory, k, arch=(m.card or {}).get("arch") or cfg_json.get("architecture", ""), params=models.num_params(m.model),
                  macs=evaluation.macs(m.model, m.model.default_cfg["input_size"][0], m.prep.size), card=m.card)
        e.clean = evaluation.clean(m, test, ecfg, accelerator, cfg.progress, cfg.data.max_bad_share)
        if robust:
            subset = evaluation.load_subset(test, m.prep, ecfg.subset, ecfg.seed)
            e.corruptions = evaluation.corruption(m, test, ecfg, accelerator, cfg.progress, subset)
            e.perturbations = evaluation.perturbation(m, test, ecfg, accelerator, cfg.progress, subset)
        if k is not None and k >= 1 and accelerator.is_main_process:
            e.health = health.pseudo_label_health(cfg, k, directory, pseudo_label_dir(cfg, k),
                                                  pseudo_label_dir(cfg, k - 1) if k >= 2 else None)
        if ref_dir is not None and directory.resolve() == ref_dir.resolve():
            reference = e
        entries.append(e)
    if robust and ref_dir is not None:
        if reference is None:  # an outside reference: evaluated like the others, not listed
            m = evaluation.load(ref_dir)
            subset = evaluation.load_subset(test, m.prep, ecfg.subset, ecfg.seed)
            reference = Entry("reference", ref_dir, corruptions=evaluation.corruption(
                m, test, ecfg, accelerator, cfg.progress, subset), perturbations=evaluation.perturbation(
                m, test, ecfg, accelerator, cfg.progress, subset))
        for e in entries:
            e.mce, e.relative_mce, e.mfr, e.left_out = robustness.normalised(
                e.corruptions["errors"], e.corruptions["clean_error"], e.perturbations["flip_rate"],
                reference.corruptions["errors"], reference.corruptions["clean_error"],
                reference.perturbations["flip_rate"])
    return entries


def summary_rows(entries: list[Entry]) -> list[dict]:
    """One dict per model: the report table's figures, also what bench files record."""
    rows = []
    for e in entries:
        metrics = (e.card or {}).get("metrics", {})
        rows.append({"label": e.label, "round": e.round, "model": e.arch, "params": e.params, "macs": e.macs,
                     "test_top1": e.clean["top1"], "top5": e.clean.get("top5"), "nll": e.clean["nll"],
                     "ece": e.clean["ece"], "mce": e.mce, "relative_mce": e.relative_mce, "mfr": e.mfr,
                     "pseudo_label_acc": metrics.get("pseudo_label_acc"),
                     "train_seconds": metrics.get("train_seconds"), "train_img_s": metrics.get("train_img_s")})
    return rows


REPORT_FILES = ("report.md", "report.html", "report.json")


def write_report(cfg: Config, entries: list[Entry], test: evaluation.TestSet, out_dir: Path) -> Path:
    """report.md, report.html, report.json and plots/ in ``out_dir``; returns the Markdown file's path."""
    plot_dir = out_dir / "plots"
    doc = Document(out_dir)
    rows = summary_rows(entries)
    robust = [e for e in entries if e.corruptions is not None]
    healthy = [e for e in entries if e.health]
    _summary(doc, cfg, entries, rows, robust, test)
    _accuracy(doc, plot_dir, entries, rows, test.class_names)
    if robust:
        _robustness(doc, plot_dir, robust)
    doc.h(2, "Calibration")
    doc.img(plots.reliability_diagrams(plot_dir / "reliability.png", [e.label for e in entries],
                                       [e.clean["reliability"] for e in entries], [e.clean["ece"] for e in entries]),
            "reliability diagrams")
    if healthy:
        _health(doc, plot_dir, healthy, test.class_names)
    for e in entries:
        section = e.directory / "compression.md"
        if e.round is None and section.is_file():
            doc.raw(section.read_text())
    md = out_dir / "report.md"
    write_json_atomic(out_dir / "report.json", {
        "experiment": cfg.name, "test_set": test.name, "rows": rows, "evaluate": to_dict(cfg.evaluate),
        "health": {str(e.round): {k: v for k, v in e.health.items() if k != "identity"} for e in healthy},
        "corruption_errors": {e.label: e.corruptions["errors"] for e in robust},
        "flip_rates": {e.label: e.perturbations["flip_rate"] for e in robust}})
    write_bytes_atomic(md, doc.markdown().encode())
    write_bytes_atomic(out_dir / "report.html", doc.html(f"Noisy Student report: {cfg.name}").encode())
    return md


def _summary(doc: Document, cfg: Config, entries: list[Entry], rows: list[dict], robust: list[Entry],
             test: evaluation.TestSet) -> None:
    doc.h(1, f"Noisy Student report: {cfg.name}")
    doc.p(f"Test set `{test.name}` ({entries[0].clean['samples']} images, {len(test.class_names)} classes). "
          f"Made {time.strftime('%Y-%m-%d %H:%M')}.")
    doc.table(["model", "arch", "params", "MACs", "top-1 (%)", "mCE (%)", "mFR (%)", "ECE", "NLL",
               "pseudo-label acc. (%)", "train time (s)", "train img/s"],
              [[r["label"], r["model"], human(r["params"]), human(r["macs"]), fmt(r["test_top1"]), fmt(r["mce"]),
                fmt(r["mfr"]), fmt(r["ece"], ".4f"), fmt(r["nll"], ".3f"), fmt(r["pseudo_label_acc"]),
                fmt(r["train_seconds"], ".0f"), fmt(r["train_img_s"], ".0f")] for r in rows])
    if robust:
        ecfg = cfg.evaluate
        doc.p(f"mCE: corruption error summed over 5 severities and averaged over {len(robust[0].corruptions['errors'])} "
              f"corruptions, each normalised by the reference model's ({ecfg.reference or 'round-0 teacher'}); "
              f"100 = as robust as the reference, lower is better. mFR: flip rate over {ecfg.frames}-frame "
              f"perturbation sequences, normalised the same way. Both on a seeded subset of "
              f"{robust[0].corruptions['samples']} test images (evaluate.subset, evaluate.seed). ECE: 15 "
              "equal-width confidence bins (evaluate.ece_bins).")
        if robust[0].left_out and robust[0].left_out != ["none", "none"]:
            doc.p(f"Left out because the reference never errs or flips on them: corruptions {robust[0].left_out[0]}; "
                  f"perturbations {robust[0].left_out[1]}.")


def _accuracy(doc: Document, plot_dir: Path, entries: list[Entry], rows: list[dict], names: list[str]) -> None:
    labels = [e.label for e in entries]
    doc.h(2, "Accuracy")
    ref_top1 = entries[0].clean["top1"] if entries[0].round == 0 else None
    doc.img(plots.accuracy_per_round(plot_dir / "accuracy.png", labels, [r["test_top1"] for r in rows],
                                     ref_top1), "test top-1 per model")
    doc.h(3, "Per-class accuracy (%)")
    doc.table(["class"] + labels, [[n] + [fmt(e.clean["per_class"][n]) for e in entries] for n in names])


def _robustness(doc: Document, plot_dir: Path, robust: list[Entry]) -> None:
    doc.h(2, "Corruption robustness")
    doc.img(plots.corruption_errors(plot_dir / "corruptions.png", [e.label for e in robust],
                                    [e.corruptions["errors"] for e in robust],
                                    [e.corruptions["clean_error"] for e in robust]), "corruption error by type")
    corr_names = list(robust[0].corruptions["errors"])
    doc.table(["corruption"] + [e.label for e in robust] + ["severity 1..5 of last"],
              [[c] + [fmt(robustness.corruption_errors(e.corruptions["errors"])[c]) for e in robust]
               + [" / ".join(f"{v:.1f}" for v in robust[-1].corruptions["errors"][c])] for c in corr_names])
    doc.table(["model", "clean error (%)", "mCE (%)", "relative mCE (%)", "mFR (%)"]
              + [f"FR {p} (%)" for p in robust[0].perturbations["flip_rate"]],
              [[e.label, fmt(e.corruptions["clean_error"]), fmt(e.mce), fmt(e.relative_mce), fmt(e.mfr)]
               + [fmt(100 * v) for v in e.perturbations["flip_rate"].values()] for e in robust])


def _health(doc: Document, plot_dir: Path, healthy: list[Entry], names: list[str]) -> None:
    doc.h(2, "Pseudo-label health")
    doc.p("Without true labels: the teacher's confidence and entropy over the pool, the share the "
          "confidence filter keeps, and agreement with the previous round's labels. With the pool's true "
          "labels (kept aside, never trained on): accuracy of the kept labels against the threshold.")
    doc.table(["round", "pool", "threshold", "kept (%)", "agreement with previous (%)", "accuracy (%)"],
              [[str(e.round), str(e.health["samples"]), f"{e.health['threshold']:g}", fmt(100 * e.health["kept_share"]),
                fmt(None if e.health["agreement_with_previous"] is None else 100 * e.health["agreement_with_previous"]),
                fmt((e.card or {}).get("metrics", {}).get("pseudo_label_acc"))] for e in healthy])
    doc.img(plots.confidence_histograms(plot_dir / "pseudo_label_confidence.png", [e.round for e in healthy],
                                        [e.health for e in healthy]), "pseudo-label confidence histograms")
    with_truth = [e for e in healthy if "accuracy_at_threshold" in e.health]
    if with_truth:
        doc.img(plots.accuracy_vs_threshold(plot_dir / "pseudo_label_threshold.png", [e.round for e in with_truth],
                                            [e.health for e in with_truth]), "accuracy vs threshold")
        doc.h(3, "Kept per class and precision per class")
        doc.table(["class"] + [f"round {e.round} kept" for e in with_truth]
                  + [f"round {e.round} precision (%)" for e in with_truth],
                  [[n] + [str(e.health["kept_per_class"][n]) for e in with_truth]
                   + [fmt(e.health["precision_per_class"][n]) for e in with_truth] for n in names])
    for e in healthy:
        grid = e.directory / "eval" / e.health.get("audit_grid", "")
        if e.health.get("audit_grid") and grid.is_file():
            target = plot_dir / f"audit_round{e.round}.png"
            if not target.is_file() or target.read_bytes() != grid.read_bytes():
                write_bytes_atomic(target, grid.read_bytes())
            doc.img(target, f"round {e.round} audit grid")


def evaluate(cfg: Config, model_dirs: list[str] | None = None, test_spec: str | None = None,
             out_dir: str | None = None) -> tuple[list[dict], Path | None]:
    """The evaluate stage: the experiment's models (or ``model_dirs``) on its test set (or ``test_spec``);
    returns the summary rows and the report's path (main process only)."""
    limits.use(limits.Limits.of(cfg.data))
    accelerator = make_accelerator()
    if model_dirs:
        targets = []
        for d in model_dirs:
            p = Path(d)
            if not (p / models.WEIGHTS).is_file():
                raise ConfigError(f"models: not a model directory (no {models.WEIGHTS}): {d}")
            targets.append((p.name, p, None))
    else:
        targets = experiment_models(cfg)
    if accelerator.is_main_process:  # what a killed evaluation left: results, report files
        for _, d, _ in targets:
            clean_tmp(Path(d) / evaluation.EVAL_DIR)
        out = Path(out_dir) if out_dir else (cfg.run_dir if not model_dirs else None)
        if out is not None:  # a folder the user may share with other files: only our own names
            for name in REPORT_FILES:
                clean_tmp_of(out / name)
            for p in (out / "plots").glob(f"{TMP_PREFIX}*.png.*") if (out / "plots").is_dir() else ():
                p.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if test_spec:
        if accelerator.is_main_process:
            prepare_test(test_spec, cfg, cfg.progress)
        accelerator.wait_for_everyone()
        data = PreparedData(*prepare_test(test_spec, cfg, progress=False))
    else:
        data = PreparedData.open(cfg)
    test = evaluation.test_set(data)
    entries = evaluate_models(cfg, targets, test, cfg.evaluate.robustness, accelerator)
    path = None
    if accelerator.is_main_process:
        out = Path(out_dir) if out_dir else (cfg.run_dir if not model_dirs else None)
        if out is not None:
            path = write_report(cfg, entries, test, out)
    accelerator.wait_for_everyone()
    return summary_rows(entries), path
