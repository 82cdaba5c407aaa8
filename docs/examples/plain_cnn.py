"""A plain convolutional chain: a stem and three stages of conv-BN-ReLU layers, no residual connections.

A worked example for docs/guides/add-a-backbone.md. Saved as ``lla/backbones/plain_cnn.py`` and registered in
``lla/backbones/__init__.py`` it is a complete lla backbone; the docs test registers it, checks its metadata
against a real forward pass and trains it with DGL and MAN through the real engine.
"""

from __future__ import annotations

from torch import nn

from lla.backbones.base import Backbone, make_specs

WIDTHS = (16, 32, 64)


class ConvBNReLU(nn.Module):
    """conv3x3 (stride s) -> BN -> ReLU: one layer of the chain."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def init_plain(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PlainCNN(Backbone):
    """Stem + 3 stages of ``blocks`` conv layers (widths 16/32/64, stride 2 entering stages 2 and 3) + GAP/Linear."""

    family = "plain_cnn"
    ceil_halving = True  # a padded stride-2 3x3 conv rounds odd sizes up

    def __init__(self, name: str, num_classes: int, blocks: int = 2):
        layers = [ConvBNReLU(3, WIDTHS[0])]
        rows = [(0, 0, 3, WIDTHS[0], 1, "stem")]  # (stage, block, in, out, stride, kind) per layer
        cin = WIDTHS[0]
        for stage, width in enumerate(WIDTHS, start=1):
            for block in range(blocks):
                stride = 2 if stage > 1 and block == 0 else 1
                layers.append(ConvBNReLU(cin, width, stride))
                rows.append((stage, block, cin, width, stride, "conv"))
                cin = width
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        super().__init__(name, num_classes, layers, head, make_specs(rows))
        init_plain(self)

    def make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        """A fresh layer of the same type: MAN's random-init copies and AugLocal-style aux nets build these."""
        block = ConvBNReLU(in_channels, out_channels, stride)
        init_plain(block)
        return block


def plaincnn7(num_classes: int, blocks: int = 2) -> PlainCNN:
    """Stem + 3 x 2 conv layers: L = 7 layers."""
    return PlainCNN("plaincnn7", num_classes, blocks=blocks)


CONSTRUCTORS = {"plaincnn7": plaincnn7}
