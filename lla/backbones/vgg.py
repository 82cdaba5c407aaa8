"""ImageNet VGG with BN (docs/backbones.md#vgg; AugLocal's VGG13), cut as one layer per conv.

A max-pool that follows a conv is the first op of the NEXT layer, so a split after conv i leaves the pool in the next
module, as in AugLocal (docs/splits.md#imagenet-splits). The last max-pool opens the head. Parameters equal torchvision's `vgg13_bn`.
"""

from __future__ import annotations

from torch import nn

from lla.backbones.base import Backbone, make_specs

CFGS = {"vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")}


def conv_layer(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """AugLocal "BasicLayer": [MaxPool2d(2) when stride 2] + conv3x3 (with bias) + BN + ReLU."""
    if stride not in (1, 2):
        raise ValueError(f"VGG layer stride must be 1 or 2, got {stride}")
    ops: list[nn.Module] = [nn.MaxPool2d(2, 2)] if stride == 2 else []
    ops += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*ops)


def init_vgg(module: nn.Module) -> None:
    """docs/backbones.md#vgg init: kaiming_normal(fan_out, relu) convs, N(0, 0.01) Linear, all biases 0, BN 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class VGG(Backbone):
    """Conv layers (layer 0 = first conv, the "stem") + head [maxpool, AdaptiveAvgPool(7), 3-layer MLP]."""

    family = "vgg"
    ceil_halving = False  # MaxPool2d(2) floors odd sizes

    def __init__(self, name: str, num_classes: int, dropout: float = 0.5):
        layers, rows = [], []
        cin, stride, stage, block = 3, 1, 0, 0
        for item in CFGS[name]:
            if item == "M":
                stride, stage, block = 2, stage + 1, 0
                continue
            layers.append(conv_layer(cin, item, stride))
            rows.append((stage, block, cin, item, stride, "stem" if stage == 0 else "conv"))
            cin, stride = item, 1
            # the stem conv is stage 0 alone; the next conv opens stage 1 even with no pool between them
            stage, block = (1, 0) if stage == 0 else (stage, block + 1)
        if stride != 2:
            raise ValueError(f"{name}: the cfg must end with a max-pool (it opens the head)")
        head = nn.Sequential(
            nn.MaxPool2d(2, 2),
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(cin * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        super().__init__(name, num_classes, layers, head, make_specs(rows))
        init_vgg(self)

    def make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        layer = conv_layer(in_channels, out_channels, stride)
        init_vgg(layer)
        return layer


def _constructor(name: str):
    def build(num_classes: int, dropout: float = 0.5) -> VGG:
        return VGG(name, num_classes, dropout=dropout)

    build.__name__ = name
    build.__doc__ = f"ImageNet {name} with BN (docs/backbones.md#vgg), one layer per conv."
    return build


CONSTRUCTORS = {name: _constructor(name) for name in CFGS}
