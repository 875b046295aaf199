"""Shared fixtures: a tiny, learnable ImageFolder dataset and a config that trains in seconds."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

NUM_CLASSES = 4
SIZE = 16


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    """Noise plus a bright bar whose position and direction tell the class."""
    a = rng.integers(0, 60, size=(SIZE, SIZE)).astype(np.uint8)
    o = rng.integers(2, 5)
    if label == 0:
        a[o:o + 4, :] = 230
    elif label == 1:
        a[:, o:o + 4] = 230
    elif label == 2:
        a[-o - 4:-o, :] = 230
    else:
        a[:, -o - 4:-o] = 230
    return Image.fromarray(a, mode="L")


def make_folder(root: Path, per_class: int, seed: int, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for c in range(NUM_CLASSES):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(c, rng).save(d / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tiny")
    return {"train": make_folder(base / "train", 60, 0), "test": make_folder(base / "test", 20, 1)}


def tiny_overrides(tiny_data: dict, runs: Path, name: str = "tiny") -> list[str]:
    """Overrides that make the default config run on the tiny data in seconds."""
    return [f"name={name}", f"runs_dir={runs}", f"data.source={tiny_data['train']}",
            f"data.test_source={tiny_data['test']}", "data.labeled_per_class=10", "data.shard_size=50",
            "model.arch=resnet10t", "model.students=[resnet10t]",
            "teacher.epochs=40", "teacher.batch_size=16", "teacher.lr=0.003", "teacher.workers=0",
            "teacher.hflip=false", "teacher.crop_pad=0", "teacher.warmup_epochs=0", "teacher.channels_last=true",
            "student.epochs=2", "student.batch_size=8", "student.unlabeled_ratio=2", "student.workers=0",
            "student.hflip=false", "student.crop_pad=0", "student.randaugment.n=1", "student.warmup_epochs=0",
            "pseudo_label.batch_size=32", "pseudo_label.workers=0",
            # fp32: which bf16 kernels a CPU has must not decide a test (bf16 tests opt in)
            "teacher.mixed_precision=no", "student.mixed_precision=no", "distill.mixed_precision=no"]


STAGE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
# Read once at interpreter or library start: a run that changes them gets a real subprocess.
_AT_START = ("OMP_", "MKL_", "TQDM_", "PYTHON", "LD_", "MALLOC")


class StageServer:
    """Client of ``tests/stage_server.py``: stage runs in forked children of a process that has
    imported torch once, instead of ~5 s of imports per run (``NS_TEST_SUBPROCESS=1`` turns it off)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stage_server.py")], env=STAGE_ENV,
                                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.buf = b""
            if json.loads(self._reply(120)).get("ready") is not True:
                raise RuntimeError("stage server did not start")
        return self.proc

    def _reply(self, timeout: float) -> str:
        """The next reply line; read from the raw pipe (a buffered reader could hold a line select misses)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("no reply from the stage server")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the stage server died")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def run(self, argv: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        proc = self._start()
        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / "out", Path(d) / "err"
            pid = None
            try:
                proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out),
                                             "stderr": str(err)}) + "\n")
                proc.stdin.flush()
                pid = json.loads(self._reply(60))["pid"]
                rc = json.loads(self._reply(timeout))["rc"]
            except BaseException as e:  # a timeout, Ctrl-C: the replies may be out of step, so start afresh
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self._stop()
                if isinstance(e, TimeoutError):
                    raise subprocess.TimeoutExpired(argv, timeout) from None
                raise
            return subprocess.CompletedProcess(argv, rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


SERVER = StageServer()


@pytest.fixture(scope="session", autouse=True)
def _stage_server():
    yield
    SERVER.close()


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python stages/<script> args`` with ``STAGE_ENV`` plus ``env``: through the stage server unless
    ``env`` sets something read at interpreter start, then as a real subprocess."""
    argv = [str(ROOT / "stages" / script), *args]
    full = {**STAGE_ENV, **(env or {})}
    if os.environ.get("NS_TEST_SUBPROCESS") == "1" or any(k.startswith(_AT_START) for k in (env or {})):
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=full, cwd=ROOT,
                              timeout=timeout)
    return SERVER.run(argv, full, ROOT, timeout)


def stage(script: str, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``stages/<script>`` as a user would (``run_script``); raise with its output unless ``check`` is off."""
    r = run_script(script, *args, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r
