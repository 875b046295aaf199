"""Atomic writes, hashes and manifests: a file that looks finished is finished.

Every artifact is written under a temporary name in its final directory and renamed into place,
so a crash leaves at most a ``.tmp-*`` file that nothing reads. A stage's manifest is written
last and lists the sha256 of what it made; "done" means the manifest exists and matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a finished artifact reads like any file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def short_hash(obj: Any, n: int = 10) -> str:
    """Stable short hash of a JSON-able object (used to name directories after configs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def files_match(directory: str | os.PathLike, files: dict[str, str]) -> bool:
    """True when every ``name -> sha256`` in ``files`` exists in ``directory`` with that hash."""
    directory = Path(directory)
    for name, digest in files.items():
        p = directory / name
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def clean_tmp(directory: str | os.PathLike) -> None:
    """Remove leftovers of writes a crash interrupted: ``.tmp-*`` files and directories (a model
    directory or checkpoint being written) directly in ``directory``. Call it before this run
    writes there, on one process."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(TMP_PREFIX + "*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def main_process() -> bool:
    """Rank 0 (or no launcher): the one process that cleans leftovers before an Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def clean_tmp_of(path: str | os.PathLike) -> None:
    """Remove what an interrupted ``atomic_path(path)`` left (only that file's, in a folder that may
    hold other things)."""
    path = Path(path)
    for p in path.parent.glob(f"{TMP_PREFIX}{path.name}.*") if path.parent.is_dir() else ():
        p.unlink(missing_ok=True)


_CODE_VERSION: str | None = None


def code_version() -> str:
    """Git commit of the code (with ``+dirty`` when modified), or a hash of the package source."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        root = Path(__file__).resolve().parent.parent
        try:
            rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "pipeline"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            _CODE_VERSION = rev + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            h = hashlib.sha256()
            for p in sorted(Path(__file__).parent.rglob("*.py")):
                h.update(p.read_bytes())
            _CODE_VERSION = "src-" + h.hexdigest()[:12]
    return _CODE_VERSION
