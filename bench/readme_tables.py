"""Tables made from bench/results/*.json, so that a figure in the README or docs/results.md is the
figure in its file. A generated block sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``.

    python bench/readme_tables.py          # rewrite every generated table
    python bench/readme_tables.py --check  # exit 1 naming each table that differs from its file
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "results.md"]
TABLES: dict[str, Callable[[], str]] = {}
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
GOAL = 85.1  # USB's PseudoLabel at 4,000 CIFAR-10 labels, the goal


def table(name: str):
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        TABLES[name] = fn
        return fn
    return register


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _rows(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _cpu(machine: str) -> str:
    """The CPU part of a result file's ``machine``: what a reader needs beside a timing."""
    cpu = re.sub(r", \d+ GiB RAM.*|, no GPU.*", "", machine.split(" cores ", 1)[-1])
    return cpu.replace("Intel(R) Xeon(R) Processor", "Intel Xeon")


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{int(seconds // 60)}:{int(round(seconds % 60)):02d}"


def _round_name(k: int) -> str:
    return "0 (teacher)" if k == 0 else f"{k} (student)"


@table("fashion-mnist")
def fashion_mnist() -> str:
    """The default experiment per round, with the spread over three labeled splits."""
    run, seeds = _load("fashion_mnist_iterate.json"), _load("accuracy_seeds.json")
    spread = {r["round"]: r for r in seeds["rounds"]}
    rows = [[_round_name(r["round"]), r["model"], _pct(r["test_top1"]),
             f"{spread[r['round']]['mean']:.2f} ± {spread[r['round']]['std']:.2f}",
             _pct(r["pseudo_label_acc"]), f"{r['seconds']:.0f}"] for r in run["rounds"]]
    head = ["round", "model", "test top-1 (%)", f"{len(seeds['seeds'])} labeled splits: mean ± std",
            "pseudo-label acc. (%)", "seconds"]
    return (_rows(head, rows) + f"\n`{run['command']}` in {_minutes(run['wall_seconds'])} on {_cpu(run['machine'])}; "
            f"the splits: `{seeds['command']}`.\n")


@table("cifar10")
def cifar10() -> str:
    """The final CIFAR-10 run per round, and its labels-only twin of the same budget."""
    run = _load("cifar10_iterate.json")
    rows = []
    lo = run.get("labels_only")
    if lo is not None:
        rows.append(["labels only (round 0 alone, as many images)", "–", _pct(lo["test_top1"]), _pct(lo.get("val_top1")),
                     "–", f"{lo['seconds']:.0f}"])
    for r in run["rounds"]:
        rows.append([_round_name(r["round"]), r["model"], _pct(r["test_top1"]), _pct(r.get("val_top1")),
                     _pct(r["pseudo_label_acc"]), f"{r['seconds']:.0f}"])
    out = _rows(["round", "model", "test top-1 (%)", "val top-1 (%)", "pseudo-label acc. (%)", "seconds"], rows)
    out += f"\n`{run['command']}` in {_minutes(run['wall_seconds'])} on {_cpu(run['machine'])}"
    if lo is not None:
        out += (f"; the pool buys **{run['gain_over_labels_only']:+.2f}** points over the labels alone "
                f"(`{lo['command']}`)")
    last = run["rounds"][-1]["test_top1"]
    return out + f". Against the {GOAL} % goal (USB's PseudoLabel): {last - GOAL:+.2f}.\n"


@table("cifar10-budget-curve")
def cifar10_budget_curve() -> str:
    """What more time buys: each budget's Noisy Student run against its labels-only twin."""
    curve = _load("cifar10_budget_curve.json")
    rows = []
    for p in curve["points"]:
        ns, lo = p["noisy_student"], p["labels_only"]
        rows.append([p["budget"], _pct(ns["test_top1"]), _pct(lo["test_top1"]), f"{p['gain_top1']:+.2f}",
                     f"{ns['images_trained'] / 1e6:.2f}M / {lo['images_trained'] / 1e6:.2f}M",
                     f"{_minutes(ns['wall_seconds'])} / {_minutes(lo['wall_seconds'])}",
                     f"{_cpu(p['machine'])}, `{p['code_version']}`"])
    head = ["budget", "Noisy Student, round 2 (%)", "labels only (%)", "gain", "images trained",
            "wall time (NS / labels only)", "CPU, code"]
    return _rows(head, rows) + f"\n`{curve['command']}`; test top-1; a point and its twin share a machine and code.\n"


@table("cifar10-seed1")
def cifar10_seed1() -> str:
    """The final recipe on a second labeled split (``data.seed=1``), per round."""
    run = _load("cifar10_iterate_seed1.json")
    rows = [[_round_name(r["round"]), _pct(r["test_top1"]), _pct(r.get("val_top1")), _pct(r["pseudo_label_acc"]),
             f"{r['seconds']:.0f}"] for r in run["rounds"]]
    out = _rows(["round", "test top-1 (%)", "val top-1 (%)", "pseudo-label acc. (%)", "seconds"], rows)
    return out + f"\n`{run['command']}` in {_minutes(run['wall_seconds'])} on {_cpu(run['machine'])}.\n"


@table("distill")
def distill() -> str:
    """Each dataset's distilled model against its teacher and against the same net on the labels alone."""
    rows = []
    for name, file in (("Fashion-MNIST", "fashion_mnist_distill.json"), ("CIFAR-10", "cifar10_distill.json")):
        d = _load(file)
        t, s = d["teacher"], d["student"]
        rows.append([name, f"{t['model']} ({t['params'] / 1e6:.2f}M): {_pct(t['test_top1'])}",
                     f"{s['model']} ({s['params'] / 1e6:.2f}M, {100 * d['params_ratio']:.0f} %): {_pct(s['test_top1'])}",
                     _pct(d["labels_only_top1"]), f"{t['latency_ms_b1']:.2f} → {s['latency_ms_b1']:.2f}",
                     f"`{d['command']}`, {_cpu(d['machine'])}"])
    head = ["data", "teacher: top-1 (%)", "distilled: top-1 (%)", "same net, labels only (%)",
            "latency, batch 1 (ms)", "command, CPU"]
    return _rows(head, rows)


@table("speed")
def speed() -> str:
    """Our stages against bare loops and webdataset's reader, each measured in one run."""
    rows = []
    for file in ("pseudo_label_throughput.json", "pseudo_label_throughput_cifar10.json"):
        d = _load(file)
        rows.append([f"pseudo-labeling, {d['arch']}, {d['image_size']} px", f"{d['stage_img_s']:,.0f}",
                     f"bare loop over decoded tensors: {d['bare_img_s']:,.0f}", f"{d['ratio']:.2f}",
                     _cpu(d["machine"]), f"`{file}`"])
    for file in ("train_throughput.json", "train_throughput_cifar10.json"):
        d = _load(file)
        rows.append([f"student training, {d['arch']}, {d['image_size']} px", f"{d['pipeline_img_s']:,.0f}",
                     f"bare loop, same augmentation: {d['bare_img_s']:,.0f}", f"{d['ratio']:.2f}",
                     _cpu(d["machine"]), f"`{file}`"])
    d = _load("reader_throughput.json")
    for name, r in d["datasets"].items():
        rows.append([f"reading + decoding shards, {name.split('-')[0]}", f"{r['ours']['median_img_s']:,.0f}",
                     f"webdataset.WebDataset: {r['webdataset']['median_img_s']:,.0f}",
                     f"{1 / r['webdataset_over_ours']:.2f}", _cpu(d["machine"]), "`reader_throughput.json`"])
    d = _load("precision_speed.json")
    for phase in ("train", "inference"):
        p = d[phase]
        rows.append([f"bf16 autocast, {d['arch']} {phase}", f"{p['bf16']['median_img_s']:,.0f}",
                     f"fp32: {p['fp32']['median_img_s']:,.0f}", f"{p['bf16_over_fp32']:.2f}", _cpu(d["machine"]),
                     "`precision_speed.json`"])
    return _rows(["what", "img/s", "against (img/s)", "ratio", "CPU", "file (with its command)"], rows)


@table("fashion-mnist-nonoise")
def fashion_mnist_nonoise() -> str:
    """The default experiment with student noise off, beside the one with it."""
    on, off = _load("fashion_mnist_iterate.json"), _load("fashion_mnist_iterate_nonoise.json")
    noised = {r["round"]: r["test_top1"] for r in on["rounds"]}
    rows = [[_round_name(r["round"]), _pct(noised[r["round"]]), _pct(r["test_top1"]), _pct(r["pseudo_label_acc"])]
            for r in off["rounds"]]
    return (_rows(["round", "noised students (%)", "students without noise (%)", "pseudo-label acc. (%)"], rows)
            + f"\n`{off['command']}`, {_cpu(off['machine'])}.\n")


@table("fashion-mnist-robustness")
def fashion_mnist_robustness() -> str:
    """Robustness and calibration per round (mCE and mFR normalised by the round-0 teacher)."""
    d = _load("fashion_mnist_robustness.json")
    rows = [[_round_name(r["round"]), _pct(r["test_top1"]), _pct(r["mce"]), _pct(r["relative_mce"]), _pct(r["mfr"]),
             f"{r['ece']:.4f}"] for r in d["rounds"]]
    return (_rows(["round", "test top-1 (%)", "mCE (%)", "relative mCE (%)", "mFR (%)", "ECE"], rows)
            + f"\n`{d['command']}`, {_cpu(d['machine'])}.\n")


@table("cifar10-levers")
def cifar10_levers() -> str:
    """Each lever measured on validation: the runs of cifar10_recipes.json that name one, against
    the run they name as their reference."""
    runs = _load("cifar10_recipes.json")["runs"]
    by_name = {r["name"]: r for r in runs if "name" in r}
    rows = []
    for run in runs:
        if "lever" not in run:
            continue
        val = " → ".join(f"{r['val_top1']:.2f}" for r in run["rounds"])
        ref = by_name.get(run.get("vs", ""))
        delta = "–"
        if ref is not None:  # at the last round both have
            mine, theirs = ({r["round"]: r["val_top1"] for r in x["rounds"]} for x in (run, ref))
            k = max(set(mine) & set(theirs))
            delta = f"{mine[k] - theirs[k]:+.2f} at round {k} ({ref['lever']})"
        rows.append([run["lever"], run["length"], val, delta])
    return _rows(["lever", "length", "val top-1, by round", "against"], rows)


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated table made anew, and the names of those that changed."""
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"a document names an unknown table '{name}' (known: {', '.join(TABLES)})")
        body = TABLES[name]()
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for doc in DOCUMENTS:
        text, changed = render(doc.read_text())
        stale += [f"{doc.relative_to(ROOT)}: {name}" for name in changed]
        if not args.check and changed:
            doc.write_text(text)
    if args.check and stale:
        sys.exit(f"tables differ from bench/results: {', '.join(stale)} (python bench/readme_tables.py rewrites them)")
    print(f"{'stale' if args.check else 'rewrote'} {len(stale)} table(s): {', '.join(stale) or 'none'}")


if __name__ == "__main__":
    main()
