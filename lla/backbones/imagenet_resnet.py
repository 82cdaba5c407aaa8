"""ImageNet ResNets and ResNeXt in the torchvision layout (docs/backbones.md#imagenet-resnet).

Same parameters and init as `torchvision.models.<name>` (checked by tests), re-cut as stem + one layer per block so a
split can end after any block. The bottleneck is v1.5: the stride sits on the 3x3 conv.
"""

from __future__ import annotations

from torch import Tensor, nn

from lla.backbones.base import Backbone, make_specs
from lla.backbones.fused import bn_relu_conv, set_fused_bn_relu

STAGE_WIDTHS = (64, 128, 256, 512)
# name: (block kind, blocks per stage, groups, width per group)
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def _projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN shortcut, only where the stride or width changes."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3x3(s)-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    fused_bn_relu = False  # backbone.fused_bn_relu: bn1-relu-conv2 without storing relu's output (fused.py)

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(cin, cout, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(bn_relu_conv(self.conv1(x), self.bn1, self.conv2, self.fused_bn_relu))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3(s, groups), 1x1 expand to `cout` (= planes*4), + shortcut, ReLU (v1.5)."""

    fused_bn_relu = False  # backbone.fused_bn_relu: bn1-relu-conv2 and bn2-relu-conv3 fused (fused.py)

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, width_per_group: int = 64):
        super().__init__()
        if cout % EXPANSION["bottleneck"]:
            raise ValueError(f"bottleneck output width must be a multiple of 4, got {cout}")
        planes = cout // EXPANSION["bottleneck"]
        width = int(planes * (width_per_group / 64.0)) * groups  # torchvision's ResNeXt width rule
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(cin, cout, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = bn_relu_conv(self.conv1(x), self.bn1, self.conv2, self.fused_bn_relu)
        out = self.bn3(bn_relu_conv(out, self.bn2, self.conv3, self.fused_bn_relu))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def init_imagenet(module: nn.Module, zero_init_residual: bool) -> None:
    """docs/backbones.md#imagenet-resnet / torchvision init: kaiming_normal(fan_out, relu) convs, BN 1/0, Linear left at PyTorch's default.

    `zero_init_residual` zeroes each block's last BN so every block starts as the identity (MLAAN's resnet34.py
    forces this on; everyone else leaves it off).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn.weight)


class ImageNetResNet(Backbone):
    """Stem (conv7x7 s2, BN, ReLU, maxpool s2) + one layer per block + GAP/Linear head."""

    family = "imagenet_resnet"

    def __init__(self, name: str, num_classes: int, zero_init_residual: bool = False, fused_bn_relu: bool = False):
        kind, depths, groups, width_per_group = ARCHS[name]
        self.block_kind, self.groups, self.width_per_group = kind, groups, width_per_group
        self.zero_init_residual = zero_init_residual
        stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, rows = [stem], [(0, 0, 3, 64, 4, "stem")]
        cin = 64
        for stage, (n, width) in enumerate(zip(depths, STAGE_WIDTHS), start=1):
            cout = width * EXPANSION[kind]
            for block in range(n):
                stride = 2 if stage > 1 and block == 0 else 1
                layers.append(self._new_block(cin, cout, stride))
                rows.append((stage, block, cin, cout, stride, kind))
                cin = cout
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        super().__init__(name, num_classes, layers, head, make_specs(rows))
        init_imagenet(self, zero_init_residual)
        self.fused_bn_relu = set_fused_bn_relu(self, fused_bn_relu)

    def _new_block(self, cin: int, cout: int, stride: int) -> nn.Module:
        if self.block_kind == "basic":
            return BasicBlock(cin, cout, stride)
        return Bottleneck(cin, cout, stride, self.groups, self.width_per_group)

    def make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        """Same block type, groups and init as this backbone's blocks; bottleneck `out_channels` = planes*4."""
        block = self._new_block(in_channels, out_channels, stride)
        init_imagenet(block, self.zero_init_residual)
        set_fused_bn_relu(block, self.fused_bn_relu)
        return block


def _constructor(name: str):
    def build(num_classes: int, zero_init_residual: bool = False, fused_bn_relu: bool = False) -> ImageNetResNet:
        return ImageNetResNet(name, num_classes, zero_init_residual=zero_init_residual, fused_bn_relu=fused_bn_relu)

    build.__name__ = name
    build.__doc__ = (
        f"ImageNet {name}, torchvision layout (docs/backbones.md#imagenet-resnet), L = {sum(ARCHS[name][1]) + 1} layers."
    )
    return build


CONSTRUCTORS = {name: _constructor(name) for name in ARCHS}
