"""Architectures of our own, registered in timm's registry so every model directory rebuilds from its
name (``timm.create_model("local-dir:...")`` after ``import pipeline.modeling.archs``).

``noisy_student_cnn32_*`` exist only here (the prefix says so; each model directory's config.json
and README.md name the package and version that provide them). ``resnet18t``/``resnet34t`` are not
registered: ``models.create_model`` builds them as timm's ``resnet10t`` with ``layers`` in
``model_args`` (``models.AS_TIMM``), so their model directories load with timm alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
)
from torch import nn

# ---------------------------------------------------------------- cnn32: a backbone made for 32 px


class _Residual(nn.Module):
    """``x + drop_path(GELU(BN(conv3x3(x))))``. BN's weight starts at one: a zero start (as timm's
    ResNets have) trained a worse teacher (bench/results/cifar10_recipes.json).
    ``zero_init_last`` makes the unit the identity, which ``models.grow_from`` does to the units a
    deeper student has beyond its teacher, so the student starts as the teacher's function."""

    def __init__(self, width: int, drop_path: float):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(F.gelu(self.bn(self.conv(x))))


class _Group(nn.Sequential):
    """conv3x3 -> max-pool /2 -> BN -> GELU, then ``depth - 1`` residual conv units at that width."""

    def __init__(self, cin: int, cout: int, depth: int, drop_path: float):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout),
                         nn.GELU(), *[_Residual(cout, drop_path) for _ in range(depth - 1)])


class Cnn32(nn.Module):
    """A small-image classifier: a 2x2 patch stem (32 -> 31 px, nothing thrown away), three conv
    groups that halve the resolution (31 -> 15 -> 7 -> 3), global max-pool, a linear head.

    Stock ImageNet stems downsample by 4 before the first block; at 32 px that leaves 8x8 maps and
    most of the image's detail gone. The design follows the small-CIFAR nets of the speed-run
    literature (patch stem, conv-pool-BN-GELU groups, scaled logits).

    ``flip_tta``: in eval mode the logits are the mean of the image's and its mirror image's, part
    of the model so evaluation, pseudo-labeling, predict and the ONNX graph all see the same
    function (at twice the inference cost; training steps are unchanged)."""

    def __init__(self, widths: tuple[int, ...] = (32, 128, 128), depth: int = 2, stem_width: int = 24,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 logit_scale: float = 1 / 9, flip_tta: bool = True):
        super().__init__()
        self.num_classes, self.drop_rate, self.logit_scale = num_classes, drop_rate, logit_scale
        self.flip_tta = flip_tta
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, bias=False), nn.BatchNorm2d(stem_width), nn.GELU())
        groups, cin = [], stem_width
        for w in widths:
            groups.append(_Group(cin, w, depth, drop_path_rate))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.num_features = self.head_hidden_size = cin
        self.fc = nn.Linear(cin, num_classes, bias=False) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.amax(x, dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_head(self.forward_features(x))
        if self.flip_tta and not self.training:  # two passes, not one of a doubled batch: the ONNX graph
            logits = (logits + self.forward_head(self.forward_features(x.flip(3)))) / 2  # keeps its dynamic batch
        return logits


# name -> (widths, depth); cnn32_s3 is cnn32_s one residual unit deeper per group: a larger student
# that starts as its cnn32_s teacher (models.grow_from)
PREFIX = "noisy_student_"
_CNN32 = {f"{PREFIX}cnn32_s": ((32, 128, 128), 2), f"{PREFIX}cnn32_s3": ((32, 128, 128), 3),
          f"{PREFIX}cnn32_m": ((48, 192, 192), 2), f"{PREFIX}cnn32_l": ((64, 256, 256), 2)}

default_cfgs = generate_default_cfgs({
    name: {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (3, 3), "crop_pct": 1.0,
           "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.243, 0.261),
           "first_conv": "stem.0", "classifier": "fc"}
    for name in _CNN32})


def _cnn32(name: str, pretrained: bool, **kwargs) -> Cnn32:
    if "channels" in kwargs:  # timm ResNets' name for stage widths (distill.channels): the same thing here
        kwargs["widths"] = kwargs.pop("channels")
    kwargs.setdefault("widths", _CNN32[name][0])
    kwargs.setdefault("depth", _CNN32[name][1])
    kwargs["widths"] = tuple(kwargs["widths"])
    return build_model_with_cfg(Cnn32, name, pretrained, **kwargs)


@register_model
def noisy_student_cnn32_s(pretrained: bool = False, **kwargs) -> Cnn32:
    """widths (32, 128, 128): 0.5M parameters at depth 2."""
    return _cnn32(f"{PREFIX}cnn32_s", pretrained, **kwargs)


@register_model
def noisy_student_cnn32_s3(pretrained: bool = False, **kwargs) -> Cnn32:
    """cnn32_s with 3 conv layers per group: 0.80M parameters; grows from a cnn32_s."""
    return _cnn32(f"{PREFIX}cnn32_s3", pretrained, **kwargs)


@register_model
def noisy_student_cnn32_m(pretrained: bool = False, **kwargs) -> Cnn32:
    """widths (48, 192, 192): 1.1M parameters at depth 2."""
    return _cnn32(f"{PREFIX}cnn32_m", pretrained, **kwargs)


@register_model
def noisy_student_cnn32_l(pretrained: bool = False, **kwargs) -> Cnn32:
    """widths (64, 256, 256): 2.0M parameters at depth 2."""
    return _cnn32(f"{PREFIX}cnn32_l", pretrained, **kwargs)

OURS = frozenset(_CNN32)  # architectures only this package provides
