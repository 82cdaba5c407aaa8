"""Base local rules: an aux net plus its loss on one feature map, shared by plain and plug-in methods.

DGL and InfoPro are *rules*; the DGL and InfoPro methods apply one rule per module, while MAN and MLAAN apply a rule
to their augmented features (composition, not inheritance; docs/architecture.md#rooms). A rule is an ``nn.Module`` whose ``forward``
returns the scalar local loss.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lla.aux.dgl import DGL_HEADS, dgl_head
from lla.aux.infopro import InfoProRule
from lla.aux.local_rule import LocalRule
from lla.aux.tokens import token_rule
from lla.errors import ConfigError

__all__ = ["BASES", "DGLRule", "LocalRule", "make_rule"]

BASES = ("dgl", "infopro")


class DGLRule(LocalRule):
    """CE on a DGL auxiliary classifier (docs/methods/dgl.md), weight 1."""

    def __init__(self, channels: int, spatial: int, num_classes: int, head: str = "official", feature_dim: int = 128):
        super().__init__()
        if head not in DGL_HEADS:
            raise ConfigError("method.head", f"unknown DGL head {head!r}", ", ".join(DGL_HEADS))
        self.net = dgl_head(head, channels, spatial, num_classes, feature_dim)

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        return F.cross_entropy(self.net(h), y)


def make_rule(base: str, *, channels: int, spatial: int, num_classes: int, image_size: int,
              options: dict[str, Any], layout: str = "map") -> LocalRule:
    """Build the ``base`` rule for a ``channels x spatial x spatial`` feature map.

    ``options`` holds the base's own settings: for ``dgl`` ``head``/``feature_dim``; for ``infopro`` the keyword
    arguments of :class:`lla.aux.infopro.InfoProRule` (head config, loss, the module's lambda weights, ...).
    ``layout="tokens"``: a ViT token sequence of width ``channels`` on a ``spatial``-sided patch grid
    (:func:`lla.aux.tokens.token_rule`).
    """
    if layout == "tokens":
        return token_rule(base, dim=channels, side=spatial, num_classes=num_classes, image_size=image_size,
                          options=options)
    if base == "dgl":
        return DGLRule(channels, spatial, num_classes, **options)
    if base == "infopro":
        return InfoProRule(channels, spatial, num_classes, image_size, **options)
    raise ConfigError("method.base", f"unknown base rule {base!r}", ", ".join(BASES))
