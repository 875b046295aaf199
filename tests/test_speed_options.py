"""Speed options (mixed precision, channels_last, torch.compile): they change how fast a model runs,
never what the pipeline keeps (checkpoint keys, pseudo-label rows), and say what they did."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, make_image, stage, tiny_overrides
from safetensors.torch import load_file

from pipeline.config import ConfigError, PseudoLabelConfig, load_config
from pipeline.data.dataset import Preprocessing
from pipeline.data.shards import write_shard
from pipeline.modeling import precision
from pipeline.modeling.models import create_model
from pipeline.pseudo import labeling
from pipeline.pseudo import pseudo_labels as pl


def test_auto_precision_is_bf16_for_training_where_the_cpu_has_it_and_fp32_for_cpu_inference():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve("auto", cpu) == ("bf16" if precision.cpu_has_native_bf16() else "fp32")
    assert precision.resolve("auto", cpu, inference=True) == "fp32"
    assert precision.resolve("auto", gpu, inference=True) == "bf16"
    assert precision.resolve("fp16", cpu) == "fp32" and precision.resolve("fp16", gpu) == "fp16"
    assert precision.resolve("no", gpu) == "fp32" and precision.resolve("bf16", cpu, inference=True) == "bf16"
    assert precision.grad_scaler("fp16") is not None and precision.grad_scaler("bf16") is None


def test_a_launchers_precision_fills_in_auto_and_is_refused_against_an_explicit_setting(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate config` leaves it
    cfg = load_config(None, ["pseudo_label.mixed_precision=bf16"])
    assert (cfg.teacher.mixed_precision, cfg.student.mixed_precision, cfg.pseudo_label.mixed_precision) == ("bf16",) * 3
    with pytest.raises(ConfigError, match="teacher.mixed_precision: the config says 'no' but the launcher asks for "
                                          "bf16 .*launch with --mixed_precision no"):
        load_config(None, ["teacher.mixed_precision=no"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default asks for nothing
    assert load_config(None, ["teacher.mixed_precision=no"]).student.mixed_precision == "auto"


def test_the_accelerator_never_autocasts_on_its_own_whatever_the_environment():
    code = "from pipeline.runtime import make_accelerator; print(make_accelerator().mixed_precision)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "1"})
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "no", r.stderr[-2000:]


def test_compile_settings_are_checked_before_a_stage_starts():
    from pipeline.cli import parse_args

    cfg = load_config(None, ["student.compile=true", "pseudo_label.compile=eager", "pseudo_label.channels_last=true"])
    assert precision.compile_backend(cfg.student.compile) == "inductor"
    assert precision.compile_backend(cfg.pseudo_label.compile) == "eager"
    assert precision.compile_backend(cfg.teacher.compile) is None
    with pytest.raises(ConfigError, match="student.compile: unknown torch.compile backend 'turbo'"):
        parse_args(["student.compile=turbo"])
    with pytest.raises(ConfigError, match="compile: unknown torch.compile backend 'turbo'"):
        precision.compile_model(torch.nn.Linear(2, 2), "turbo")  # the library, called from Python
    with pytest.raises(ConfigError, match="pseudo_label.mixed_precision: expected one of"):
        load_config(None, ["pseudo_label.mixed_precision=half"])


def _pool_shard(path, n=40):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        make_image(i % 4, rng).save(buf, format="PNG")
        samples.append({"__key__": f"u{i:04d}", "png": buf.getvalue()})
    write_shard(path, samples)
    return path


def test_pseudo_labels_in_bf16_channels_last_and_compiled_match_fp32_and_record_the_precision(tmp_path):
    from accelerate import Accelerator

    shard = _pool_shard(tmp_path / "unlabeled-000000.tar")
    torch.manual_seed(0)
    model = create_model("resnet10t", 4, 1).eval()
    prep = Preprocessing.of("L", 16, [0.5], [0.5])
    names = ["a", "b", "c", "d"]
    got = {}
    for run, opts in {"fp32": {}, "fast": {"mixed_precision": "bf16", "channels_last": True, "compile": "eager"}}.items():
        out = tmp_path / run
        res = labeling.label_shards(model, [shard], out, shard_rows={shard.name: 40}, teacher_sha256="t" * 64,
                              class_names=names, prep=prep, opts=PseudoLabelConfig(batch_size=16, workers=0, **opts),
                              accelerator=Accelerator(cpu=True), progress=False)
        f = out / pl.parquet_name(shard)
        meta = pl.read_meta(f)
        assert meta["precision"] == res["precision"] == ("bf16" if opts else "fp32")
        manifest = pl.write_manifest(out, [shard], tmp_path, "t" * 64, names, {}, "d")
        assert manifest["files"][0]["precision"] == meta["precision"]
        t = pl.pq.read_table(f)
        got[run] = (t.column("key").to_pylist(), np.asarray(t.column("probs").to_pylist()))
    assert model._compiled_call_impl is not None  # compile="eager" really went through torch.compile
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert got["fp32"][0] == got["fast"][0]
    diff = np.abs(got["fp32"][1] - got["fast"][1]).max()
    assert 0 < diff < 0.03  # bf16 really ran, and only rounding separates it from fp32


def test_a_compiled_teacher_trains_to_the_same_model_with_the_same_checkpoint_keys(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    base = tiny_overrides(tiny_data, runs, name="eager") + ["teacher.epochs=2", "teacher.mixed_precision=no"]
    stage("prepare_data.py", *base)
    made = {}
    for name, extra in {"eager": [], "compiled": ["teacher.compile=eager"]}.items():
        stage("train.py", "role=teacher", *tiny_overrides(tiny_data, runs, name=name),
              "teacher.epochs=2", "teacher.mixed_precision=no", *extra)
        out = runs / name / "round-0"
        run = json.loads((out / "card.json").read_text())["train"][0]
        made[name] = (load_file(str(out / "model.safetensors")), [e["loss"] for e in run["history"]],
                      {"precision": run["precision"], "compile": run["compile"]})
    (we, le, _), (wc, lc, _) = made["eager"], made["compiled"]
    assert we.keys() == wc.keys() and not any(k.startswith("_orig_mod") for k in wc)
    assert made["compiled"][2] == {"precision": "fp32", "compile": "eager"}
    np.testing.assert_allclose(lc, le, rtol=1e-5)
    for k in we:
        np.testing.assert_allclose(wc[k], we[k], atol=1e-5, err_msg=k)
