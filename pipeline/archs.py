"""Architectures of our own, registered in timm's registry so every model directory rebuilds from its
name (``timm.create_model("local-dir:...")`` after ``import pipeline``).

``resnet18t`` and ``resnet34t`` are resnet10t made deeper: the same tiered 3-conv stem, average-pool
downsampling and stage widths, with (2, 2, 2, 2) and (3, 4, 6, 3) basic blocks. Because every
layer of resnet10t exists in them with the same shape, and timm zero-initialises each residual
block's last BatchNorm, a resnet10t's weights loaded into one of them give the same function
(``models.grow_from``): a larger Noisy Student student that starts where its teacher ended.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet, _create_resnet

# no pretrained weights exist: the default config only names the input the family expects
default_cfgs = generate_default_cfgs({
    name: {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.95,
           "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
           "first_conv": "conv1.0", "classifier": "fc"}
    for name in ("resnet18t", "resnet34t")})

_TIERED = {"block": BasicBlock, "stem_width": 32, "stem_type": "deep_tiered", "avg_down": True}


@register_model
def resnet18t(pretrained: bool = False, **kwargs) -> ResNet:
    """resnet10t's stem and widths with 2 basic blocks per stage."""
    return _create_resnet("resnet18t", pretrained, **{**_TIERED, "layers": (2, 2, 2, 2), **kwargs})


@register_model
def resnet34t(pretrained: bool = False, **kwargs) -> ResNet:
    """resnet10t's stem and widths with (3, 4, 6, 3) basic blocks."""
    return _create_resnet("resnet34t", pretrained, **{**_TIERED, "layers": (3, 4, 6, 3), **kwargs})
