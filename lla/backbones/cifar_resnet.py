"""CIFAR-style ResNets (docs/backbones.md#cifar-resnet): 3x3 stem, three stages of BasicBlocks with widths 16/32/64.

Matches the InfoPro/MAN/MLAAN/AugLocal CIFAR networks, including their projection ("option B") shortcut, their
dropout slot inside the block and their N(0, sqrt(2/(k*k*out))) conv init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lla.backbones.base import Backbone, make_specs
from lla.backbones.fused import bn_relu_conv, set_fused_bn_relu

WIDTHS = (16, 32, 64)
DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class CifarBasicBlock(nn.Module):
    """conv3x3(s)-BN-ReLU-Dropout-conv3x3-BN, + shortcut, ReLU (docs/backbones.md#cifar-resnet)."""

    fused_bn_relu = False  # backbone.fused_bn_relu: bn1-relu-conv2 without storing relu's output (fused.py)

    def __init__(self, cin: int, cout: int, stride: int = 1, droprate: float = 0.0):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(p=droprate)  # p = 0 in every reference run; kept so droprate can be swept
        # Option B: a 1x1 projection whenever the shape changes, not He et al.'s zero-padding option A.
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_bn_relu and (self.dropout.p == 0 or not self.training):  # dropout would sit inside the op
            out = self.bn2(bn_relu_conv(self.conv1(x), self.bn1, self.conv2, True))
        else:
            out = self.dropout(self.relu(self.bn1(self.conv1(x))))
            out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


def init_cifar(module: nn.Module) -> None:
    """docs/backbones.md#cifar-resnet init: conv ~ N(0, sqrt(2/(k*k*out))), BN 1/0; Linear keeps PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(Backbone):
    """Stem + 3 stages of n BasicBlocks (n = (depth-2)/6) + GAP/Linear(64, classes) head."""

    family = "cifar_resnet"

    def __init__(self, name: str, depth: int, num_classes: int, droprate: float = 0.0, fused_bn_relu: bool = False):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.droprate = droprate
        stem = nn.Sequential(conv3x3(3, WIDTHS[0]), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU(inplace=True))
        layers, rows = [stem], [(0, 0, 3, WIDTHS[0], 1, "stem")]
        cin = WIDTHS[0]
        for stage, width in enumerate(WIDTHS, start=1):
            for block in range(n):
                stride = 2 if stage > 1 and block == 0 else 1
                layers.append(CifarBasicBlock(cin, width, stride, droprate))
                rows.append((stage, block, cin, width, stride, "basic"))
                cin = width
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        super().__init__(name, num_classes, layers, head, make_specs(rows))
        init_cifar(self)
        self.fused_bn_relu = set_fused_bn_relu(self, fused_bn_relu)

    def make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        block = CifarBasicBlock(in_channels, out_channels, stride, self.droprate)
        init_cifar(block)
        set_fused_bn_relu(block, self.fused_bn_relu)
        return block


def _constructor(name: str):
    def build(num_classes: int, droprate: float = 0.0, fused_bn_relu: bool = False) -> CifarResNet:
        return CifarResNet(name, DEPTHS[name], num_classes, droprate=droprate, fused_bn_relu=fused_bn_relu)

    build.__name__ = name
    build.__doc__ = f"CIFAR {name} (docs/backbones.md#cifar-resnet), L = {(DEPTHS[name] - 2) // 2 + 1} layers."
    return build


CONSTRUCTORS = {name: _constructor(name) for name in DEPTHS}
