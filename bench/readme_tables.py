"""README tables made from bench/results/*.json, so that a figure in the README is the figure in its
file. A generated table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``.

    python bench/readme_tables.py          # rewrite the README's generated tables
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
README = ROOT / "README.md"
TABLES: dict[str, Callable[[], str]] = {}
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


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
            raise SystemExit(f"README names an unknown table '{name}' (known: {', '.join(TABLES)})")
        body = TABLES[name]()
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text, changed = render(README.read_text())
    if args.check:
        if changed:
            sys.exit(f"README tables differ from bench/results: {', '.join(changed)} "
                     "(python bench/readme_tables.py rewrites them)")
        return
    README.write_text(text)
    print(f"rewrote {len(changed)} table(s): {', '.join(changed) or 'none'}")


if __name__ == "__main__":
    main()
