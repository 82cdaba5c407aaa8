"""The three DGL auxiliary classifiers of docs/methods/dgl.md.

``official`` is eugenium/DGL's "mlp-sr" head, ``auglocal`` the variant AugLocal's DGL baseline uses, ``man`` the
MAN/MLAAN-family ``auxDGL``. Pick ``man`` to reproduce MAN/MLAAN "DGL" rows and ``official``/``auglocal`` for AugLocal's.
"""

from __future__ import annotations

import math

from torch import nn

from lla.errors import ConfigError
from lla.recompute import Chain

DGL_HEADS = ("official", "auglocal", "man")


def _conv_bn_relu_1x1(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _linear_bn_relu(fin: int, fout: int, bias: bool) -> list[nn.Module]:
    return [nn.Linear(fin, fout, bias=bias), nn.BatchNorm1d(fout), nn.ReLU(inplace=True)]


def dgl_head(kind: str, channels: int, spatial: int, num_classes: int, feature_dim: int = 128) -> nn.Sequential:
    """Build a DGL head for a ``channels x spatial x spatial`` feature map."""
    if kind in ("official", "auglocal"):
        # (a)/(b): pool to ceil(S/4), three 1x1 conv layers at width C, pool to 2x2, MLP on 4C features.
        c, hidden = channels, 3 if kind == "official" else 2
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(math.ceil(spatial / 4))]
        for _ in range(3):
            layers += _conv_bn_relu_1x1(c, c)
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        for _ in range(hidden):
            layers += _linear_bn_relu(4 * c, 4 * c, bias=kind == "official")
        layers.append(nn.Linear(4 * c, num_classes))
        return Chain(*layers)
    if kind == "man":
        # (c): pool to 8x8, three 1x1 convs to F=128, GAP, three Linear to 4F=512, Linear to classes.
        f, wide = feature_dim, 4 * feature_dim
        layers = [nn.AdaptiveAvgPool2d(8)]
        layers += _conv_bn_relu_1x1(channels, f) + _conv_bn_relu_1x1(f, f) + _conv_bn_relu_1x1(f, f)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers += _linear_bn_relu(f, wide, True) + _linear_bn_relu(wide, wide, True) + _linear_bn_relu(wide, wide, True)
        layers.append(nn.Linear(wide, num_classes))
        return Chain(*layers)
    raise ConfigError("method.head", f"unknown DGL head {kind!r}", ", ".join(DGL_HEADS))
