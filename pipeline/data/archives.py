"""Reading a .tar/.tar.gz member by member, never extracting it: what each member is (a folder,
a file, or why it is not read), with image bytes read only for image members within
``data.max_member_bytes``. Member names cannot write anywhere."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pipeline.config import ConfigError
from pipeline.data.bad_samples import Tally
from pipeline.data.limits import member_problem

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
ARCHIVE_LINK = "archive member that is a link or device"
UNSAFE = "archive member with an unsafe name"
NOT_IMAGE = "file that is not an image (by its name)"
HIDDEN = "hidden file or folder (name starts with '.')"


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTS


def is_hidden(name: str) -> bool:
    """Any part of the path starts with '.': neither a class nor an image, at any depth."""
    return any(p.startswith(".") for p in PurePosixPath(name).parts)


def archive_entries(path: Path) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    """(normalised name, "dir" | "file" | why it is not read, image bytes, size problem) of each
    member; bytes only for a regular image member, not hidden, within the size limit."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                name = PurePosixPath(m.name).as_posix()
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or ".." in parts:
                    if not m.isdir():  # a folder is no input, unsafe or not
                        yield m.name, UNSAFE, None, None
                elif name in ("", "."):
                    continue
                elif m.isdir():
                    yield name, "dir", None, None
                elif not m.isreg():
                    yield name, ARCHIVE_LINK, None, None
                elif not is_image_name(name) or is_hidden(name):
                    yield name, "file", None, None
                elif problem := member_problem(m.size):
                    yield name, "file", None, problem
                else:
                    f = tf.extractfile(m)
                    yield name, "file", (f.read() if f is not None else b""), None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConfigError(f"cannot read archive {path}: {e}") from None


def archive_members(path: Path, unused: Tally) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(member name, bytes, None) of each regular image member, in archive order, read as a stream;
    (name, None, why) for one over ``data.max_member_bytes``, never read. The rest (hidden names,
    not images, links, unsafe names) is counted in ``unused``; folders are not inputs."""
    for name, kind, data, why in archive_entries(path):
        if kind == "dir":
            continue
        if kind != "file":
            unused.add(f"{path.name}/{name}", kind)
        elif is_hidden(name):
            unused.add(f"{path.name}/{name}", HIDDEN)
        elif not is_image_name(name):
            unused.add(f"{path.name}/{name}", NOT_IMAGE)
        else:
            yield name, data, why
