"""The whole loop through the real stage scripts on a tiny generated dataset."""

import json

import pyarrow.parquet as pq
import pytest
import timm
import torch
from conftest import stage, tiny_overrides


@pytest.fixture(scope="module")
def experiment(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("e2e") / "runs"
    ov = tiny_overrides(tiny_data, runs)
    stage("prepare_data.py", *ov)
    stage("train.py", "role=teacher", *ov)
    stage("pseudo_label.py", "round=1", *ov)
    stage("train.py", "role=student", "round=1", *ov)
    exp = runs / "tiny"
    before = {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()}
    r = stage("iterate.py", "round=2", *ov)
    untouched = all(p.stat().st_mtime_ns == t for p, t in before.items())
    return {"runs": runs, "ov": ov, "exp": exp, "iterate_out": r.stdout + r.stderr, "rounds_0_1_untouched": untouched}


def test_iterate_after_stages_only_runs_the_new_round(experiment):
    assert experiment["rounds_0_1_untouched"]
    assert "round 2: student" in experiment["iterate_out"]
    assert "round 0: teacher" not in experiment["iterate_out"]


def test_artifacts_of_every_round(experiment):
    exp = experiment["exp"]
    for k in (0, 1, 2):
        d = exp / f"round-{k}"
        for f in ("config.json", "model.safetensors", "card.json", "metrics.json"):
            assert (d / f).is_file(), d / f
        assert not (d / "state").exists()
        card = json.loads((d / "card.json").read_text())
        assert card["round"] == k and card["files"]["model.safetensors"]
        readme = (d / "README.md").read_text()  # the model card a hub shows
        assert readme.startswith("---\ntags:\n- image-classification\n- timm") and "library_name: timm" in readme
        assert f"| test | {card['metrics']['test_top1']:.2f} |" in readme and f"round {k}" in readme
        assert card["parents"]["data_manifest_sha256"]
        if k:
            assert card["parents"]["teacher_sha256"] == json.loads(
                (exp / f"round-{k - 1}" / "card.json").read_text())["files"]["model.safetensors"]
            assert card["noise"]["randaugment"] == {"n": 1, "m": 9}
            assert len(list((exp / "pseudo_labels" / f"round={k}").glob("unlabeled-*.parquet"))) == 4
            agreement = json.loads((exp / "pseudo_labels" / f"round={k}" / "_manifest.json").read_text())[
                "stats"]["agreement_with_previous"]
            assert agreement is None if k == 1 else 0 <= agreement <= 1  # round 2 compares with round 1's labels
    assert "| 2 | resnet10t |" in experiment["iterate_out"]


def test_one_clean_pass_per_round_scores_the_card(experiment):
    """Each round's test score is its cached clean evaluation (one pass over the test set, shared by
    the card, iterate's table and the report), not a second pass of its own."""
    for k in (0, 1, 2):
        d = experiment["exp"] / f"round-{k}"
        cleans = [json.loads(p.read_text()) for p in (d / "eval").glob("clean-*.json")]
        on_test = [c for c in cleans if c["test_set"].endswith("/test")]
        card = json.loads((d / "card.json").read_text())
        assert len(on_test) == 1 and card["metrics"]["test_top1"] == round(on_test[0]["top1"], 3)
        assert card["metrics"]["test_samples"] == on_test[0]["samples"] == 80


def test_pseudo_labels_beat_chance(experiment):
    exp = experiment["exp"]
    stats = json.loads((exp / "pseudo_labels" / "round=1" / "_manifest.json").read_text())["stats"]
    assert stats["samples"] == 200
    assert stats["accuracy"] > 50  # 4 classes: chance is 25 %
    t = pq.read_table(exp / "pseudo_labels" / "round=1" / "unlabeled-000000.parquet")
    assert t.num_rows == 50 and json.loads(t.schema.metadata[b"class_names"]) == [f"class_{i}" for i in range(4)]


def test_pseudo_labels_of_every_round_read_as_one_dataset(experiment):
    """pandas, pyarrow.dataset and DuckDB take the directories as they are: the manifest is skipped,
    the round is a Hive partition and the teacher a column."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    exp, root = experiment["exp"], experiment["exp"] / "pseudo_labels"
    one = pd.read_parquet(root / "round=1")
    assert len(one) == 200 and set(one["teacher_sha256"]) == {
        json.loads((exp / "round-0" / "card.json").read_text())["files"]["model.safetensors"]}
    every = ds.dataset(root, partitioning="hive").to_table().to_pandas()
    assert sorted(every["round"].unique()) == [1, 2] and len(every) == 400
    assert every.groupby("round")["teacher_sha256"].nunique().tolist() == [1, 1]
    assert len(pd.read_parquet(root)) == 400
    counts = duckdb.sql(f"select round, count(*) from read_parquet('{root}/*/*.parquet', hive_partitioning=true) "
                        "group by round order by round").fetchall()
    assert counts == [(1, 200), (2, 200)]


def test_an_older_runs_pseudo_label_layout_is_refused_in_one_line(experiment, tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.training.experiment import pseudo_label_dir

    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=old"])
    (tmp_path / "old" / "round-1" / "pseudo_labels").mkdir(parents=True)
    with pytest.raises(ConfigError, match="layout of an older version .* start a new experiment name"):
        pseudo_label_dir(cfg, 1)
    assert pseudo_label_dir(cfg, 2) == tmp_path / "old" / "pseudo_labels" / "round=2"


def test_local_dir_reload_gives_same_outputs(experiment):
    from pipeline.modeling.models import load_model_dir

    d = experiment["exp"] / "round-2"
    a = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    b, _ = load_model_dir(d)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_rerun_does_no_work(experiment):
    exp = experiment["exp"]
    before = {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()}
    r = stage("iterate.py", "round=2", *experiment["ov"])
    assert "| 2 |" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()} == before


def test_changed_override_is_refused_unless_new_name(experiment):
    ov = experiment["ov"]
    r = stage("iterate.py", "round=2", *ov, "student.drop_rate=0.5", check=False)
    assert r.returncode == 2
    assert "student.drop_rate" in r.stderr and "name=" in r.stderr and "Traceback" not in r.stderr
    # round 0 does not depend on student settings: a new student setting may add a round? no: rounds 1-2 exist
    r = stage("iterate.py", "round=0", *ov, "student.drop_rate=0.5", check=False)
    assert r.returncode == 0


@pytest.mark.parametrize("args, fragment", [
    (["student.treshold=0.2"], "unknown key 'student.treshold'"),
    (["teacher.lr=-1"], "teacher.lr: must be > 0"),
    (["round=-1"], "round"),
    (["--config", "nope.yaml"], "config file not found"),
])
def test_user_errors_are_one_line(args, fragment):
    r = stage("iterate.py", *args, check=False)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_pseudo_label_resumes_per_shard(experiment):
    """A killed labeling job leaves finished shard files; the rerun only labels the rest."""
    import shutil

    ov = [o for o in experiment["ov"] if not o.startswith("name=")] + ["name=plres"]
    shutil.copytree(experiment["exp"] / "round-0", experiment["runs"] / "plres" / "round-0")
    stage("pseudo_label.py", "round=1", *ov)
    pl_dir = experiment["runs"] / "plres" / "pseudo_labels" / "round=1"
    files = sorted(pl_dir.glob("unlabeled-*.parquet"))
    assert len(files) == 4
    reference = pq.read_table(files[2])
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    files[2].unlink()
    (pl_dir / "_manifest.json").unlink()
    (pl_dir / ".tmp-unlabeled-000002.parquet.abc").write_bytes(b"partial")
    r = stage("pseudo_label.py", "round=1", *ov)
    assert "(50 now on 1 process(es)" in r.stdout + r.stderr
    assert all(f.stat().st_mtime_ns == mtimes[f] for f in files if f != files[2])
    assert pq.read_table(files[2]).equals(reference)
    assert not list(pl_dir.glob(".tmp-*"))


def test_training_options_ema_accumulation_sgd_finetune(tiny_data, tmp_path):
    ov = tiny_overrides(tiny_data, tmp_path / "runs", name="opts") + [
        "teacher.epochs=3", "teacher.optimizer=sgd", "teacher.lr=0.05", "teacher.ema=true",
        "teacher.ema_decay=0.9", "teacher.grad_accum=2", "student.epochs=1", "student.finetune_epochs=1",
        "student.soft=false", "student.balance=false", "model.students=[resnet10t]",
        "student.init_from_teacher=true", "student.threshold=0"]
    stage("iterate.py", "round=1", *ov)
    card = json.loads((tmp_path / "runs" / "opts" / "round-1" / "card.json").read_text())
    assert [s["phase"] for s in card["train"]] == ["train", "finetune"]
    assert card["parents"]["init"]["from"] == "teacher"
    teacher = json.loads((tmp_path / "runs" / "opts" / "round-0" / "card.json").read_text())
    assert teacher["train"][0]["steps"] == 3 * (40 // 16 // 2)
    bad = tiny_overrides(tiny_data, tmp_path / "runs", name="opts2") + [
        "teacher.epochs=1", "model.students=[resnet18]", "student.init_from_teacher=true", "student.threshold=0"]
    r = stage("iterate.py", "round=1", *bad, check=False)
    assert r.returncode == 2 and "student.init_from_teacher" in r.stderr


def _evaluate(experiment, *extra, check=True):
    return stage("evaluate.py", *experiment["ov"], "evaluate.subset=40", "evaluate.frames=3",
                 "evaluate.audit_per_class=3", *extra, check=check)


def test_report_of_tiny_experiment(experiment):
    import re

    exp = experiment["exp"]
    r = _evaluate(experiment)
    assert "report:" in r.stdout
    md = (exp / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"plots/accuracy.png", "plots/corruptions.png", "plots/reliability.png",
            "plots/pseudo_label_confidence.png", "plots/pseudo_label_threshold.png",
            "plots/audit_round1.png", "plots/audit_round2.png"} <= set(figures)
    for f in figures:
        assert (exp / f).is_file() and (exp / f).read_bytes()[:4] == b"\x89PNG", f
    page = (exp / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures) and "<table>" in page
    rows: dict = {}
    for line in md.splitlines():  # the first table is the summary, a row per model
        if re.match(r"\| round \d \|", line):
            rows.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[1:-1]])
    assert set(rows) == {"round 0", "round 1", "round 2"}
    assert rows["round 0"][5] == "100.00"  # the reference: mCE = 100
    # mFR = 100 too, unless the (perfect) tiny reference never flips, which the report must then say
    assert rows["round 0"][6] == "100.00" or ("perturbations " + ", ".join(
        ["brightness", "gaussian_noise", "rotate", "shot_noise", "translate", "zoom"])) in md
    for k in (0, 1, 2):
        kinds = {p.name.split("-")[0] for p in (exp / f"round-{k}" / "eval").glob("*.json")}
        assert {"clean", "corruptions", "perturbations"} <= kinds
        clean = json.loads(next((exp / f"round-{k}" / "eval").glob("clean-*.json")).read_text())
        card = json.loads((exp / f"round-{k}" / "card.json").read_text())
        assert abs(clean["top1"] - card["metrics"]["test_top1"]) < 1e-6 and clean["samples"] == 80
        assert sum(map(sum, clean["confusion"])) == 80 and 0 <= clean["ece"] <= 1
    health = json.loads(next((exp / "round-2" / "eval").glob("health-*.json")).read_text())
    assert health["samples"] == 200 and 0 <= health["agreement_with_previous"] <= 1
    assert sum(health["confidence_hist"]) == 200 and health["accuracy_at_threshold"][0]["kept_share"] == 1.0


def test_evaluate_again_reads_its_cache(experiment):
    exp = experiment["exp"]
    _evaluate(experiment)
    results = {p: p.stat().st_mtime_ns for p in exp.glob("round-*/eval/*")}
    _evaluate(experiment)
    assert results and {p: p.stat().st_mtime_ns for p in exp.glob("round-*/eval/*")} == results


def test_evaluate_given_models_and_test_set(experiment, tiny_data, tmp_path):
    exp = experiment["exp"]
    r = _evaluate(experiment, f"models={exp / 'round-0'},{exp / 'round-1'}", f"test={tiny_data['test']}",
                  f"out={tmp_path / 'rep'}", "evaluate.robustness=false")
    assert "round-0" in r.stdout and "round-1" in r.stdout and (tmp_path / "rep" / "report.md").is_file()
    r = _evaluate(experiment, f"models={tmp_path}", check=False)
    assert r.returncode == 2 and "not a model directory" in r.stderr and "Traceback" not in r.stderr


def test_recipe_search_never_scores_the_test_set(tiny_data, tmp_path):
    """evaluate.test=false: a round is scored on the validation split only; no test-set result exists."""
    ov = tiny_overrides(tiny_data, tmp_path / "runs", name="search")
    r = stage("iterate.py", "round=0", *ov, "data.val_per_class=5", "evaluate.test=false", "teacher.epochs=5")
    metrics = json.loads((tmp_path / "runs" / "search" / "round-0" / "metrics.json").read_text())
    assert metrics["test_top1"] is None and 0 <= metrics["val_top1"] <= 100
    cleans = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "search" / "round-0").glob("eval/clean-*.json")]
    assert cleans and all(c["test_set"].endswith("/val") for c in cleans)  # the val pass only, never the test set
    assert "| 0 | resnet10t | - | " in r.stdout and "val top-1" in r.stdout


def test_a_webdataset_pool_is_pseudo_labeled_where_it_is(tiny_data, tmp_path):
    """A pool written by webdataset's ShardWriter (plain and gzipped, extra members) is indexed, not
    copied; its pseudo labels carry the original shard names and keys, and the extra members stay
    reachable in the original shards."""
    import gzip
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(pool / "plain-%06d.tar"), maxcount=20) as sink:
        for i in range(50):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"img{i:05d}", "png": buf.getvalue(), "json": {"i": i}, "txt": f"caption {i}"})
    (pool / "gz-000000.tar.gz").write_bytes(gzip.compress((pool / "plain-000002.tar").read_bytes()))
    (pool / "plain-000002.tar").unlink()
    pattern = f"{pool}/plain-{{000000..000001}}.tar::{pool}/gz-000000.tar.gz"
    runs = tmp_path / "runs"
    ov = [*tiny_overrides(tiny_data, runs, name="inplace"), f"data.unlabeled={pattern}", "teacher.epochs=1",
          "student.threshold=0", "student.epochs=1"]
    stage("prepare_data.py", *ov)
    stage("iterate.py", "round=1", *ov)
    labels = pq.read_table(runs / "inplace" / "pseudo_labels" / "round=1").to_pydict()
    assert sorted(zip(labels["shard"], labels["key"], strict=True)) == sorted(
        [("plain-000000.tar", f"img{i:05d}") for i in range(20)] + [("plain-000001.tar", f"img{i:05d}")
                                                                    for i in range(20, 40)]
        + [("gz-000000.tar.gz", f"img{i:05d}") for i in range(40, 50)])
    assert not list((runs / "data").rglob("unlabeled-*.tar"))  # nothing copied
    first = next(iter(wds.WebDataset(str(pool / "plain-000000.tar"), shardshuffle=False).decode()))
    assert first["__key__"] == labels["key"][labels["shard"].index("plain-000000.tar")] and first["json"] == {"i": 0}
