"""Nothing non-finite is trained on or written: the step guard (skip and count, bf16 -> fp32, the fp32
stop and its resume) driven by the ``nonfinite_grad`` failpoint on any CPU, and the refusals of
non-finite weights and outputs through planted model directories."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import make_folder, stage, tiny_overrides
from safetensors.torch import load_file, save_file

from pipeline.config import TrainConfig
from pipeline.data.dataset import Preprocessing
from pipeline.errors import NumericError
from pipeline.modeling import models, precision
from pipeline.tracking import Trackers
from pipeline.training import trainer
from pipeline.training.guard import StepGuard
from pipeline.training.objectives import Batch

PREP = Preprocessing.of("L", 16, [0.5], [0.5])


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 4))


def _run(tmp_path, run_dir=None, **cfg) -> trainer._Run:
    tcfg = TrainConfig(**{"batch_size": 8, "optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0,
                          "mixed_precision": "no", "ema": True, "workers": 0, **cfg})
    job = trainer.Job(phase="train", cfg=tcfg, epochs=2, lr=tcfg.lr, labeled=None, labeled_total=32, prep=PREP,
                      run_dir=run_dir)
    run = trainer._setup(_net(), job)
    run.trackers = Trackers([], tmp_path, "train", {}, True)
    return run


def _batches():
    g = torch.Generator().manual_seed(1)
    while True:
        yield Batch(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=g),
                    torch.randint(0, 4, (8,), generator=g), 8)


def _state(run: trainer._Run) -> dict[str, torch.Tensor]:
    model = run.accelerator.unwrap_model(run.wrapped)
    return {k: v.clone() for k, v in {**model.state_dict(), **{f"ema.{k}": v for k, v in
                                                              run.ema.module.state_dict().items()}}.items()}


def test_failpoint_ranges(monkeypatch):
    from pipeline import failpoints

    for spec, want in (("p:2", [0, 1, 0, 0]), ("p:2-3", [0, 1, 1, 0]), ("p:2-", [0, 1, 1, 1])):
        monkeypatch.setenv("NS_FAILPOINT", spec)
        failpoints._counts.clear()
        assert [int(failpoints.due("p")) for _ in range(4)] == want, spec
    assert not failpoints.due("other")
    failpoints._counts.clear()


def test_a_nonfinite_step_changes_nothing_but_the_schedule(tmp_path, monkeypatch):
    from pipeline import failpoints

    run = _run(tmp_path)
    batches = _batches()
    monkeypatch.setenv("NS_FAILPOINT", "nonfinite_grad:1")
    failpoints._counts.clear()
    before = _state(run)
    trainer._step(run, batches, 0, 0)  # the first step's gradient is NaN
    after = _state(run)
    for k in before:  # weights, BatchNorm running statistics (moved by the forward pass) and EMA
        assert torch.equal(before[k], after[k]), k
    assert not run.optimizer.state  # no momentum buffer was made
    assert run.scheduler.last_epoch == 1  # the schedule moves on
    assert run.guard.skipped == 1 and run.guard.steps == {"fp32": 1} and run.guard.precision == "fp32"
    trainer._step(run, batches, 0, 1)  # a good step updates
    changed = _state(run)
    assert any(not torch.equal(after[k], changed[k]) for k in after) and run.optimizer.state
    assert run.guard.in_a_row == 0 and run.guard.steps == {"fp32": 2}


def test_clip_grad_bounds_the_norm_the_optimizer_sees(tmp_path):
    seen = {}
    for clip in (None, 1e-3):
        run = _run(tmp_path, clip_grad=clip)
        step = run.optimizer.step

        def spy(*a, run=run, step=step, clip=clip, **k):
            grads = [p.grad for p in run.wrapped.parameters() if p.grad is not None]
            seen[clip] = float(torch.nn.utils.get_total_norm(grads))
            return step(*a, **k)

        run.optimizer.step = spy
        trainer._step(run, _batches(), 0, 0)
    assert seen[None] > 1e-2 and seen[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_fp32_stops_after_max_nonfinite_steps_in_a_row(tmp_path, monkeypatch):
    from pipeline import failpoints

    run = _run(tmp_path, max_nonfinite_steps=3)
    batches = _batches()
    monkeypatch.setenv("NS_FAILPOINT", "nonfinite_grad:1-")
    failpoints._counts.clear()
    trainer._step(run, batches, 0, 0)
    trainer._step(run, batches, 0, 1)
    with pytest.raises(NumericError, match=r"train epoch 1, step 3: 3 non-finite steps in a row in fp32 .*lower lr"):
        trainer._step(run, batches, 0, 2)


def test_bf16_switches_to_fp32_records_it_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """bf16 autocast runs on any CPU (emulated where it is not native): only the switch is asserted."""
    from pipeline import failpoints

    exp = tmp_path / "exp"
    run = _run(tmp_path, run_dir=exp, mixed_precision="bf16")
    assert run.guard.precision == "bf16"
    monkeypatch.setenv("NS_FAILPOINT", "nonfinite_grad:1")
    failpoints._counts.clear()
    batches = _batches()
    for step in range(4):
        trainer._step(run, batches, 0, step)
    g = run.guard
    assert g.precision == "fp32" and g.steps == {"bf16": 1, "fp32": 3} and g.skipped == 1
    assert g.switch["from"] == "bf16" and g.switch["step"] == 0 and "non-finite" in g.switch["reason"]
    assert isinstance(run.autocast, type(precision.autocast("fp32", torch.device("cpu"))))
    # the checkpoint keeps the switch, and the experiment records it for later phases
    trainer._end_epoch(run, 0, torch.zeros(()), 1.0, tmp_path / "state", g.skipped)
    assert precision.read_fallback(exp)["where"] == f"{tmp_path.name} train, epoch 1, step 1"
    progress = json.loads((tmp_path / "state" / "train-e0000" / "progress.json").read_text())
    assert progress["precision"] == "fp32" and progress["precision_steps"] == {"bf16": 1, "fp32": 3}
    again = _run(tmp_path, mixed_precision="bf16")  # run_dir=None: only the checkpoint says fp32
    trainer._resume(again, tmp_path / "state")
    assert again.guard.precision == "fp32" and again.guard.steps == {"bf16": 1, "fp32": 3}
    # a later phase of the same experiment starts in fp32, and says why
    later = _run(tmp_path, run_dir=exp, mixed_precision="bf16")
    assert later.guard.precision == "fp32" and "non-finite earlier" in later.precision_reason


def test_a_checkpoint_from_before_the_guard_resumes(tmp_path):
    run = _run(tmp_path)
    trainer._end_epoch(run, 0, torch.zeros(()), 1.0, tmp_path / "state", 0)
    path = tmp_path / "state" / "train-e0000" / "progress.json"
    info = json.loads(path.read_text())
    for key in StepGuard("train", 3, "fp32").state():
        del info[key]
    path.write_text(json.dumps(info))
    again = _run(tmp_path)
    trainer._resume(again, tmp_path / "state")
    assert again.start_epoch == 1 and again.guard.precision == "fp32" and again.guard.skipped == 0


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    for flags, native in (("fpu avx2 avx512f avx512bw", False), ("avx512f avx512_bf16", True),
                          ("avx512f amx_tile amx_bf16", True)):
        f = tmp_path / f"cpuinfo-{native}-{len(flags)}"
        f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert precision.cpu_has_native_bf16(str(f)) is native
    assert precision.cpu_has_native_bf16(str(tmp_path / "absent")) is False


# ---------------------------------------------------------------- through the stages


def _card(path) -> dict:
    return json.loads((path / "card.json").read_text())


def test_stage_skips_counts_and_the_fp32_stop_resumes(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    ov = tiny_overrides(tiny_data, runs, name="nf") + ["teacher.epochs=3"]  # 40 labeled, batch 16: 2 steps an epoch
    stage("prepare_data.py", *ov)
    r = stage("train.py", "role=teacher", *ov, env={"NS_FAILPOINT": "nonfinite_grad:3"})
    assert "train epoch 2, step 1: non-finite step in fp32" in r.stderr
    out = runs / "nf" / "round-0"
    train = _card(out)["train"][0]
    assert train["nonfinite_steps"] == 1 and train["precision"] == "fp32" and train["precision_steps"] == {"fp32": 6}
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [int(row["nonfinite_steps"]) for row in rows] == [0, 1, 0]
    # fp32: three in a row stop the stage in one line; the rerun resumes from the last good checkpoint
    ov2 = tiny_overrides(tiny_data, runs, name="nf2") + ["teacher.epochs=3"]
    r = stage("train.py", "role=teacher", *ov2, env={"NS_FAILPOINT": "nonfinite_grad:4-"}, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: train epoch 3, step 2: 3 non-finite steps in a row in fp32" in r.stderr.strip().splitlines()[-1]
    assert not (runs / "nf2" / "round-0" / "model.safetensors").exists()
    r = stage("train.py", "role=teacher", *ov2)
    assert "resuming train from train-e0001" in r.stdout + r.stderr
    assert _card(runs / "nf2" / "round-0")["train"][0]["nonfinite_steps"] == 1  # epoch 2's, kept by its checkpoint


def test_stage_in_bf16_falls_back_and_the_next_round_starts_in_fp32(tiny_data, tmp_path):
    """Opts in to bf16; asserts only what holds on any CPU: the run finishes, the card records what
    ran, nothing non-finite is written."""
    runs = tmp_path / "runs"
    ov = tiny_overrides(tiny_data, runs, name="bf") + [
        "teacher.epochs=3", "teacher.mixed_precision=bf16", "student.mixed_precision=bf16", "student.epochs=1"]
    stage("prepare_data.py", *ov)
    stage("train.py", "role=teacher", *ov, env={"NS_FAILPOINT": "nonfinite_grad:2"})
    train = _card(runs / "bf" / "round-0")["train"][0]
    steps = train["precision_steps"]
    assert train["precision"] == "fp32" and train["precision_switch"]["from"] == "bf16"
    assert 1 <= steps["bf16"] <= 2 and steps["bf16"] + steps["fp32"] == train["steps"] == 6
    assert json.loads((runs / "bf" / precision.FALLBACK).read_text())["precision"] == "fp32"
    stage("pseudo_label.py", "round=1", *ov)
    probs = np.concatenate([np.asarray(__import__("pyarrow.parquet").parquet.read_table(f).column("probs")
                                       .to_pylist()) for f in (runs / "bf" / "pseudo_labels" / "round=1").glob("*.parquet")])
    assert np.isfinite(probs).all()
    stage("train.py", "role=student", "round=1", *ov)
    student = _card(runs / "bf" / "round-1")["train"][0]
    assert student["precision"] == "fp32" and student["precision_steps"].keys() == {"fp32"}
    assert "non-finite earlier in this experiment" in student["precision_reason"]
    w = load_file(str(runs / "bf" / "round-1" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values() if t.is_floating_point())


# ---------------------------------------------------------------- refusals


@pytest.fixture
def planted(tmp_path):
    """A model directory, one with NaN weights, and one whose finite weights overflow its logits to inf."""
    good = tmp_path / "good"
    m = models.create_model("resnet10t", num_classes=4, in_chans=1)
    models.save_model_dir(m.eval(), good, [f"class_{i}" for i in range(4)], [0.2], [0.3], 16, 1)
    dirs = {"good": good}
    for kind in ("nan", "overflow"):
        d = tmp_path / kind
        d.mkdir()
        for f in ("config.json",):
            (d / f).write_bytes((good / f).read_bytes())
        w = load_file(str(good / models.WEIGHTS))
        if kind == "nan":
            w["fc.weight"][0, 0] = float("nan")
        else:
            w["fc.weight"].fill_(3e38)
            w["fc.bias"].fill_(3e38)
        save_file(w, str(d / models.WEIGHTS))
        dirs[kind] = d
    return dirs


def test_nonfinite_weights_are_neither_saved_nor_loaded(planted, tmp_path):
    with pytest.raises(NumericError, match=r"nan/model.safetensors: refusing to load weights that are not finite "
                                           r"\(NaN or inf in fc.weight\)"):
        models.load_model_dir(planted["nan"])
    m, _ = models.load_model_dir(planted["good"])
    with torch.no_grad():
        m.fc.bias[1] = float("inf")
    with pytest.raises(NumericError, match="refusing to save weights that are not finite"):
        models.save_model_dir(m, tmp_path / "out", ["a", "b", "c", "d"], [0.2], [0.3], 16, 1)
    assert not (tmp_path / "out" / models.WEIGHTS).exists()


def test_outputs_that_overflow_are_refused_by_pseudo_label_distill_and_predict(planted, tiny_data, tmp_path):
    model = planted["overflow"]
    m, _ = models.load_model_dir(model)  # finite weights: it loads
    with torch.no_grad():
        assert not torch.isfinite(m(torch.rand(2, 1, 16, 16))).all()
    runs = tmp_path / "runs"
    ov = tiny_overrides(tiny_data, runs, name="ovf")
    stage("prepare_data.py", *ov)
    # distillation targets (offline): the teacher's pass over every shard
    r = stage("distill.py", *ov, f"distill.teacher={model}", "distill.mode=offline", "distill.arch=test_resnet",
              "distill.labels_only=false", "distill.workers=0", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"model {model}: probabilities are not finite" in r.stderr.strip().splitlines()[-1]
    assert not list((runs / "ovf" / "distilled").rglob("*.parquet"))
    # pseudo labels: the overflowing model as round 0 of an experiment (its card names its files)
    exp0 = runs / "ovf" / "round-0"
    exp0.mkdir(parents=True)
    for f in ("config.json", models.WEIGHTS):
        (exp0 / f).write_bytes((model / f).read_bytes())
    from pipeline.artifacts import sha256_file

    (exp0 / "card.json").write_text(json.dumps({"files": {f: sha256_file(exp0 / f)
                                                          for f in ("config.json", models.WEIGHTS)}}))
    r = stage("pseudo_label.py", "round=1", *ov, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"model {exp0}: probabilities are not finite" in r.stderr.strip().splitlines()[-1]
    assert not list((runs / "ovf" / "pseudo_labels").rglob("*.parquet"))
    # predict: no CSV with NaN
    images = make_folder(tmp_path / "imgs", 3, 5)
    out = tmp_path / "pred.csv"
    r = stage("predict.py", f"model={model}", f"input={images}", f"out={out}", check=False)
    assert r.returncode == 2 and f"model {model}: logits are not finite" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp-*pred*"))


def test_the_ema_forgets_its_starting_weights_within_a_round(tmp_path):
    """timm's EMA warmup: after 1,500 steps at ema_decay 0.999 well under 1 % of the EMA is the start."""
    run = _run(tmp_path, ema_decay=0.999)
    model = run.accelerator.unwrap_model(run.wrapped)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        run.ema.module.load_state_dict(model.state_dict())
        for p in model.parameters():
            p.fill_(1.0)
    for step in range(1500):
        run.ema.update(model, step=step)
    start_share = 1 - min(float(p.min()) for p in run.ema.module.parameters())
    assert start_share < 0.01  # a fixed decay of 0.999 leaves 0.999^1500 = 22 %

