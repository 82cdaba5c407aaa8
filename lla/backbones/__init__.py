"""Backbone registry: `build_backbone(name, num_classes, **kwargs)` is what `conf/backbone/*.yaml` instantiates."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from lla.backbones import cifar_resnet, imagenet_resnet, vgg, vit
from lla.backbones.base import Backbone, LayerSpec
from lla.errors import ConfigError

BACKBONES: dict[str, Callable[..., Backbone]] = {
    **cifar_resnet.CONSTRUCTORS,
    **imagenet_resnet.CONSTRUCTORS,
    **vgg.CONSTRUCTORS,
    **vit.CONSTRUCTORS,
}


def build_backbone(name: str, num_classes: int, **kwargs) -> Backbone:
    """Build a registered backbone; bad names, class counts or options raise ConfigError before any weights exist."""
    if name not in BACKBONES:
        raise ConfigError("backbone", f"unknown backbone {name!r}", ", ".join(sorted(BACKBONES)))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("num_classes", f"must be a positive integer, got {num_classes!r}", ">= 1")
    build = BACKBONES[name]
    options = [p for p in inspect.signature(build).parameters if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"backbone.{unknown[0]}", f"{name} takes no option {unknown[0]!r}", ", ".join(options) or "none"
        )
    return build(num_classes=num_classes, **kwargs)


__all__ = ["BACKBONES", "Backbone", "LayerSpec", "build_backbone"]
