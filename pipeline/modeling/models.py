"""Models: timm's ``create_model`` with the data's channels and classes, the student ladder, and
model directories in timm's local-dir layout (config.json + model.safetensors) plus our card.json.

A model directory rebuilds with ``timm.create_model("local-dir:<dir>", pretrained=True)``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from timm.models import save_for_hf

import pipeline
from pipeline.artifacts import TMP_PREFIX, read_json, sha256_file, write_json_atomic
from pipeline.config import ConfigError, ModelConfig
from pipeline.data.dataset import Preprocessing
from pipeline.modeling import (
    archs,  # importing it registers our architectures with timm
    finite,
)

# Ours that are a timm architecture plus arguments: built (and so saved) as that, so their model
# directories load with timm alone. resnet18t/34t are resnet10t made deeper (its tiered stem,
# average-pool downsampling and widths): every resnet10t layer exists in them with its shape and timm
# zero-initialises each block's last BatchNorm, so a resnet10t's weights give the same function
# (``grow_from``): a larger student that starts where its teacher ended.
AS_TIMM: dict[str, tuple[str, dict]] = {"resnet18t": ("resnet10t", {"layers": [2, 2, 2, 2]}),
                                        "resnet34t": ("resnet10t", {"layers": [3, 4, 6, 3]})}
# pretrained_cfg fields that describe timm's published ImageNet weights, not weights trained here
_NOT_OURS = ("tag", "license", "origin_url", "hf_hub_id", "hf_hub_filename", "paper_ids", "paper_name", "notes",
             "url", "file", "source", "description")

# Families ordered by size; a student takes the next rung after its teacher (compound scaling).
LADDERS: dict[str, list[str]] = {
    "resnet": ["resnet10t", "resnet18", "resnet26", "resnet34", "resnet50", "resnet101"],
    "resnet_t": ["resnet10t", "resnet18t", "resnet34t"],  # one stem and width: students grow from teachers
    "resnet_d": ["resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d"],
    "efficientnet": [f"efficientnet_b{i}" for i in range(8)],
    "mobilenetv3": ["mobilenetv3_small_100", "mobilenetv3_large_100"],
    "convnext": ["convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny"],
}

WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"
CARD = "card.json"


def check_arch(name: str, key: str = "model.arch") -> str:
    if name not in AS_TIMM and not timm.is_model(name):
        raise ConfigError(f"{key}: '{name}' is not a timm model name (see timm.list_models())")
    return name


def student_arch(mcfg: ModelConfig, round_index: int, teacher_arch: str) -> str:
    """Architecture of round ``round_index``'s student (k >= 1): explicit list, else the ladder."""
    if mcfg.students:
        return check_arch(mcfg.students[min(round_index, len(mcfg.students)) - 1], "model.students")
    if mcfg.ladder:
        if mcfg.ladder not in LADDERS:
            raise ConfigError(f"model.ladder: unknown ladder '{mcfg.ladder}' (known: {', '.join(LADDERS)})")
        rungs = LADDERS[mcfg.ladder]
        if teacher_arch in rungs:
            return rungs[min(rungs.index(teacher_arch) + 1, len(rungs) - 1)]
    return teacher_arch  # equal-size student


def create_model(arch: str, num_classes: int, in_chans: int, pretrained: bool | str = False,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, **model_args) -> torch.nn.Module:
    """A timm model for our data; ``pretrained`` is True (timm's weights) or a local weights file.

    ``model_args`` go to the timm constructor (e.g. ``channels`` of a ResNet); timm records them in
    the model directory's config.json, so ``load_model_dir`` rebuilds the same shape."""
    check_arch(arch)
    arch, base_args = AS_TIMM.get(arch, (arch, {}))
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, **base_args, **model_args}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if isinstance(pretrained, str):
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained: weights file not found: {pretrained}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained)}
        pretrained = True
    try:
        return timm.create_model(arch, pretrained=bool(pretrained), **kwargs)
    except TypeError as e:
        raise ConfigError(f"model '{arch}' does not accept these options: {e}") from None


def save_model_dir(model: torch.nn.Module, directory: Path, label_names: list[str], mean: list[float],
                   std: list[float], image_size: int, in_chans: int, license: str | None = None) -> dict[str, str]:
    """Write config.json + model.safetensors into ``directory`` atomically; return their sha256.

    config.json is timm's, less what describes timm's published weights (tag, licence, origin);
    ``license`` is the config's ``model.license``; an architecture of ours names the package,
    version and module that provide it (``source``), which timm itself ignores."""
    finite.check_weights(model.state_dict(), str(directory), "save")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "model-", dir=directory))
    try:
        save_for_hf(model, str(tmp), model_config={"label_names": list(label_names)}, safe_serialization=True,
                    data_config={"input_size": (in_chans, image_size, image_size), "mean": tuple(mean),
                                 "std": tuple(std), "crop_pct": 1.0, "interpolation": "bilinear"})
        _own_config(tmp / TIMM_CONFIG, license)
        hashes = {}
        for name in (WEIGHTS, TIMM_CONFIG):
            hashes[name] = sha256_file(tmp / name)
            (tmp / name).replace(directory / name)
        return hashes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _own_config(path: Path, license: str | None) -> None:
    conf = read_json(path)
    pc = conf["pretrained_cfg"]
    for key in _NOT_OURS:
        pc.pop(key, None)
    if license:
        pc["license"] = license
    if conf["architecture"] in archs.OURS:
        conf["source"] = {"package": "noisy-student", "version": pipeline.__version__, "module": archs.__name__}
    write_json_atomic(path, conf)


def load_model_dir(directory: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model directory (weights through safetensors only) in eval mode; return (model, config)."""
    directory = Path(directory)
    if not (directory / TIMM_CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise ConfigError(f"not a model directory (needs {TIMM_CONFIG} and {WEIGHTS}): {directory}")
    try:
        config = read_json(directory / TIMM_CONFIG)
        arch = config["architecture"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{directory / TIMM_CONFIG}: not a timm model config ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100]})") from None
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ConfigError(f"{directory / TIMM_CONFIG}: unknown architecture {arch!r} (not in timm or this package)")
    try:
        model = timm.create_model(f"local-dir:{directory.resolve()}", pretrained=True)
    except (SafetensorError, RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"{directory / WEIGHTS}: cannot be loaded as {arch} weights in safetensors format "
                          f"({str(e).splitlines()[0][:120] or type(e).__name__})") from None
    finite.check_weights(model.state_dict(), str(directory / WEIGHTS), "load")
    model.eval()
    return model, config


def preprocessing(config: dict) -> Preprocessing:
    """The input spec a model directory was trained with: mode, size, mean, std."""
    pc = config["pretrained_cfg"]
    return Preprocessing.of("L" if pc["input_size"][0] == 1 else "RGB", pc["input_size"][-1], pc["mean"], pc["std"])


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def grow_from(student: torch.nn.Module, teacher_state: dict[str, torch.Tensor]) -> int:
    """Start ``student`` from a teacher's weights; returns how many student tensors had no source.

    The same architecture: an exact copy. A deeper one of the same family (resnet10t -> resnet18t,
    noisy_student_cnn32_s -> noisy_student_cnn32_s3): every teacher tensor must exist in the student with its shape; each extra
    residual block has its last BatchNorm zeroed (timm's ``zero_init_last``), so the student starts
    as the teacher's function and spends its compute on the pseudo-labeled pool rather than on
    relearning it.
    """
    own = student.state_dict()
    absent = [k for k in teacher_state if k not in own]
    reshaped = [k for k in teacher_state if k in own and own[k].shape != teacher_state[k].shape]
    if absent or reshaped:
        k = (absent or reshaped)[0]
        raise ConfigError(f"student.init_from_teacher: the student does not contain the teacher's layers "
                          f"({'no' if absent else 'another shape for'} {k}); use the teacher's architecture or a "
                          f"deeper one of its family (model.ladder=resnet_t: resnet10t -> resnet18t -> resnet34t)")
    for name, module in student.named_modules():
        if hasattr(module, "zero_init_last") and not any(f"{name}.{k}" in teacher_state for k in module.state_dict()):
            module.zero_init_last()
    student.load_state_dict(teacher_state, strict=False)
    return len(own) - len(teacher_state)
