"""What a class is in a folder or an archive: torchvision's ImageFolder rule, the same for every
labeled input (training and test sources, folders and archives), so that no layout silently
merges, drops or invents a class. Wrong labels are the one fault no accuracy figure reveals.

- A class is a directory directly under the root; every image below it, at any depth, is one of
  its images. Links are followed as ``os.walk(followlinks=True)`` does, except a link to a folder
  it is already inside of (a loop).
- An archive whose members all sit under one top folder is read as if that folder were the root.
- Names starting with ``.`` are neither classes nor images, at any depth.
- Every entry met is used, bad (a ``Skip``) or unused (counted in a ``Tally`` with its reason).

Unlabeled inputs (a pool folder or archive, predict's input) take the walk and the counting, not
the classes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path, PurePosixPath

from pipeline.config import ConfigError
from pipeline.data.archives import HIDDEN, NOT_IMAGE, UNSAFE, archive_entries, is_hidden, is_image_name
from pipeline.data.bad_samples import Skip, Tally
from pipeline.data.limits import member_problem
from pipeline.tracking import log

CLASS_RULE = "imagefolder"  # in prepared data's identity: data listed by another rule is prepared again

OUTSIDE_CLASS = "image outside a class folder"
BROKEN_LINK = "broken link"
LINK_LOOP = "link to a folder it is inside of (a loop: not followed)"
NOT_REGULAR = "not a regular file"
UNREADABLE_DIR = "folder that cannot be listed"
NOT_LISTED = "image of a class not in data.classes"


def walk_folder(root: Path, unused: Tally, skipped: list[Skip]) -> tuple[list[tuple[str, Path]], list[str]]:
    """(path relative to ``root``, file) of every image below it, sorted, and the folders directly
    under it (the class candidates). What is not an image is counted in ``unused``; an image over
    ``data.max_member_bytes`` is a ``Skip`` in ``skipped``."""
    files: list[tuple[str, Path]] = []
    top: list[str] = []

    def visit(d: Path, rel: tuple[str, ...], inside: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            unused.add(f"{root}/{'/'.join(rel)}", f"{UNREADABLE_DIR} ({e.strerror or e})")
            return
        for e in entries:
            r = (*rel, e.name)
            name, where = "/".join(r), f"{root}/{'/'.join(r)}"
            if e.name.startswith("."):
                unused.add(where, HIDDEN)
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                real = os.path.realpath(e.path)
                if real in inside:
                    unused.add(where, LINK_LOOP)
                    continue
                if not rel:
                    top.append(e.name)
                visit(Path(e.path), r, inside | {real})
            elif e.is_symlink() and not os.path.exists(e.path):
                unused.add(where, BROKEN_LINK)
            elif not is_image_name(e.name):
                unused.add(where, NOT_IMAGE)
            else:
                try:
                    regular, size = e.is_file(), e.stat().st_size
                except OSError as err:  # gone or unreadable since it was listed
                    unused.add(where, f"file that cannot be read ({err.strerror or err})")
                    continue
                if not regular:
                    unused.add(where, NOT_REGULAR)
                elif problem := member_problem(size):
                    skipped.append(Skip(str(root), name, problem))
                else:
                    files.append((name, Path(e.path)))

    visit(root, (), frozenset({os.path.realpath(root)}))
    return sorted(files, key=lambda t: t[0]), top


def read_archive(path: Path, unused: Tally, skipped: list[Skip], labeled: bool
                 ) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(name below the root, bytes) of every image member and the folders directly under the root.
    The root is the archive's one top folder when every member that is not hidden sits under it
    (never a hidden folder), else the archive itself; names stay as stored for unlabeled archives."""
    members = list(archive_entries(path))
    shown = [m for m in members if m[1] != UNSAFE and not is_hidden(m[0])]
    tops = {PurePosixPath(n).parts[0] for n, *_ in shown}
    strip = labeled and len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 or k == "dir" for n, k, *_ in shown)
    root = next(iter(tops)) if strip else None
    if strip:
        log.info(f"{path.name}: every member sits under {root}/, read as the root")
    files, top = [], set()
    for name, kind, data, problem in members:
        if kind == UNSAFE:
            unused.add(f"{path.name}/{name}", UNSAFE)
            continue
        parts = PurePosixPath(name).parts
        rel_parts = parts[1:] if root is not None and parts[0] == root else parts
        rel = "/".join(rel_parts)
        if len(rel_parts) > 1 or (kind == "dir" and rel_parts):
            if not rel_parts[0].startswith("."):
                top.add(rel_parts[0])  # a class folder, whatever it holds (as on disk)
        if kind == "dir":
            continue
        where = f"{path.name}/{name}"
        if kind != "file":
            unused.add(where, kind)
        elif is_hidden(name):
            unused.add(where, HIDDEN)
        elif not is_image_name(rel):
            unused.add(where, NOT_IMAGE)
        elif problem:
            skipped.append(Skip(path.name, name, problem))
        else:
            files.append((rel, data))
    return sorted(files, key=lambda t: t[0]), sorted(top)


def classes(where: str, files: list[tuple[str, object]], folders: list[str], unused: Tally,
            wanted: list[str] | None = None) -> tuple[list[str], list[tuple[str, str, object]]]:
    """(class names, sorted; (class, name, payload) of each image): a class is a folder directly
    under the root and owns every image below it. Stops with one line on a class with no image
    (unless ``wanted``, ``data.classes``, leaves it out) and on fewer than two classes."""
    found: dict[str, list] = {c: [] for c in folders}
    for name, payload in files:
        head, sep, _ = name.partition("/")
        if not sep:
            unused.add(f"{where}/{name}", OUTSIDE_CLASS)
        else:
            found.setdefault(head, []).append((name, payload))
    names = sorted(found)
    if wanted is not None:
        missing = [c for c in wanted if c not in found]
        if missing:
            raise ConfigError(f"data.classes: no class folder '{missing[0]}' in {where} (it has: "
                              f"{', '.join(names[:10]) or 'none'}{', ...' if len(names) > 10 else ''})")
        for c in names:
            if c not in wanted:
                unused.add(f"{where}/{c}", NOT_LISTED, len(found[c]))
        names = sorted(set(wanted))
    empty = [c for c in names if not found[c]]
    if empty:
        raise ConfigError(f"{where}: class folder '{empty[0]}' has no images"
                          + (f" ({len(empty) - 1} more like it)" if len(empty) > 1 else "")
                          + "; remove it, or list the classes to use in data.classes")
    if len(names) < 2:
        raise ConfigError(f"{where}: {len(names)} class folder{'' if len(names) == 1 else 's'} "
                          f"({', '.join(names) or 'none'}); a classifier needs two or more "
                          "(ImageFolder layout: <root>/<class>/<images, at any depth>)")
    twins = defaultdict(list)
    for c in names:
        twins[c.casefold()].append(c)
    clash = [v for v in twins.values() if len(v) > 1]
    if clash:
        log.warning(f"warning: {where}: class names that differ only by case are kept apart: "
                    + "; ".join(" / ".join(v) for v in clash))
    return names, [(c, n, p) for c in names for n, p in found[c]]
