"""The README's generated tables are the figures in bench/results (bench/readme_tables.py)."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
tables = runpy.run_path(str(ROOT / "bench" / "readme_tables.py"))


def test_the_readmes_tables_equal_what_bench_results_make():
    text = (ROOT / "README.md").read_text()
    assert "<!-- table: " in text
    _, changed = tables["render"](text)
    assert changed == [], f"run python bench/readme_tables.py: {changed}"
    # an edited figure is found
    name = next(iter(tables["TABLES"]))
    start = text.index(f"<!-- table: {name} -->")
    edited = text[:start] + text[start:].replace("|", "| 1", 3)
    assert tables["render"](edited)[1] == [name]
