"""The command line as a user meets it: ``--help`` from the config dataclasses without torch, both
argument forms, configs by name, and the installed ``noisy-student`` command from a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.cli import CONFIGS, find_config, parse_args
from pipeline.commands import COMMANDS
from pipeline.config import Config, ConfigError, describe, flatten, to_dict

HEAVY = ("torch", "timm", "accelerate", "webdataset", "pyarrow")


def _py(code: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, **env})


def test_every_config_key_has_a_type_a_default_and_a_meaning():
    rows = describe(Config())
    assert [r[0] for r in rows] == list(flatten(to_dict(Config())))
    assert all(t and d and len(h) > 10 for _, t, d, h in rows), [r for r in rows if not r[3]]
    assert dict((k, d) for k, _, d, _ in rows)["teacher.randaugment.enabled"] == "false"  # the section's own default


def test_help_lists_every_key_of_the_stage_without_importing_torch_or_timm():
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "iterate.py"), "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    for key, type_, default, meaning in describe(Config()):
        line = next((ln for ln in r.stdout.splitlines() if ln.split()[:1] == [key]), None)
        if key.split(".")[0] == "distill":
            assert line is None  # iterate never reads the distill section
            continue
        assert line is not None and meaning in line and default in line and type_[:20] in line, key
    assert "round=" in r.stdout and "the last round" in r.stdout
    for name in ("iterate", "predict"):  # the whole stage script, exit included
        code = (f"import runpy, sys; sys.argv = ['x', '--help']\ntry: runpy.run_path('stages/{COMMANDS[name].script}', "
                "run_name='__main__')\nexcept SystemExit as e: assert e.code == 0\n"
                f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
        r = _py(code)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def test_both_argument_forms_read_the_same_and_a_config_is_found_by_name():
    a = parse_args(["--config", "cifar10", "--round", "2", "--student.threshold", "0.5", "--data.max-bad-share=0.1"],
                   {"round": int})
    b = parse_args([f"config={CONFIGS / 'cifar10.yaml'}", "round=2", "student.threshold=0.5",
                    "data.max_bad_share=0.1"], {"round": int})
    assert a == b and a[1] == {"round": 2} and a[0].name == "cifar10" and a[0].student.threshold == 0.5
    assert find_config("fashion_mnist.yaml") == str(CONFIGS / "fashion_mnist.yaml")
    with pytest.raises(ConfigError, match=r"--round needs a value \(--round VALUE or round=VALUE\)"):
        parse_args(["--round"], {"round": int})
    with pytest.raises(ConfigError, match="argument 'round' is not of the form key=value or --key value"):
        parse_args(["round", "2"], {"round": int})
    with pytest.raises(ConfigError, match=r"config file not found: nope \(or a name in .*cifar10, fashion_mnist"):
        parse_args(["--config", "nope"])


def test_every_stage_script_is_a_command():
    assert sorted(c.script for c in COMMANDS.values()) == sorted(p.name for p in (ROOT / "stages").glob("*.py"))


def test_the_wheel_holds_every_module_the_configs_and_a_working_command(tmp_path):
    """Build the wheel, install it alone (no repo on the path) and run the installed command."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    for name in ("pipeline", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("noisy_student-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert {f"pipeline/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = tmp_path / "elsewhere"
    run.mkdir()

    def cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(site / "bin" / "noisy-student"), *args], capture_output=True, text=True,
                              cwd=run, env=env, timeout=120)

    where = _py("import pipeline.cli as c; print(c.__file__, c.DEFAULT_CONFIG.is_file())", cwd=run, PYTHONPATH=str(site))
    assert where.stdout.split() == [str(site / "pipeline" / "cli.py"), "True"], where.stdout + where.stderr
    top = cmd("--help")
    assert top.returncode == 0 and all(name in top.stdout for name in COMMANDS)
    helped = cmd("iterate", "--config", "cifar10", "--help")
    assert helped.returncode == 0 and "student.threshold" in helped.stdout
    bad = cmd("iterate", "--config", "cifar10", "--student.treshold", "0.5")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown key 'student.treshold'")
    assert cmd("bogus").returncode == 2


def test_help_shows_the_values_that_would_run_and_python_m_pipeline_works():
    r = _py("import sys; from pipeline.commands import main; sys.argv = ['x', 'iterate', '--help', '--config', "
            "'cifar10', 'teacher.lr=0.05']\ntry: main()\nexcept SystemExit as e: assert e.code == 0")
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    assert "80 (default 30)" in lines["teacher.epochs"] and "CIFAR10 (default FashionMNIST)" in lines["data.source"]
    assert "0.05 (default" in lines["teacher.lr"]
    assert "(default" not in lines["student.soft"]  # the same as the built-in default: shown once
    for module in ("pipeline", "pipeline.commands"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
        assert r.returncode == 0 and all(name in r.stdout for name in COMMANDS), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "pipeline", "iterate", "--student.treshold", "0.5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "unknown key 'student.treshold'" in r.stderr
