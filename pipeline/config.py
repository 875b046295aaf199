"""Experiment configuration: typed sections, YAML loading, ``key=value`` overrides, validation.

One config describes a whole experiment; every stage reads the sections it needs. Errors are
``ConfigError`` (``errors.py``) with a message naming the offending key, so entry points print one line.
"""

from __future__ import annotations

import dataclasses
import math
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


def _k(default: Any, help: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
       runtime: bool = False, per_round: bool = False) -> Any:
    """A config key: its default, a one-line meaning (``--help`` lists it) and what validation and
    the resume checks need to know (range; ``runtime``: changes how fast a stage runs, never what it
    makes, so finished work ignores it; ``per_round``: a list gives one value per student round, the
    last repeating)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "runtime": runtime, "per_round": per_round})


@dataclass
class DataConfig:
    """Where images come from and how they are split into labeled / unlabeled / test shards."""

    source: str = _k("FashionMNIST", "torchvision dataset name, ImageFolder directory, or .tar/.tar.gz of one")
    test_source: str | None = _k(None, "test images for folder/archive sources (torchvision names use their test split)")
    unlabeled: str = _k("rest", "the pool: 'rest' of source, a directory/archive of images, or a shard brace pattern")
    classes: list[str] | None = _k(None, "class folders to use of a folder or archive source (and its test source); "
                                         "the others are counted as unused (null: every class folder)")
    root: str | None = _k(None, "where torchvision files live; else $NS_DATA_ROOT, ../shared/data, ./data",
                          runtime=True)
    download: bool = _k(True, "let torchvision download when its files are not found", runtime=True)
    labeled_per_class: int | None = _k(100, "labeled images kept per class (null: every image)", lo=1)
    val_per_class: int = _k(0, "validation images per class carved from the training images", lo=0)
    seed: int = _k(0, "seed of the labeled / validation / pool split")
    shard_size: int = _k(5000, "samples per tar shard", lo=1)
    max_unlabeled: int | None = _k(None, "cap on the pool's size (tests, quick runs)", lo=1)
    max_test: int | None = _k(None, "cap on the test set's size", lo=1)
    max_bad_share: float = _k(0.01, "share of a stage's samples that may be skipped as bad before it stops",
                              lo=0, hi=1, runtime=True)
    max_image_pixels: int = _k(100_000_000, "images larger than this (width x height, read from the header) are "
                                            "skipped as bad, on every decode path", lo=1, runtime=True)
    max_member_bytes: int = _k(256 * 2**20, "archive members, shard members and image files larger than this "
                                            "(bytes, decompressed) are skipped as bad without being read",
                               lo=1, runtime=True)
    pool_check: Literal["size", "sha256"] = _k(
        "size", "how a pool of existing shards (read in place) is checked on each stage: size, or sha256 too",
        runtime=True)


@dataclass
class ModelConfig:
    """Round 0's architecture and how students grow in later rounds."""

    arch: str = _k("resnet10t", "the teacher's timm architecture (or one of ours, such as noisy_student_cnn32_s)")
    pretrained: bool | str = _k(False, "true: timm's pretrained weights; a path: a local weights file")
    image_size: int | None = _k(None, "input size in pixels (default: the data's own size)", lo=8)
    ladder: str | None = _k("resnet", "named family ladder the students climb (models.LADDERS)")
    students: list[str] | None = _k(None, "explicit student architecture per round 1, 2, ...; the last repeats")
    license: str | None = _k(None, "licence of the weights written (config.json, README.md); null: none stated",
                             runtime=True)


@dataclass
class RandAugmentConfig:
    """RandAugment, the student's input noise."""

    enabled: bool = _k(True, "apply RandAugment")
    n: int = _k(2, "operations per image", lo=0)
    m: int | list[int] = _k(9, "magnitude 0..30 (a list: one per student round)", lo=0, hi=30, per_round=True)


@dataclass
class TrainConfig:
    """One training run (teacher, student or fine-tune): optimisation, augmentation and noise."""

    epochs: int | list[int] = _k(30, "training epochs (a list: one per student round)", lo=1, per_round=True)
    batch_size: int = _k(128, "labeled images per step and process", lo=1)
    optimizer: Literal["adamw", "sgd"] = _k("adamw", "optimizer (timm's factory)")
    lr: float = _k(2e-3, "peak learning rate (cosine schedule after warmup)", lo=0, lo_open=True)
    weight_decay: float = _k(0.05, "weight decay", lo=0)
    momentum: float = _k(0.9, "SGD momentum", lo=0, hi=1)
    warmup_epochs: float = _k(1.0, "linear warmup length in epochs", lo=0)
    label_smoothing: float = _k(0.1, "label smoothing of the labeled loss", lo=0, hi=1)
    grad_accum: int = _k(1, "gradient accumulation steps per optimizer step", lo=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _k(
        "auto", "autocast: auto = bf16 on GPU and on CPUs with native bf16 (avx512_bf16, AMX), else fp32")
    clip_grad: float | None = _k(None, "clip the gradient norm to this (null: no clipping)", lo=0, lo_open=True)
    max_nonfinite_steps: int = _k(3, "non-finite steps in a row (skipped) that stop an fp32 run; bf16 falls "
                                     "back to fp32 at the first", lo=1, runtime=True)
    channels_last: bool = _k(False, "channels_last memory format")
    compile: bool | str = _k(False, "torch.compile: true (inductor) or a backend name; slow first steps",
                             runtime=True)
    ema: bool = _k(False, "keep an exponential moving average of the weights and save it")
    ema_decay: float = _k(0.999, "EMA decay per step, reached after timm's warmup (1 - (1 + step)^-2/3)", lo=0, hi=1)
    workers: int = _k(1, "DataLoader workers per process", lo=0, runtime=True)
    crop_pad: int = _k(2, "random crop with this padding (0: off)", lo=0)
    hflip: bool = _k(True, "random horizontal flip")
    drop_rate: float = _k(0.0, "dropout before the classifier", lo=0, hi=1)
    drop_path_rate: float = _k(0.0, "stochastic depth rate", lo=0, hi=1)
    randaugment: RandAugmentConfig = field(default_factory=lambda: RandAugmentConfig(enabled=False))
    erasing: float = _k(0.0, "probability of erasing one random box (Cutout)", lo=0, hi=1)
    batch_augment: bool = _k(False, "crop, flip and erasing on each uint8 batch (tensor ops) instead of per "
                                    "image on PIL")


@dataclass
class StudentConfig(TrainConfig):
    """A noised student: training settings plus how pseudo labels are used."""

    drop_rate: float | list[float] = _k(0.3, "dropout before the classifier (a list: one per round)", lo=0, hi=1,
                                        per_round=True)
    drop_path_rate: float | list[float] = _k(0.1, "stochastic depth rate (a list: one per round)", lo=0, hi=1,
                                             per_round=True)
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    threshold: float = _k(0.3, "pseudo labels below this confidence are dropped", lo=0, hi=1)
    balance: bool = _k(True, "balance pseudo labels per class (duplicate or drop)")
    per_class: int | None = _k(None, "balance target per class (default: the mean kept)", lo=1)
    soft: bool = _k(True, "soft pseudo labels (the teacher's probabilities) instead of hard ones")
    temperature: float = _k(1.0, "sharpening temperature of soft pseudo labels", lo=0, lo_open=True)
    unlabeled_ratio: int = _k(3, "pseudo-labeled images per labeled image in a step", lo=1)
    unlabeled_weight: float = _k(1.0, "weight of the pseudo-label loss", lo=0)
    mixup: float = _k(0.0, "Beta(a, a) mixup of each step's images (labeled with labeled, pseudo-labeled with "
                           "pseudo-labeled); 0 = off", lo=0)
    init_from_teacher: bool = _k(False, "start from the teacher's weights (same or a deeper net of its family)")
    finetune_epochs: int = _k(0, "epochs of fine-tuning on the labeled data after the student", lo=0)
    finetune_lr: float = _k(1e-4, "fine-tuning learning rate", lo=0, lo_open=True)


@dataclass
class DistillConfig(TrainConfig):
    """Knowledge distillation of a trained model into a smaller one (``stages/distill.py``)."""

    name: str = _k("small", "output directory: <experiment>/distilled/<name>/")
    teacher: str | None = _k(None, "the teacher's model directory (default: the experiment's last round)")
    arch: str = _k("resnet10t", "the student: any timm model name")
    channels: list[int] | None = _k(None, "stage widths of ResNet-family and cnn32 students (e.g. thinner)")
    mode: Literal["online", "offline"] = _k("online", "online: the teacher runs each step; offline: stored "
                                                      "teacher probabilities")
    temperature: float = _k(4.0, "KD temperature", lo=0, lo_open=True)
    alpha: float = _k(0.9, "labeled loss: alpha KD + (1 - alpha) CE", lo=0, hi=1)
    mixup: float = _k(0.0, "online only: Beta(a, a) mixup; 0 = off", lo=0)
    labels_only: bool = _k(True, "also train the student on the labels alone, same budget, to compare")
    epochs: int | list[int] = _k(10, "training epochs", lo=1)
    batch_size: int = _k(256, "labeled images per step and process", lo=1)


@dataclass
class PseudoLabelConfig:
    """The teacher's pass over the pool (un-noised)."""

    batch_size: int = _k(512, "images per forward pass", lo=1, runtime=True)
    workers: int = _k(1, "DataLoader workers per process", lo=0, runtime=True)
    tta: bool = _k(False, "average each image's and its mirror's probabilities (2x the cost)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _k(
        "auto", "autocast: auto = bf16 on GPU, fp32 on CPU (recorded per file)", runtime=True)
    channels_last: bool = _k(False, "channels_last memory format", runtime=True)
    compile: bool | str = _k(False, "torch.compile the teacher: true or a backend name", runtime=True)


@dataclass
class EvaluateConfig:
    """How models are measured; never what they are, so changing it never touches a finished round."""

    batch_size: int = _k(512, "images per forward pass", lo=1)
    workers: int = _k(1, "DataLoader workers per process", lo=0)
    test: bool = _k(True, "false: score rounds on the validation split only (a recipe search never reads test)")
    ece_bins: int = _k(15, "equal-width confidence bins of the ECE", lo=1)
    robustness: bool = _k(True, "corruptions and perturbations in the report (make iterate skips them)")
    subset: int | None = _k(1000, "seeded test images for robustness (null: all)", lo=1)
    seed: int = _k(0, "seed of the robustness subset and the audit grids")
    frames: int = _k(10, "frames per perturbation sequence", lo=2)
    chunk: int = _k(250, "images per robustness work unit (seeds follow units)", lo=1)
    reference: str | None = _k(None, "model directory that normalises mCE and mFR (default: the round-0 teacher)")
    audit_per_class: int = _k(6, "kept and rejected images per class in the audit grids", lo=0)


@dataclass
class Config:
    """One experiment: every stage reads the sections it needs."""

    name: str = _k("", "experiment name (default: the config file's stem); outputs go to runs_dir/name")
    seed: int = _k(0, "seed of model initialisation and data order")
    runs_dir: str = _k("runs", "where experiments are written", runtime=True)
    budget: str | float | None = _k(None, "time budget for make iterate (60m, 1.5h, 900s): epochs planned from "
                                          "measured img/s; null: the config's fixed schedules", runtime=True)
    budget_teacher_share: float | None = _k(
        None, "share of a budget's training time for the round-0 teacher (null: the fixed schedule's share "
              "of images); never fewer than teacher.epochs when the budget covers them", lo=0, hi=1, lo_open=True,
        runtime=True)
    progress: bool = _k(True, "progress bars (TQDM_DISABLE=1 also turns them off)", runtime=True)
    log_with: list[Literal["tensorboard", "wandb", "mlflow"]] | None = _k(
        None, "experiment trackers for per-step loss, lr, img/s and per-round metrics (under <run>/logs/)",
        runtime=True)
    log_every: int = _k(50, "optimizer steps between tracker points", lo=1, runtime=True)
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


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every key of the config dataclass instance ``cfg``
    (``Config()`` for the defaults), for ``--help``."""
    rows, hints = [], typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
            continue
        shown = "null" if value is None else "''" if value == "" else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
            "...").strip()
        rows.append((prefix + f.name, _type_name(hints[f.name]), shown, f.metadata.get("help", "")))
    return rows


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
        return build(tp, value, key + ".")
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {number}")
            return number
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


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """A config section of type ``cls`` from a plain dict (a card's config, a YAML file), validated."""
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


def launcher_precision() -> str | None:
    """What ``accelerate launch`` / ``accelerate config`` asked for (``ACCELERATE_MIXED_PRECISION``):
    bf16 or fp16, or None when it asks for nothing ("no" is also the launcher's default)."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    return value if value in ("bf16", "fp16") else None


def _check_launcher_precision(cfg: Config) -> None:
    """The config decides precision: a launcher's request replaces ``auto`` (so the config and the
    card record what runs) and is refused, before any work, where it contradicts an explicit setting."""
    asked = launcher_precision()
    for section in ("teacher", "student", "distill", "pseudo_label"):
        mode = getattr(cfg, section).mixed_precision
        if asked is not None and mode == "auto":
            getattr(cfg, section).mixed_precision = asked
        elif asked is not None and mode != asked:
            raise ConfigError(f"{section}.mixed_precision: the config says {mode!r} but the launcher asks for "
                              f"{asked} (ACCELERATE_MIXED_PRECISION={asked}); set it to {asked} or auto, or "
                              "launch with --mixed_precision no")


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
    cfg = build(Config, raw)
    if not cfg.name:
        cfg.name = stem
    if cfg.budget is not None:
        parse_duration(cfg.budget)
    if cfg.data.classes is not None and (len(set(cfg.data.classes)) < 2 or not all(
            c.strip() and "/" not in c for c in cfg.data.classes)):
        raise ConfigError(f"data.classes: {cfg.data.classes} must name two or more distinct class folders")
    for key, value in (("name", cfg.name), ("distill.name", cfg.distill.name)):  # outputs inside runs_dir
        if "/" in value or "\\" in value or value.startswith(".") or not value.strip():
            raise ConfigError(f"{key}: '{value}' must be a plain directory name (no '/', no leading '.')")
    _check_launcher_precision(cfg)
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


def for_round(cfg: Any, round_index: int) -> Any:
    """A copy of a config section with every ``per_round`` key (its field metadata says which, nested
    sections included) resolved to round ``round_index``'s value."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = for_round(value, round_index)
        elif f.metadata.get("per_round"):
            changes[f.name] = per_round(value, round_index)
    return dataclasses.replace(cfg, **changes)
