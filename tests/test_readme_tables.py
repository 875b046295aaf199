"""The README's and docs/results.md's generated tables are the figures in bench/results
(bench/readme_tables.py)."""

import runpy
from pathlib import Path

import pytest

tables = runpy.run_path(str(Path(__file__).resolve().parent.parent / "bench" / "readme_tables.py"))


@pytest.mark.parametrize("doc", tables["DOCUMENTS"], ids=lambda p: p.name)
def test_each_documents_tables_equal_what_bench_results_make(doc):
    text = doc.read_text()
    names = tables["BLOCK"].findall(text)
    assert names, f"{doc.name} has no generated table"
    _, changed = tables["render"](text)
    assert changed == [], f"run python bench/readme_tables.py: {changed}"


def test_an_edited_figure_is_found():
    doc = tables["DOCUMENTS"][0]
    text = doc.read_text()
    name = tables["BLOCK"].search(text).group("name")
    start = text.index(f"<!-- table: {name} -->")
    edited = text[:start] + text[start:].replace("|", "| 1", 3)
    assert tables["render"](edited)[1] == [name]


def test_every_table_is_used_somewhere():
    used = {m.group("name") for doc in tables["DOCUMENTS"] for m in tables["BLOCK"].finditer(doc.read_text())}
    assert used == set(tables["TABLES"])
