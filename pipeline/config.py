"""Experiment configuration: typed sections, YAML loading, ``key=value`` overrides, validation.

One config describes a whole experiment; every stage reads the sections it needs. Errors are
``ConfigError`` (``errors.py``) with a message naming the offending key, so entry points print one line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import ConfigError

__all__ = ["ConfigError"]  # re-exported: config errors are raised where configs are read


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, **flags: bool) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, **flags}


# field metadata flags, the one place that says what a key means for what was made:
#   runtime: changes how fast a stage runs, never what it makes (a finished round ignores it)
#   per_round: a list gives one value per student round, the last repeating
RUNTIME = {"runtime": True}


@dataclass
class DataConfig:
    """Where images come from and how they are split into labeled / unlabeled / test shards."""

    source: str = "FashionMNIST"  # torchvision name, ImageFolder directory, or .tar/.tar.gz of one
    test_source: str | None = None  # for folder/archive sources; torchvision names use their test split
    unlabeled: str = "rest"  # "rest" of source, a directory/archive of images, or a shard brace pattern
    root: str | None = field(default=None, metadata=RUNTIME)  # where torchvision files live; else $NS_DATA_ROOT, ../shared/data, ./data
    download: bool = field(default=True, metadata=RUNTIME)  # let torchvision download when the files are not found
    labeled_per_class: int | None = field(default=100, metadata=_range(1))  # null: every image
    val_per_class: int = field(default=0, metadata=_range(0))
    seed: int = 0
    shard_size: int = field(default=5000, metadata=_range(1))
    max_unlabeled: int | None = field(default=None, metadata=_range(1))  # cap the pool (tests, quick runs)
    max_test: int | None = field(default=None, metadata=_range(1))
    # bad samples (undecodable, unlabeled, damaged shards) are skipped and counted; past this share
    # of a stage's samples the stage stops instead
    max_bad_share: float = field(default=0.01, metadata=_range(0, 1, runtime=True))


@dataclass
class ModelConfig:
    """Round 0's architecture and how students grow in later rounds."""

    arch: str = "resnet10t"
    pretrained: bool | str = False  # True: timm's weights; a path: a local weights file
    image_size: int | None = field(default=None, metadata=_range(8))  # default: the data's own size
    ladder: str | None = "resnet"  # named family ladder for students (see models.LADDERS)
    students: list[str] | None = None  # explicit student per round 1, 2, ...; the last one repeats


@dataclass
class RandAugmentConfig:
    enabled: bool = True
    n: int = field(default=2, metadata=_range(0))
    m: int | list[int] = field(default=9, metadata=_range(0, 30, per_round=True))


@dataclass
class TrainConfig:
    """One training run (teacher, student or fine-tune): optimisation, augmentation and noise."""

    epochs: int | list[int] = field(default=30, metadata=_range(1, per_round=True))
    batch_size: int = field(default=128, metadata=_range(1))
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = field(default=2e-3, metadata=_range(0, lo_open=True))
    weight_decay: float = field(default=0.05, metadata=_range(0))
    momentum: float = field(default=0.9, metadata=_range(0, 1))
    warmup_epochs: float = field(default=1.0, metadata=_range(0))
    label_smoothing: float = field(default=0.1, metadata=_range(0, 1))
    grad_accum: int = field(default=1, metadata=_range(1))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU and bf16-capable CPUs
    channels_last: bool = False
    # torch.compile the model: true (inductor) or a backend name; slow first steps
    compile: bool | str = field(default=False, metadata=RUNTIME)
    ema: bool = False
    ema_decay: float = field(default=0.999, metadata=_range(0, 1))
    workers: int = field(default=1, metadata=_range(0, runtime=True))
    crop_pad: int = field(default=2, metadata=_range(0))  # random crop with this padding (0: off)
    hflip: bool = True
    drop_rate: float = field(default=0.0, metadata=_range(0, 1))
    drop_path_rate: float = field(default=0.0, metadata=_range(0, 1))
    randaugment: RandAugmentConfig = field(default_factory=lambda: RandAugmentConfig(enabled=False))
    erasing: float = field(default=0.0, metadata=_range(0, 1))  # probability of erasing one random box (Cutout)
    # true: crop_pad, hflip and erasing run on each uint8 batch (tensor ops, an own draw per image)
    # instead of per image on PIL; images are decoded straight to tensors (no PIL) unless RandAugment is on
    batch_augment: bool = False


@dataclass
class StudentConfig(TrainConfig):
    """A noised student: training settings plus how pseudo labels are used."""

    drop_rate: float | list[float] = field(default=0.3, metadata=_range(0, 1, per_round=True))
    drop_path_rate: float | list[float] = field(default=0.1, metadata=_range(0, 1, per_round=True))
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    threshold: float = field(default=0.3, metadata=_range(0, 1))
    balance: bool = True
    per_class: int | None = field(default=None, metadata=_range(1))  # balance target; default: mean kept
    soft: bool = True
    temperature: float = field(default=1.0, metadata=_range(0, lo_open=True))
    unlabeled_ratio: int = field(default=3, metadata=_range(1))  # unlabeled batch = ratio x batch_size
    unlabeled_weight: float = field(default=1.0, metadata=_range(0))
    init_from_teacher: bool = False  # start from the teacher's weights (same architecture or a deeper one of its family)
    finetune_epochs: int = field(default=0, metadata=_range(0))
    finetune_lr: float = field(default=1e-4, metadata=_range(0, lo_open=True))


@dataclass
class DistillConfig(TrainConfig):
    """Knowledge distillation of a trained model into a smaller one (``stages/distill.py``)."""

    name: str = "small"  # output: <experiment>/distilled/<name>/
    teacher: str | None = None  # a model directory; default: the experiment's last finished round
    arch: str = "resnet10t"  # the student: any timm model name
    channels: list[int] | None = None  # ResNet-family and cnn32 students: stage widths, e.g. thinner
    mode: Literal["online", "offline"] = "online"
    temperature: float = field(default=4.0, metadata=_range(0, lo_open=True))
    alpha: float = field(default=0.9, metadata=_range(0, 1))  # labeled: alpha KD + (1 - alpha) CE
    mixup: float = field(default=0.0, metadata=_range(0))  # online only: Beta(a, a) mixup; 0 = off
    labels_only: bool = True  # also train the student on the labels alone, same budget, to compare
    epochs: int | list[int] = field(default=10, metadata=_range(1))
    batch_size: int = field(default=256, metadata=_range(1))


@dataclass
class PseudoLabelConfig:
    batch_size: int = field(default=512, metadata=_range(1, runtime=True))
    workers: int = field(default=1, metadata=_range(0, runtime=True))
    tta: bool = False  # average each image's and its mirror's probabilities (no noise; 2x the cost)
    # auto: bf16 on GPU, fp32 on CPU (exact); bf16 also runs on bf16-capable CPUs. Recorded in each
    # file's metadata; finished files are kept when it changes, like batch size.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata=RUNTIME)
    channels_last: bool = field(default=False, metadata=RUNTIME)
    compile: bool | str = field(default=False, metadata=RUNTIME)  # torch.compile the teacher: true or a backend name


@dataclass
class EvaluateConfig:
    """How models are measured; never what they are, so changing it never touches a finished round."""

    batch_size: int = field(default=512, metadata=_range(1))
    workers: int = field(default=1, metadata=_range(0))
    test: bool = True  # false: rounds are scored on the validation split only (a recipe search never reads the test set)
    ece_bins: int = field(default=15, metadata=_range(1))
    robustness: bool = True  # corruptions and perturbations (``make report``; ``make iterate`` skips them)
    subset: int | None = field(default=1000, metadata=_range(1))  # seeded test images for robustness; null: all
    seed: int = 0
    frames: int = field(default=10, metadata=_range(2))  # frames per perturbation sequence
    chunk: int = field(default=250, metadata=_range(1))  # images per robustness work unit (seeds follow units)
    reference: str | None = None  # model dir that normalises mCE and mFR; default: the round-0 teacher
    audit_per_class: int = field(default=6, metadata=_range(0))  # kept and rejected images per class in grids


@dataclass
class Config:
    name: str = ""  # experiment name; default: the config file's stem
    seed: int = 0
    runs_dir: str = field(default="runs", metadata=RUNTIME)
    # `make iterate BUDGET=60m`: plan each round's epochs from its measured img/s so the run ends within
    # this time (60m, 1.5h, 900s); null: the fixed schedules of the config (reproducible)
    budget: str | float | None = field(default=None, metadata=RUNTIME)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def flagged(cls: type, flag: str, prefix: str = "") -> set[str]:
    """Dotted keys of the config dataclass ``cls`` (nested sections included) whose field metadata sets ``flag``."""
    keys, hints = set(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= flagged(hints[f.name], flag, f"{prefix}{f.name}.")
        elif f.metadata.get(flag):
            keys.add(prefix + f.name)
    return keys


RUNTIME_KEYS = flagged(Config, "runtime")  # how fast, never what: finished work ignores them
PER_ROUND_KEYS = {k for k in flagged(Config, "per_round") if k.startswith("student.")}
COMPILE_KEYS = ("teacher.compile", "student.compile", "pseudo_label.compile", "distill.compile")


# ---------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if _is_union(tp):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        if isinstance(value, bool) and ("no" if value is False else "yes") in typing.get_args(tp):
            return "no" if value is False else "yes"  # YAML 1.1 reads a bare no/yes as a boolean
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty {_type_name(tp)}, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str) and value:
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _check_range(value: Any, meta: dict, key: str) -> None:
    if not meta or value is None:
        return
    values = value if isinstance(value, list) else [value]
    lo, hi = meta.get("lo"), meta.get("hi")
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
            op = ">" if meta.get("lo_open") else ">="
            raise ConfigError(f"{key}: must be {op} {lo}, got {v}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: must be <= {hi}, got {v}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known keys here: {known})")
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        coerced = _coerce(value, hints[name], key)
        _check_range(coerced, dict(fields[name].metadata), key)
        kwargs[name] = coerced
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed value); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides and validate the result."""
    raw: dict = {}
    stem = "default"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        stem = p.stem
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw)
    if not cfg.name:
        cfg.name = stem
    if cfg.budget is not None:
        parse_duration(cfg.budget)
    if "/" in cfg.name or cfg.name.startswith("."):
        raise ConfigError(f"name: '{cfg.name}' must be a plain directory name")
    for key in COMPILE_KEYS:
        section, field_name = key.split(".")
        value = getattr(getattr(cfg, section), field_name)
        if isinstance(value, str) and value != "inductor":
            from pipeline.modeling.precision import (
                check_compile,  # imports torch: only for a backend named by hand
            )

            check_compile(value, key)
    return cfg


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float, key: str = "budget") -> float:
    """``"60m"``, ``"1.5h"``, ``"900s"`` or a number of seconds -> seconds (> 0)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not m or isinstance(text, bool):
        raise ConfigError(f"{key}: expected a duration like 60m, 1.5h or 900s, got {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ConfigError(f"{key}: must be a positive duration, got {text!r}")
    return seconds


def changed_keys(made: dict, now: dict) -> list[str]:
    """The keys of ``now`` whose value differs from what made a finished artifact (sorted). Keys only
    the artifact has (since removed, or now runtime keys) do not count."""
    return sorted(k for k in now if made.get(k) != now[k])


def per_round(value, round_index: int):
    """Value for student round k (1-based) from a scalar or a per-round list (last repeats)."""
    if isinstance(value, list):
        return value[min(round_index - 1, len(value) - 1)]
    return value


def for_round(cfg: TrainConfig, round_index: int) -> TrainConfig:
    """A copy of ``cfg`` with every per-round list resolved to round ``round_index``'s value."""
    ra = dataclasses.replace(cfg.randaugment, m=per_round(cfg.randaugment.m, round_index))
    return dataclasses.replace(cfg, epochs=per_round(cfg.epochs, round_index), randaugment=ra,
                               drop_rate=per_round(cfg.drop_rate, round_index),
                               drop_path_rate=per_round(cfg.drop_path_rate, round_index))
