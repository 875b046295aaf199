"""The prepared dataset as every stage reads it (``prepare.py`` writes it).

``PreparedData``: a data directory and its manifest, verified against the shards' hashes when
opened; the shards, row counts and keys of each split; the class names. ``Preprocessing``: what a
model takes as input (mode, size, normalisation), from the data's statistics or from a model
directory's config.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import read_json, sha256_file, short_hash
from pipeline.config import RUNTIME_KEYS, Config, DataConfig, to_dict
from pipeline.data.image_folder import CLASS_RULE
from pipeline.errors import ConfigError, DataError

MANIFEST = "manifest.json"
TRUTH = "unlabeled-truth.parquet"
ORIGINS = "sources.parquet"  # key, split, where each sample came from (path, archive member, index)


@dataclass(frozen=True)
class Preprocessing:
    """A model's input: image mode ("L" or "RGB"), square size, per-channel mean and std."""

    mode: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return 1 if self.mode == "L" else 3

    def as_dict(self) -> dict:
        return {"mode": self.mode, "size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def of(cls, mode: str, size: int, mean, std) -> Preprocessing:
        return cls(mode, int(size), tuple(float(v) for v in mean), tuple(float(v) for v in std))


def data_identity(data: DataConfig) -> dict:
    """What the prepared data depends on: the data section without its runtime keys."""
    runtime = {k.split(".", 1)[1] for k in RUNTIME_KEYS if k.startswith("data.")}
    return {k: v for k, v in to_dict(data).items() if k not in runtime} | {"class_rule": CLASS_RULE}


def data_dir(cfg: Config) -> Path:
    """``<runs_dir>/data/<source>-<hash>``: shared by experiments with the same data config."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(cfg.data.source).name.split(".")[0]).strip("_").lower()
    return Path(cfg.runs_dir) / "data" / f"{slug or 'data'}-{short_hash(data_identity(cfg.data))}"


def shard_location(directory: Path, entry: dict) -> Path | str:
    """Where a manifest's shard is: in the data directory, or, for a pool read in place, where it
    was found (a local path, or a URL as a string)."""
    url = entry.get("url")
    if url is None:
        return directory / entry["file"]
    return url if "://" in url else Path(url)


def shard_matches(directory: Path, entry: dict, verify: str = "size") -> bool:
    """Whether a shard is still the one its manifest describes: its size, and its sha256 when
    ``verify`` is "sha256" and the manifest has one. A remote pool shard is taken as it is: there
    is no cheap way to tell, and objects in a bucket are expected to stay put."""
    loc = shard_location(directory, entry)
    if isinstance(loc, str):
        return True
    if not loc.is_file() or (entry.get("bytes") is not None and loc.stat().st_size != entry["bytes"]):
        return False
    return not (verify == "sha256" and entry.get("sha256") and sha256_file(loc) != entry["sha256"])


@dataclass
class PreparedData:
    """A prepared data directory and its manifest."""

    dir: Path
    manifest: dict

    @classmethod
    def open(cls, cfg: Config) -> PreparedData:
        """The prepared data of ``cfg`` with every shard checked against its manifest's sha256, or a
        UserError saying what is wrong and how to mend it."""
        d = data_dir(cfg)
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise ConfigError(f"prepared data not found in {d}: run stages/prepare_data.py with the same config")
        manifest = read_json(mpath)
        shards = [(shard_location(d, sh), sh) for split in manifest["splits"].values() for sh in split["shards"]]
        stats = [(str(p), sh["sha256"], (st.st_size, st.st_mtime_ns, st.st_ino) if (st := _stat(p)) else None)
                 for p, sh in shards]
        if _VERIFIED.get(d) != stats:  # hashed once per process while no file changes (iterate asks per stage)
            for p, sh in shards:
                if not shard_matches(d, sh, "sha256"):
                    what = ("a pool shard read in place: it was changed or removed after prepare; restore it or "
                            "prepare a new pool" if "url" in sh else "it was changed or damaged after prepare; rerun "
                            "stages/prepare_data.py with the same config to rebuild it")
                    raise DataError(f"shard {p} is missing or does not match its manifest: {what}")
            _VERIFIED[d] = stats
        return cls(d, manifest)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @functools.cached_property
    def manifest_sha256(self) -> str:
        return sha256_file(self.dir / MANIFEST)

    @property
    def truth(self) -> Path:
        """The pool's hidden labels (a diagnostic for pseudo-label accuracy), when the source had them."""
        return self.dir / TRUTH

    def count(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, {}).get("count", 0) or 0)

    def shards(self, split: str) -> list[Path | str]:
        """The split's shards in order: paths (in the data directory, or a pool's own) or URLs."""
        return [shard_location(self.dir, s) for s in self.manifest["splits"].get(split, {}).get("shards", [])]

    def rows(self, split: str) -> dict[str, int]:
        """Shard file name -> sample count, as the manifest records it."""
        return {s["file"]: s["samples"] for s in self.manifest["splits"].get(split, {}).get("shards", [])}

    def keys(self, split: str) -> Iterator[tuple[str, list[str]]] | None:
        """(shard file name, its keys in order) for each shard of ``split``, streamed from the origins
        table one shard at a time (its rows are grouped by shard); None for data made without it."""
        return split_keys(self.dir, self.manifest, split)

    def preprocessing(self, image_size: int | None = None) -> Preprocessing:
        """The input a model trained on this data takes (``model.image_size`` overrides the size)."""
        img = self.manifest["image"]
        return Preprocessing.of(img["mode"], image_size or img["size"][0], img["mean"], img["std"])


def _stat(p: Path | str):
    return p.stat() if isinstance(p, Path) and p.is_file() else None


_VERIFIED: dict[Path, list] = {}  # data dir -> the shard stats it was last verified with


def split_keys(directory: Path, manifest: dict, split: str) -> Iterator[tuple[str, list[str]]] | None:
    """``PreparedData.keys`` for a directory and manifest (prepare reads them before it is finished)."""
    path = directory / ORIGINS
    entry = manifest.get("origins")
    if not path.is_file() or entry is None or sha256_file(path) != entry["sha256"]:
        return None
    pf = pq.ParquetFile(path)
    if "shard" not in pf.schema_arrow.names:
        return None

    def shards() -> Iterator[tuple[str, list[str]]]:
        current, keys, seen = None, [], set()
        for batch in pf.iter_batches(batch_size=65536, columns=["key", "split", "shard"]):
            batch = batch.filter(pc.equal(batch.column("split"), split))
            for key, shard in zip(batch.column("key").to_pylist(), batch.column("shard").to_pylist(), strict=True):
                if shard != current:
                    if current is not None:
                        yield current, keys
                    if shard in seen:
                        raise ConfigError(f"{path}: rows of shard {shard} are not together; rerun prepare")
                    current, keys = shard, []
                    seen.add(shard)
                keys.append(key)
        if current is not None:
            yield current, keys

    return shards()
