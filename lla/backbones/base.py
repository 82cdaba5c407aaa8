"""The one interface every backbone shares: a chain of layers, a head, and per-layer metadata.

Splitting a network into local modules (docs/splits.md#layer-addresses) only needs to cut `layers` at boundaries, and every aux-net
builder only needs each layer's width, stride and spatial size. So a backbone exposes exactly that, and nothing about
how its blocks are written inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lla.errors import ConfigError


@dataclass(frozen=True)
class LayerSpec:
    """Metadata for one layer of the chain (docs/splits.md#layer-addresses)."""

    index: int  # global index g; 0 = stem
    stage: int  # 0 for the stem; 1..3 (CIFAR) or 1..4 (ImageNet); VGG: max-pools before it + 1
    block: int  # 0-based index inside the stage
    in_channels: int
    out_channels: int
    stride: int  # this layer's own spatial reduction factor
    reduction: int  # total reduction from the input image after this layer (product of strides)
    kind: str  # "stem" | "basic" | "bottleneck" | "conv" | "patch_embed" | "transformer"
    # What the layer outputs: "map" (B, C, H, W) or "tokens" (B, 1 + H*W, C): a class token then the patch grid
    # in row-major order, C = out_channels, H = W = spatial_size (docs/vit.md#token-layers)
    layout: str = "map"


def make_specs(rows: list[tuple[int, int, int, int, int, str]]) -> list[LayerSpec]:
    """Build specs from (stage, block, in, out, stride, kind) rows, filling index and cumulative reduction."""
    specs, reduction = [], 1
    for index, (stage, block, cin, cout, stride, kind) in enumerate(rows):
        reduction *= stride
        specs.append(LayerSpec(index, stage, block, cin, cout, stride, reduction, kind))
    return specs


class Backbone(nn.Module):
    """`head(layers[L-1](...layers[0](x)))`, plus the metadata splitters and aux nets read.

    Subclasses build `layers`, `head` and `specs`, and implement `make_block`.
    """

    family: str = ""
    # Stride-2 ops round up in ResNets (padded 3x3 convs, padded 3x3 max-pool) but down in VGG (MaxPool2d(2)).
    ceil_halving: bool = True

    def __init__(
        self, name: str, num_classes: int, layers: list[nn.Module], head: nn.Module, specs: list[LayerSpec]
    ):
        super().__init__()
        if len(layers) != len(specs):
            raise ValueError(f"{name}: {len(layers)} layers but {len(specs)} specs")
        self.name = name
        self.num_classes = num_classes
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.specs = list(specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def stage_sizes(self) -> list[int]:
        """Blocks per stage, stem excluded (e.g. [5, 5, 5] for resnet32)."""
        num_stages = max(s.stage for s in self.specs)
        return [sum(1 for s in self.specs if s.stage == stage) for stage in range(1, num_stages + 1)]

    def global_index(self, stage: int, block: int) -> int:
        """docs/splits.md#layer-addresses: g(0,0) = 0, g(s,j) = 1 + (blocks in stages 1..s-1) + j."""
        sizes = self.stage_sizes
        allowed = "[0,0] or " + ", ".join(f"[{s},0..{n - 1}]" for s, n in enumerate(sizes, start=1))
        if stage == 0 and block == 0:
            return 0
        if not (1 <= stage <= len(sizes) and 0 <= block < sizes[stage - 1]):
            raise ConfigError("layer", f"{self.name} has no layer [stage={stage}, block={block}]", allowed)
        return 1 + sum(sizes[: stage - 1]) + block

    def spatial_size(self, index: int, image_size: int) -> int:
        """Output height (= width) of layer `index` for a square `image_size` input."""
        if not 0 <= index < self.num_layers:
            raise ConfigError("layer", f"{self.name} has no layer {index}", f"0..{self.num_layers - 1}")
        size = image_size
        for spec in self.specs[: index + 1]:
            for _ in range(int(math.log2(spec.stride))):  # every stride here is a power of two
                size = -(-size // 2) if self.ceil_halving else size // 2
        return size

    def make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        """A new, freshly initialised block of this backbone's block type (AugLocal aux nets use it)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name}, family={self.family}, num_layers={self.num_layers}"
