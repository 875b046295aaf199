"""Reading each kind of image source into indexable (encoded bytes, label) items.

Kinds: a torchvision dataset by name, an ImageFolder directory, a ``.tar``/``.tar.gz`` holding an
ImageFolder tree, a directory or archive of unlabeled images in any layout; and existing
webdataset shards, which are indexed where they are (``index_pool``), never copied. Encoded sources keep their original bytes; decoded ones (torchvision arrays)
are stored as lossless PNG. Archives are read member by member and never extracted, so member
names cannot write anywhere.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.artifacts import sha256_file
from pipeline.config import ConfigError
from pipeline.data.bad_samples import Skip, Tally
from pipeline.data.image_folder import classes, read_archive, walk_folder
from pipeline.data.limits import member_problem
from pipeline.data.remote import fetch_command
from pipeline.data.shards import (
    IMAGE_KEYS,
    ShardError,
    expand_shards,
    index_images,
    read_shard,
)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# torchvision dataset name -> (class name, how its train/test splits are asked for)
TORCHVISION = {
    "fashionmnist": ("FashionMNIST", "train"),
    "mnist": ("MNIST", "train"),
    "kmnist": ("KMNIST", "train"),
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "svhn": ("SVHN", "split"),
}


@dataclass
class Source:
    """An indexable collection of encoded images with optional labels."""

    name: str
    labels: list[int] | None  # None for unlabeled sources
    class_names: list[str] | None
    get: Callable[[int], tuple[bytes, str]]  # index -> (encoded bytes, extension without dot)
    origin: Callable[[int], str]  # index -> where the item came from (path, archive member, index)
    size: int
    verify: bool = True  # decode each image at prepare time (False: bytes we encoded ourselves)
    skipped: list = field(default_factory=list)  # bad_samples.Skip met while listing the source
    unused: Tally = field(default_factory=Tally)  # inputs passed over on purpose (not images...)
    close: Callable[[], None] = lambda: None  # release open files (shard pools keep some open)


    def __len__(self) -> int:
        return self.size


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def is_torchvision_name(name: str) -> bool:
    return name.lower() in TORCHVISION


def data_roots(root: str | None) -> list[Path]:
    """Where torchvision files are looked for, in order."""
    repo = Path(__file__).resolve().parents[2]
    cands = [root, os.environ.get("NS_DATA_ROOT"), repo.parent / "shared" / "data",
             Path.cwd().parent / "shared" / "data", repo / "data"]
    out: list[Path] = []
    for c in cands:
        if c and Path(c).resolve() not in out:
            out.append(Path(c).resolve())
    return out


def _torchvision_dataset(name: str, train: bool, root: str | None, download: bool):
    import torchvision.datasets as tvd

    cls_name, split_kind = TORCHVISION[name.lower()]
    cls = getattr(tvd, cls_name)

    def make(r: Path, dl: bool):
        if split_kind == "split":
            return cls(str(r), split="train" if train else "test", download=dl)
        return cls(str(r), train=train, download=dl)

    roots = data_roots(root)
    for r in roots:
        try:
            return make(r, False)
        except (RuntimeError, FileNotFoundError, OSError):
            continue
    target = Path(root) if root else roots[-1]
    if download:
        try:
            return make(target, True)
        except Exception as e:  # network errors come in many types
            reason = f"download into {target} failed ({type(e).__name__}: {str(e)[:120]})"
    else:
        reason = "data.download=false"
    looked = ", ".join(str(r) for r in roots)
    raise ConfigError(
        f"dataset {cls_name} not found (looked in {looked}; {reason}). Put torchvision's files in one of "
        f"those, or point data.root=... or NS_DATA_ROOT at them.")


def archive_mirror(name: str, train: bool, root: str | None) -> Path | None:
    """``<data root>/<name>/{train,test}.tar.gz``: an ImageFolder archive of a torchvision dataset (as in
    ``../shared/data/cifar10``), used when torchvision's own files are absent, before any download."""
    for r in data_roots(root):
        p = r / name.lower() / ("train.tar.gz" if train else "test.tar.gz")
        if p.is_file():
            return p
    return None


def torchvision_source(name: str, train: bool, root: str | None, download: bool,
                       wanted: list[str] | None = None) -> Source:
    if wanted is not None:  # whichever copy is found: the archive mirror or torchvision's files
        raise ConfigError(f"data.classes: picks class folders of a folder or archive source, not of the "
                          f"torchvision dataset {name} (give the folder or archive itself as data.source)")
    try:
        ds = _torchvision_dataset(name, train, root, download=False)
    except ConfigError:
        mirror = archive_mirror(name, train, root)
        if mirror is not None:
            return archive_source(mirror, labeled=True)
        ds = _torchvision_dataset(name, train, root, download)
    labels = [int(t) for t in (getattr(ds, "targets", None) if getattr(ds, "targets", None) is not None
                               else ds.labels)]
    class_names = list(getattr(ds, "classes", None) or [str(i) for i in range(max(labels) + 1)])
    split = "train" if train else "test"

    def get(i: int) -> tuple[bytes, str]:
        img, _ = ds[i]
        return _png_bytes(img), "png"

    return Source(f"torchvision:{type(ds).__name__}:{split}", labels, class_names, get,
                  lambda i: f"{type(ds).__name__}/{split}/{i}", len(labels), verify=False)


def _ext(name: str) -> str:
    ext = Path(name).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _labeled(name: str, items: list, reader: Callable[[object], bytes], class_names: list[str], unused: Tally,
             skipped: list) -> Source:
    index = {c: i for i, c in enumerate(class_names)}
    labels = [index[c] for c, _, _ in items]
    return Source(name, labels, class_names, lambda i: (reader(items[i][2]), _ext(items[i][1])),
                  lambda i: str(items[i][1]), len(items), skipped=skipped, unused=unused)


def folder_source(path: Path, labeled: bool, wanted: list[str] | None = None) -> Source:
    """A directory: ImageFolder classes (``image_folder.classes``) when ``labeled``, else every image."""
    if not path.is_dir():
        raise ConfigError(f"directory not found: {path}")
    unused, skipped = Tally(), []
    files, folders = walk_folder(path, unused, skipped)
    if not files and not skipped:
        raise ConfigError(f"no images found under {path}")
    if labeled:
        names, items = classes(str(path), files, folders, unused, wanted)
        return _labeled(str(path), items, lambda p: Path(p).read_bytes(), names, unused, skipped)
    return Source(str(path), None, None, lambda i: (files[i][1].read_bytes(), _ext(files[i][0])),
                  lambda i: files[i][0], len(files), skipped=skipped, unused=unused)


def archive_source(path: Path, labeled: bool, wanted: list[str] | None = None) -> Source:
    """A .tar/.tar.gz, read member by member (never extracted); its one top folder is the root."""
    if not path.is_file():
        raise ConfigError(f"archive not found: {path}")
    unused, skipped = Tally(), []
    pairs, folders = read_archive(path, unused, skipped, labeled)
    if not pairs and not skipped:
        raise ConfigError(f"no images found in archive {path}")
    if labeled:
        names, items = classes(str(path), pairs, folders, unused, wanted)
        return _labeled(str(path), items, lambda b: b, names, unused, skipped)
    return Source(str(path), None, None, lambda i: (pairs[i][1], _ext(pairs[i][0])),
                  lambda i: pairs[i][0], len(pairs), skipped=skipped, unused=unused)


def labeled_source(spec: str, train: bool, root: str | None, download: bool,
                   wanted: list[str] | None = None) -> Source:
    """A labeled source from a torchvision name, ImageFolder directory or ImageFolder archive;
    ``wanted`` (``data.classes``) keeps those classes of a folder or archive."""
    if is_torchvision_name(spec):
        return torchvision_source(spec, train, root, download, wanted)
    path = Path(spec).expanduser()
    if is_archive(path):
        return archive_source(path, labeled=True, wanted=wanted)
    if path.is_dir():
        return folder_source(path, labeled=True, wanted=wanted)
    names = ", ".join(v[0] for v in TORCHVISION.values())
    raise ConfigError(f"data source '{spec}' is neither a torchvision dataset ({names}), "
                      f"an existing directory nor a .tar/.tar.gz archive")


def is_shard_pattern(spec: str) -> bool:
    """Existing shards: a brace pattern or ``::`` list of .tar / .tar.gz / .tgz files, or URLs."""
    return (spec.endswith(ARCHIVE_SUFFIXES) and ("{" in spec or "::" in spec)
            or spec.startswith(("http://", "https://", "s3://", "gs://", "pipe:")))


def iter_shard_images(pattern: str, skipped: list | None = None,
                      unused: Tally | None = None) -> Iterator[tuple[str, bytes, str]]:
    """(origin, image bytes, ext) of each sample in existing webdataset shards (``shards.read_shard``).

    What cannot be used (no image, a damaged shard's lost tail, an empty shard) is appended to
    ``skipped`` as ``Skip`` records (raised as a ConfigError when no list is given).
    """

    for url in expand_shards(pattern):
        name = Path(url).name
        for sample in read_shard(url, unused=unused):
            if isinstance(sample, Skip):
                if skipped is None:
                    raise ConfigError(f"shard {url}: {sample.reason}")
                skipped.append(sample)
                continue
            ext = next(k for k in IMAGE_KEYS if k in sample)
            yield f"{name}/{sample['__key__']}", sample[ext], _ext("x." + ext)


def index_pool(spec: str, hash_local: bool = False, cap: int | None = None,
               unused: Tally | None = None) -> tuple[list[dict], list[Skip], int]:
    """Existing webdataset shards used where they are, as the unlabeled pool: for each shard its
    location, sample count and, for a local file, its size (and sha256 when ``hash_local``), so
    later stages can tell it changed. Nothing is copied; keys and extra members stay as they are.

    Returns (manifest entries, what cannot be used as ``Skip`` records, usable samples). ``cap``
    (``data.max_unlabeled``) keeps whole shards until it is reached; the shards past it, and members of
    no sample, are counted in ``unused``.
    """
    entries: list[dict] = []
    skipped: list[Skip] = []
    seen: dict[str, str] = {}
    usable = 0
    urls = expand_shards(spec)
    unused = Tally() if unused is None else unused
    for n, url in enumerate(urls):
        if cap is not None and usable >= cap:
            unused.add(spec, "shard past data.max_unlabeled (not read)", len(urls) - n)
            break
        name = Path(url).name
        if name in seen:
            raise ConfigError(f"data.unlabeled: two pool shards are named {name} ({seen[name]} and {url}); "
                              "pseudo labels are filed by shard name, so names must be unique")
        seen[name] = url
        remote = fetch_command(url) is not None
        where = url if remote else str(Path(url.removeprefix("file://")).resolve())
        total, good = _count(where, remote, skipped, unused)
        if not total:
            continue
        usable += good
        entries.append({"file": name, "url": where, "samples": total,
                        "bytes": None if remote else Path(where).stat().st_size,
                        "sha256": sha256_file(where) if hash_local and not remote else None})
    if not usable:
        raise ConfigError(f"no images in shards {spec}" + (f" ({skipped[0].where}: {skipped[0].reason})"
                                                           if skipped else ""))
    return entries, skipped, usable


def _count(where: str, remote: bool, skipped: list[Skip], unused: Tally) -> tuple[int, int]:
    """(samples, samples with an image) of one shard; a plain local tar by its headers alone
    (``shards.index_images``), a gzipped or remote one by reading it (``shards.read_shard``)."""
    name, total, good = Path(where).name, 0, 0
    if not remote and not _is_gzip(Path(where)):
        try:
            for key, ext, _, size in index_images(where, unused):
                total += 1
                problem = "no image member" if ext is None else member_problem(size)
                if problem:
                    skipped.append(Skip(name, key, problem if ext is None else f"member: {problem}"))
                else:
                    good += 1
        except ShardError as e:
            skipped.append(Skip(name, f"after {e.after}" if e.after else "-", f"damaged tar: {e.reason}", 0))
        return total, good
    for sample in read_shard(where, unused=unused):
        if isinstance(sample, Skip):
            skipped.append(sample)
            total += sample.count if sample.reason.startswith(("no image", "member", "its members")) else 0
        else:
            total, good = total + 1, good + 1
    return total, good


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def unlabeled_source(spec: str) -> Source:
    """An unlabeled source to shard once: a directory or archive of images in any layout (existing
    shards are not a source: ``index_pool`` reads them where they are)."""
    path = Path(spec).expanduser()
    if is_archive(path):
        return archive_source(path, labeled=False)
    if path.is_dir():
        return folder_source(path, labeled=False)
    raise ConfigError(f"data.unlabeled '{spec}' is not 'rest', a directory, an archive or a shard pattern")
