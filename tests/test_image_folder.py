"""Classes exactly as torchvision's ImageFolder defines them, checked against ImageFolder itself on
seeded random trees (depth, links to files and folders, empty and text-only folders, case-only
twins, spaces and unicode), as folders and as .tar.gz archives; and the stated differences (hidden
entries, broken links, loops, a single class) on trees that have them. In every case each input is
used, bad or counted as unused."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, stage, tiny_overrides
from torchvision.datasets import ImageFolder

from pipeline.config import ConfigError
from pipeline.data import archives
from pipeline.data import image_folder as imf
from pipeline.data.bad_samples import Tally
from pipeline.data.sources import archive_source

NAMES = ["cat", "Cat", "dog", "2019", "a b", "ünï", "x", "deep", "ALPHA", "alpha", "e f", "日本"]
EXTS = [".png", ".jpg", ".JPEG", ".webp", ".bmp"]
TREES = 200


def _ops(seed: int) -> tuple[list[tuple], bool]:
    """A random tree as a list of (kind, path, target): ``kind`` is dir, file, text, link_file,
    link_dir, or a special (hidden, hidden_dir, broken, loop). Paths are relative to the tree's
    folder, which holds ``root`` (the data) and ``ext`` (link targets outside it, with no links)."""
    rng = np.random.default_rng(seed)
    special = seed % 5 == 0
    ops: list[tuple] = []
    files: list[str] = []
    for j in range(rng.integers(1, 3)):
        ops.append(("dir", f"ext/e{j}", None))
        for i in range(rng.integers(0, 3)):
            files.append(f"ext/e{j}/f{i}{EXTS[i % 5]}")
            ops.append(("file", files[-1], None))
    outside = [op[1] for op in ops if op[0] == "dir"]

    def fill(d: str, depth: int) -> None:
        ops.append(("dir", d, None))
        for i in range(rng.integers(0, 4)):
            files.append(f"{d}/img {i}{EXTS[rng.integers(5)]}")
            ops.append(("file", files[-1], None))
        if rng.random() < 0.2:
            ops.append(("text", f"{d}/notes.txt", None))
        if rng.random() < 0.15 and files:
            ops.append(("link_file", f"{d}/ln{depth}.png", files[rng.integers(len(files))]))
        if rng.random() < 0.1:
            ops.append(("link_dir", f"{d}/linked", outside[rng.integers(len(outside))]))
        if special:
            kind = ["hidden", "hidden_dir", "broken", "loop", None][rng.integers(5)]
            if kind:
                ops.append((kind, d, "root" if kind == "loop" and rng.random() < 0.5 else d))
        if depth < 3:
            for k in range(rng.integers(0, 3 if depth else 2)):
                fill(f"{d}/s{k}", depth + 1)

    made_classes: list[str] = []
    for c in rng.choice(NAMES, size=rng.integers(1, 5), replace=False):
        fill(f"root/{c}", 0 if rng.random() < 0.8 else 3)  # 3: no subfolders
        if made_classes and rng.random() < 0.2:  # a link to an earlier class: its images count here too
            ops.append(("link_dir", f"root/{c}/sibling", f"root/{made_classes[rng.integers(len(made_classes))]}"))
        made_classes.append(c)
    if special and rng.random() < 0.5:  # a loop through a folder outside the root, which only it links to
        ops += [("dir", "ext/loop", None), ("link_dir", f"root/{made_classes[0]}/out", "ext/loop"),
                ("loop", "ext/loop", f"root/{made_classes[0]}")]
    if rng.random() < 0.2:
        ops.append(("file", "root/top.png", None))  # an image outside any class
    if rng.random() < 0.15:
        ops.append(("link_dir", "root/linked class", outside[0]))
    return ops, special


def _build(ops: list[tuple], base: Path, with_special: bool) -> Counter:
    """The tree on disk; returns the special entries made, by kind."""
    made: Counter = Counter()
    for kind, rel, target in ops:
        p = base / rel
        if kind == "dir":
            p.mkdir(parents=True, exist_ok=True)
        elif kind == "file":
            p.write_bytes(b"\x89PNG not decoded by a listing")
        elif kind == "text":
            p.write_text("not an image")
        elif kind == "link_file":
            p.symlink_to(base / target)
        elif kind == "link_dir":
            p.symlink_to(base / target, target_is_directory=True)
        elif with_special:
            made[kind] += 1
            if kind == "hidden":
                (p / ".DS_Store.png").write_bytes(b"x")
            elif kind == "hidden_dir":
                (p / ".cache").mkdir()
                (p / ".cache" / "a.png").write_bytes(b"x")
            elif kind == "broken":
                (p / "gone.png").symlink_to(base / "nowhere.png")
            elif kind == "loop":
                (p / "up").symlink_to(base / target, target_is_directory=True)
    return made


def _inputs(root: Path) -> int:
    """Every non-folder entry met walking with links followed, counting as one a hidden entry (file
    or folder) and a link to a folder the walk is inside of: what must be used, bad or unused."""

    def walk(d: Path, inside: frozenset) -> int:
        n = 0
        for e in os.scandir(d):
            if e.name.startswith(".") or not e.is_dir():
                n += 1
            elif os.path.realpath(e.path) in inside:
                n += 1
            else:
                n += walk(Path(e.path), inside | {os.path.realpath(e.path)})
        return n

    return walk(root, frozenset({os.path.realpath(root)}))


def _ours(root: Path, archive: bool = False) -> tuple[list[str], Counter, Tally, int]:
    unused, skipped = Tally(), []
    if archive:
        files, folders = imf.read_archive(root, unused, skipped, labeled=True)
    else:
        files, folders = imf.walk_folder(root, unused, skipped)
    names, items = imf.classes(str(root), files, folders, unused)
    return names, Counter(c for c, _, _ in items), unused, len(items) + len(skipped)


def _torchvision(root: Path) -> tuple[list[str], Counter] | None:
    try:
        ds = ImageFolder(str(root), loader=lambda p: p)
    except FileNotFoundError:
        return None
    return ds.classes, Counter(ds.classes[t] for t in ds.targets)


@pytest.mark.parametrize("chunk", range(4))
def test_classes_and_counts_equal_torchvisions_on_random_trees(tmp_path, chunk):
    compared = refused = 0
    for seed in range(chunk, TREES, 4):
        ops, special = _ops(seed)
        tree = tmp_path / f"t{seed}"
        made = _build(ops, tree, with_special=special)
        root = tree / "root"
        oracle_tree = tree if not special else tmp_path / f"clean{seed}"
        if special:
            _build(ops, oracle_tree, with_special=False)
        expected = _torchvision(oracle_tree / "root")
        try:
            ours = _ours(root)
        except ConfigError as e:
            n_classes = len(expected[0]) if expected else None
            assert expected is None or n_classes < 2, (seed, str(e), expected)
            refused += 1
            continue
        assert expected is not None, (seed, ours[:2])
        names, counts, unused, used = ours
        assert (names, counts) == expected, seed
        assert used + unused.count == _inputs(root), (seed, unused.reasons)
        for kind, reason in (("hidden", imf.HIDDEN), ("broken", imf.BROKEN_LINK), ("loop", imf.LINK_LOOP)):
            assert unused.reasons.get(reason, 0) >= made[kind], (seed, unused.reasons, made)
        assert unused.reasons.get(imf.HIDDEN, 0) >= made["hidden"] + made["hidden_dir"]  # twice via a link
        compared += 1
        if not made["loop"] and not made["broken"]:
            # the same tree as an archive under one top folder, links dereferenced: the same classes
            arc = tmp_path / f"t{seed}.tar.gz"
            with tarfile.open(arc, "w:gz", dereference=True) as tf:
                tf.add(root, arcname="top")
            a_names, a_counts, a_unused, a_used = _ours(arc, archive=True)
            assert (a_names, a_counts) == (names, counts), seed
            with tarfile.open(arc) as tf:
                members = sum(not m.isdir() for m in tf.getmembers())
            assert a_used + a_unused.count == members, seed
    assert compared >= 10 and refused >= 3, (compared, refused)


def test_links_inside_an_archive_are_counted_as_unused(tmp_path):
    ops, _ = _ops(7)
    _build(ops, tmp_path / "t", with_special=False)
    arc = tmp_path / "links.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:  # links stored as links
        tf.add(tmp_path / "t" / "root", arcname="top")
        info = tarfile.TarInfo("top/dog/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tf.addfile(info)
    unused, skipped = Tally(), []
    files, folders = imf.read_archive(arc, unused, skipped, labeled=True)
    with tarfile.open(arc) as tf:
        members = tf.getmembers()
    links = sum(m.issym() or m.islnk() for m in members)
    assert links >= 1 and unused.reasons[archives.ARCHIVE_LINK] == links
    assert len(files) + unused.count == sum(not m.isdir() for m in members)


def test_a_nested_layout_keeps_the_top_folder_as_the_class(tmp_path):
    for c in ("cat", "dog"):
        for year in ("2019", "2020"):
            (tmp_path / c / year).mkdir(parents=True)
            (tmp_path / c / year / "a.png").write_bytes(b"x")
    names, counts, _, _ = _ours(tmp_path)
    assert names == ["cat", "dog"] and counts == Counter({"cat": 2, "dog": 2})


def test_a_folder_loop_is_not_followed_and_counted(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "1.png").write_bytes(b"x")
    (tmp_path / "a" / "back").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "b" / "self").symlink_to(tmp_path / "b", target_is_directory=True)
    names, counts, unused, used = _ours(tmp_path)
    assert counts == Counter({"a": 1, "b": 1}) and unused.reasons == {imf.LINK_LOOP: 2}


def test_data_classes_picks_folders_and_names_what_is_wrong(tmp_path):
    for c, n in (("cat", 2), ("dog", 1), ("empty", 0), ("notes", 0)):
        (tmp_path / c).mkdir()
        for i in range(n):
            (tmp_path / c / f"{i}.png").write_bytes(b"x")
    (tmp_path / "notes" / "readme.txt").write_text("text only")
    unused, skipped = Tally(), []
    files, folders = imf.walk_folder(tmp_path, unused, skipped)
    with pytest.raises(ConfigError, match="class folder 'empty' has no images"):
        imf.classes("src", files, folders, Tally())
    names, items = imf.classes("src", files, folders, unused, wanted=["dog", "cat"])
    assert names == ["cat", "dog"] and len(items) == 3 and unused.count == 1  # notes/readme.txt
    with pytest.raises(ConfigError, match="no class folder 'cow'"):
        imf.classes("src", files, folders, Tally(), wanted=["cat", "cow"])
    with pytest.raises(ConfigError, match="1 class folder .cat.; a classifier needs two"):
        imf.classes("src", [("cat/0.png", None)], ["cat"], Tally())


def _nested(root: Path, rng: np.random.Generator) -> int:
    """cat/2019/*.png and dog/2019/*.png (+ 2020), a hidden file, a broken link, a text file: the
    layout the parent-folder rule read as one class "2019". Returns the number of inputs."""
    for c, label in (("cat", 0), ("dog", 1), ("cow", 2)):
        for year in ("2019", "2020"):
            (root / c / year).mkdir(parents=True)
            for i in range(8):
                make_image(label, rng).save(root / c / year / f"{i}.png")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "dog" / "2019" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "cow" / "notes.txt").write_text("text")
    return 3 * 2 * 8 + 3


@pytest.mark.parametrize("layout", ["folder", "tar", "tar.gz"])
def test_prepare_takes_the_folder_under_the_root_as_the_class(tmp_path, layout):
    rng = np.random.default_rng(0)
    train, test = tmp_path / "train", tmp_path / "test"
    inputs = _nested(train, rng)
    test_inputs = _nested(test, rng)
    source = train
    if layout != "folder":
        source = tmp_path / f"train.{layout}"  # the broken link becomes a link member: unused too
        with tarfile.open(source, "w:gz" if layout == "tar.gz" else "w") as tf:
            tf.add(train, arcname="train")
    runs = tmp_path / "runs"
    stage("prepare_data.py", f"runs_dir={runs}", f"data.source={source}", f"data.test_source={test}",
          "data.labeled_per_class=4", "data.val_per_class=2")
    (manifest,) = (runs / "data").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["class_names"] == ["cat", "cow", "dog"]
    used = sum(s["count"] for s in m["splits"].values())
    assert used + m["bad_samples"]["skipped"] + m["unused"]["count"] == inputs + test_inputs
    assert m["splits"]["test"]["count"] == 48 and m["unused"]["reasons"][imf.HIDDEN] == 2
    # data.classes keeps two of them; the third's images are counted as unused
    runs = tmp_path / "runs2"
    stage("prepare_data.py", f"runs_dir={runs}", f"data.source={source}", f"data.test_source={test}",
          "data.labeled_per_class=4", "data.val_per_class=2", "data.classes=[dog,cat]")
    (manifest,) = (runs / "data").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["class_names"] == ["cat", "dog"] and m["unused"]["reasons"][imf.NOT_LISTED] == 32


def test_prepare_stops_on_an_empty_class_or_a_single_one(tmp_path):
    rng = np.random.default_rng(1)
    train = tmp_path / "train"
    _nested(train, rng)
    (train / "empty").mkdir()
    r = stage("prepare_data.py", f"runs_dir={tmp_path / 'runs'}", f"data.source={train}",
              f"data.test_source={train}", check=False)
    assert r.returncode == 2 and "class folder 'empty' has no images" in r.stderr.strip().splitlines()[-1]
    one = tmp_path / "one"
    (one / "cat" / "2019").mkdir(parents=True)
    make_image(0, rng).save(one / "cat" / "2019" / "0.png")
    r = stage("prepare_data.py", f"runs_dir={tmp_path / 'runs'}", f"data.source={one}", f"data.test_source={one}",
              check=False)
    assert r.returncode == 2 and "a classifier needs two or more" in r.stderr.strip().splitlines()[-1]


def test_rounds_made_on_data_listed_by_an_earlier_rule_are_refused(tiny_data, tmp_path):
    ov = tiny_overrides(tiny_data, tmp_path / "runs", name="old") + ["teacher.epochs=1"]
    stage("iterate.py", "round=0", *ov)
    card_path = tmp_path / "runs" / "old" / "round-0" / "card.json"
    card = json.loads(card_path.read_text())
    card["parents"]["data_dir"] = str(tmp_path / "runs" / "data" / "train-0123456789")  # another rule's hash
    card_path.write_text(json.dumps(card))
    r = stage("iterate.py", "round=0", *ov, check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "give a new name" in last and "train-0123456789" in last


def _tar(path: Path, members: dict[str, bytes | None]) -> Path:
    """An archive of ``members`` (None: a folder member), in the given order."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("members,classes_or_error", [
    # classes at the archive's root: no top folder to drop
    ({"cat/1.png": b"x", "dog/a/2.png": b"x"}, ["cat", "dog"]),
    # one top folder beside macOS's hidden entries: the top folder is still the root
    ({"._data": b"x", ".DS_Store": b"x", "data/cat/1.png": b"x", "data/dog/2.png": b"x"}, ["cat", "dog"]),
    # a hidden top folder is never the root: all of it is hidden
    ({".data/cat/1.png": b"x", ".data/dog/2.png": b"x"}, "no images found in archive"),
    # no folder members, a class of text only: refused as the same folder on disk is
    ({"t/cat/1.png": b"x", "t/dog/2.png": b"x", "t/notes/a.txt": b"x"}, "class folder 'notes' has no images"),
    # a folder member of an otherwise empty class
    ({"t/": None, "t/cat/1.png": b"x", "t/dog/2.png": b"x", "t/empty/": None}, "class folder 'empty' has no images"),
    # unsafe folder and file members: the files counted, the folders are no inputs
    ({"../up/": None, "../up/x.png": b"x", "t/cat/1.png": b"x", "t/dog/2.png": b"x"}, ["cat", "dog"]),
])
def test_an_archive_is_read_from_its_one_top_folder_by_the_same_rule(tmp_path, members, classes_or_error):
    arc = _tar(tmp_path / "a.tar.gz", members)
    inputs = sum(d is not None for d in members.values())
    if isinstance(classes_or_error, str):
        with pytest.raises(ConfigError, match=classes_or_error):
            archive_source(arc, labeled=True)
        return
    names, counts, unused, used = _ours(arc, archive=True)
    assert names == classes_or_error and used + unused.count == inputs, unused.reasons


def test_the_listing_rule_is_part_of_the_prepared_datas_identity(tiny_data, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.data import dataset

    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "runs"))
    before = dataset.data_dir(cfg).name
    monkeypatch.setattr(dataset, "CLASS_RULE", "another rule")
    assert dataset.data_dir(cfg).name != before


def test_an_extension_torchvision_does_not_read_is_the_one_stated_difference(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c / "deep").mkdir(parents=True)
        (tmp_path / c / "1.png").write_bytes(b"x")
        (tmp_path / c / "deep" / "anim.gif").write_bytes(b"GIF89a")  # ours reads GIF, ImageFolder does not
    names, counts, unused, used = _ours(tmp_path)
    tv_names, tv_counts = _torchvision(tmp_path)
    assert names == tv_names and counts == tv_counts + Counter({"cat": 1, "dog": 1})
