"""AugLocal's auxiliary networks (Ma et al., ICLR 2024), docs/methods/auglocal.md.

Module k's aux net is a *shallow copy of the rest of the network's architecture*: d layers sampled uniformly from the
layers after the module ("unifSamp"), rebuilt as new, independently initialised blocks (never the primary net's
weights; that is what separates AugLocal from MLAAN's LAM, docs/methods/mlaan.md), followed by a small head.

The schedule helpers are pure functions so the paper's numbers can be checked one by one. Both formulas use
Python's ``round`` (banker's rounding: 2.5 -> 2, 10.5 -> 10), as the reference does (docs/reference-code.md#auglocal-quirks).
"""

from __future__ import annotations

from torch import nn

from lla.errors import ConfigError
from lla.recompute import Chain

VARIANTS = ("cifar", "imagenet", "vgg")
# Which head a backbone family gets when the variant is "auto".
FAMILY_VARIANT = {"cifar_resnet": "cifar", "imagenet_resnet": "imagenet", "vgg": "vgg"}
VGG_HIDDEN = 512  # docs/methods/auglocal.md: AdaptiveAvgPool1d(512) and two 512-wide Linear+BN1d+ReLU layers


def pyramid_depths(depth: int, num_modules_eff: int, coeff: float) -> list[int]:
    """Aux depth of modules i = 0..K_eff-2: falls linearly from d to d(1-c)+c, never below 1 (docs/methods/auglocal.md).

    The expression keeps the reference's operation order, so float ties round exactly as there. With K_eff = 2 the
    only aux module gets d (the reference would divide by zero).
    """
    span = num_modules_eff - 2
    depths = []
    for i in range(num_modules_eff - 1):
        r = (i * coeff) / span if span > 0 else 0.0
        depths.append(max(1, round(depth * (1 - r) + r * 1)))
    return depths


def sample_layers(layer: int, num_layers: int, depth: int) -> list[int]:
    """"unifSamp": the layers an aux net rebuilds for a module ending at `layer` (docs/methods/auglocal.md).

    All remaining layers when ``depth >= L-1-layer``, else ``round(layer + (L-layer-1)/depth*i)`` for i = 1..depth:
    evenly spaced and always ending at the last layer L-1.
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is not in 0..{num_layers - 1}")
    if depth < 0:
        raise ValueError(f"aux depth must be >= 0, got {depth}")
    if depth >= num_layers - 1 - layer:
        return list(range(layer + 1, num_layers))
    return [round(layer + (num_layers - layer - 1) / depth * i) for i in range(1, depth + 1)]


def aux_plan(
    layers: list[int], widths: list[int], current_width: int, pool_on_change: bool = False
) -> list[tuple[int, int, int]]:
    """(layer index, width, stride) of each aux block, from the primary net's widths (``net_dim``, docs/methods/auglocal.md#k-minus-d).

    ResNets: a counter p gains log2(width / current width) per block; p >= 1 gives stride 2 and p -= 1, so a block
    halves the resolution at most once and the leftover carries to the next block (dropped after the last one).
    VGG (``pool_on_change``): a block pools (stride 2) exactly when the width changes, however much it changes.
    """
    plan, carry, current = [], 0, current_width
    for idx in layers:
        width = widths[idx]
        if width < current:
            raise ValueError(f"layer {idx} is narrower ({width}) than the aux input ({current})")
        if pool_on_change:
            stride = 2 if width != current else 1
        else:
            carry += (width // current).bit_length() - 1  # floor(log2(ratio)), as the reference's int(log2(..))
            stride = 1
            if carry >= 1:
                stride, carry = 2, carry - 1
        plan.append((idx, width, stride))
        current = width
    return plan


def net_dims(backbone) -> list[int]:
    """The reference's ``net_dim``: each layer's width in *planes* (a bottleneck's output is planes * 4)."""
    return [s.out_channels // (4 if s.kind == "bottleneck" else 1) for s in backbone.specs]


def default_variant(backbone) -> str:
    """Head/stride variant for a backbone family: CIFAR ResNets, ImageNet ResNets, or VGG."""
    if backbone.family not in FAMILY_VARIANT:
        raise ConfigError("backbone", f"AugLocal has no aux net for the {backbone.family!r} family",
                          ", ".join(FAMILY_VARIANT))
    return FAMILY_VARIANT[backbone.family]


def auglocal_aux(backbone, module_end_layer: int, depth: int, num_classes: int, image_size: int, variant: str,
                 widen: float = 1.0) -> nn.Sequential:
    """The aux net of a module whose last layer is `module_end_layer`, with aux depth `depth` (= d_l).

    Blocks come from ``backbone.make_block`` (same block type and init as the primary net, fresh weights); their
    input is the module's real output width, so the ImageNet stem module starts from 64 channels (docs/methods/auglocal.md).
    Heads: ``cifar`` GAP, flatten, [BN1d iff depth <= 1], Linear; ``imagenet`` GAP, flatten, Linear;
    ``vgg`` flatten, AdaptiveAvgPool1d(512), 2 x (Linear 512-512, BN1d, ReLU), Linear.
    """
    if variant not in VARIANTS:
        raise ConfigError("method.variant", f"unknown AugLocal variant {variant!r}", "auto, " + ", ".join(VARIANTS))
    if (variant == "vgg") != (backbone.family == "vgg"):
        raise ConfigError("method.variant", f"variant {variant!r} does not fit the {backbone.family} backbone "
                          f"{backbone.name}", default_variant(backbone))
    dims = net_dims(backbone)
    layers = sample_layers(module_end_layer, backbone.num_layers, depth)
    plan = aux_plan(layers, dims, dims[module_end_layer], pool_on_change=variant == "vgg")

    channels = backbone.specs[module_end_layer].out_channels
    spatial = backbone.spatial_size(module_end_layer, image_size)
    ops: list[nn.Module] = []
    for idx, width, stride in plan:
        expansion = backbone.specs[idx].out_channels // width
        out = int(width * widen) * expansion  # widen scales planes, as the reference's _make_layer(planes*widen)
        ops.append(backbone.make_block(channels, out, stride))
        channels = out
        if stride == 2:
            spatial = -(-spatial // 2) if backbone.ceil_halving else spatial // 2
    if spatial < 1:
        raise ConfigError("image_size", f"the AugLocal aux net after layer {module_end_layer} of {backbone.name} "
                          f"halves a {image_size}px image below 1 pixel", "a larger image_size or smaller depth")

    if variant == "vgg":
        ops += [nn.Flatten(), nn.AdaptiveAvgPool1d(VGG_HIDDEN)]  # on (N, F) it pools each row: (N, 512)
        for _ in range(2):
            ops += [nn.Linear(VGG_HIDDEN, VGG_HIDDEN), nn.BatchNorm1d(VGG_HIDDEN), nn.ReLU(inplace=True)]
        ops.append(nn.Linear(VGG_HIDDEN, num_classes))
        return Chain(*ops)
    ops += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if variant == "cifar" and depth <= 1:
        ops.append(nn.BatchNorm1d(channels))  # the CIFAR reference normalises only its shallowest heads
    # The ImageNet reference hard-codes Linear(512 * expansion): the same width whenever widen = 1.
    ops.append(nn.Linear(channels, num_classes))
    return Chain(*ops)
