"""InfoPro's local rule (Wang et al., ICLR 2021), docs/methods/infopro.md, and its two lambda schedules.

``L_k = lam1 * BCE(Decoder(h), x01) + lam2 * L_y(Head(h), y)`` on a module output h. The InfoPro method applies it
to h directly; MAN and MLAAN apply it to their augmented features (composition, docs/architecture.md#rooms), so the rule only needs
the feature map's width and side, never the backbone.

Two families of aux nets:
* ``variant="cifar"``: the CIFAR/SVHN/STL-10 decoder and the six ``aux_net_config`` heads. The reference asserts
  C in {16, 32, 64}; for other widths the head's conv doubles the width with stride 2 while the map is larger than
  8x8 and keeps width and stride 1 otherwise (so ImageNet R34 widths 128@28 -> 256 s2, 512@7 -> 512 s1), which is
  the pattern the CIFAR table follows at 32x32.
* ``variant="imagenet"``: the fixed-width ImageNet decoder/head, for a 512-channel map (K=2 split in layer2 of a
  bottleneck net) or a 1024-channel one (MAN++ K=4, splits in layer3); ``head`` and ``widen`` do not apply.

Init follows each reference's global init loop, which also re-initialises the aux nets: docs/backbones.md#cifar-resnet for ``cifar``, docs/backbones.md#imagenet-resnet
(kaiming fan_out) for ``imagenet``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from lla.aux.local_rule import LocalRule
from lla.backbones.cifar_resnet import init_cifar
from lla.backbones.imagenet_resnet import init_imagenet
from lla.errors import ConfigError
from lla.losses import supervised_contrastive_loss
from lla.recompute import Chain

# aux_net_config name -> (conv layers, linear layers) (docs/methods/infopro.md)
HEADS = {"0c1f": (0, 1), "0c2f": (0, 2), "1c1f": (1, 1), "1c2f": (1, 2), "1c3f": (1, 3), "2c2f": (2, 2)}
LOSSES = ("ce", "contrast")
VARIANTS = ("cifar", "imagenet")

# CIFAR head conv (width before widen, stride) for input width C (docs/methods/infopro.md).
_CIFAR_CONV = {16: (32, 2), 32: (64, 2), 64: (64, 1)}

# ImageNet aux nets by input width (docs/methods/infopro.md#aux-nets). Decoder: (out, kernel) conv+BN+ReLU stages, each followed by a bilinear
# upsample to image_size // factor, then conv3x3 to 3. Head: (out, kernel, stride) conv+BN+ReLU, then GAP + FC.
_IMAGENET_DECODER = {
    512: [(128, 1, 4), (32, 3, 2), (12, 3, 1)],  # 28 -> 56 -> 112 -> 224 at image 224
    1024: [(192, 1, 8), (64, 1, 4), (32, 3, 2), (12, 3, 1)],  # 14 -> 28 -> 56 -> 112 -> 224
}
_IMAGENET_HEAD = {
    512: [(128, 1, 1), (256, 3, 2), (512, 3, 2), (2048, 1, 1)],
    1024: [(256, 1, 1), (256, 3, 2), (512, 3, 2), (2048, 1, 1)],
}


PRESETS_FILE = Path(__file__).with_name("infopro_presets.yaml")


@functools.cache
def _read_presets() -> dict[str, dict]:
    return yaml.safe_load(PRESETS_FILE.read_text())


def load_presets() -> dict[str, dict]:
    """The table of loss weights (docs/methods/infopro.md#presets) per (dataset, net, K), by row name (a copy)."""
    return {name: dict(row) for name, row in _read_presets().items()}


# ---------------------------------------------------------------------------------------------- lambda schedules
def _mix(r: float, ixx_1: float, ixy_1: float, ixx_2: float, ixy_2: float) -> tuple[float, float]:
    return ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r


def infopro_lambdas(k: int, num_modules: int, ixx_1: float, ixy_1: float, ixx_2: float,
                    ixy_2: float) -> tuple[float, float]:
    """(lam1, lam2) of local module k (0-based, k <= K-2): r = k/(K-2), r = 0 when K = 2 (docs/methods/infopro.md).

    Module 0 gets (ixx_1, ixy_1), module K-2 gets (ixx_2, ixy_2); the last module is plain CE and has no lambdas.
    """
    if num_modules < 2 or not 0 <= k <= num_modules - 2:
        raise ValueError(f"module {k} of {num_modules} has no local loss (valid: 0..{num_modules - 2})")
    r = k / (num_modules - 2) if num_modules > 2 else 0.0
    return _mix(r, ixx_1, ixy_1, ixx_2, ixy_2)


def stage_index_lambdas(stage: int, num_modules: int, ixx_1: float, ixy_1: float, ixx_2: float,
                        ixy_2: float) -> tuple[float, float]:
    """MAN's schedule (docs/methods/man.md#lambda-schedule, docs/reference-code.md#man-lambda): r = stage/(K-2), with ``stage`` (1..) the stage of the block right after the
    module (B_next), r = 0 when K = 2.

    ``num_modules`` is the K the reference divides by: MAN's nominal label (16 for its 15-module R32 split), which
    is what reproduces (4.64, 0.46), (4.29, 0.43), (3.93, 0.39) at K=16 with 5/0.5/0/0. Kept as in the reference:
    r exceeds 1 once stage > K-2, so for K = 3 or 4 the weights extrapolate past (ixx_2, ixy_2) and can go
    negative. That is allowed here (it is what MAN ran); only K >= 8 is sane.
    """
    if num_modules < 2 or stage < 1:
        raise ValueError(f"stage {stage} / K={num_modules}: need stage >= 1 and K >= 2")
    r = stage / (num_modules - 2) if num_modules > 2 else 0.0
    return _mix(r, ixx_1, ixy_1, ixx_2, ixy_2)


# ---------------------------------------------------------------------------------------------- aux nets
def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def cifar_head_conv(channels: int, spatial: int) -> tuple[int, int]:
    """(width, stride) of the CIFAR head's conv: docs/methods/infopro.md#aux-nets for C in {16, 32, 64}, else see module doc."""
    if channels in _CIFAR_CONV:
        return _CIFAR_CONV[channels]
    return (2 * channels, 2) if spatial > 8 else (channels, 1)


def cifar_head(kind: str, channels: int, spatial: int, out_features: int, widen: int = 1,
               feature_dim: int = 128) -> nn.Sequential:
    """One of the six ``aux_net_config`` heads (docs/methods/infopro.md#aux-nets): convs (BN, ReLU; no bias), GAP, Linear(+ReLU) stack."""
    convs, fcs = HEADS[kind]
    layers: list[nn.Module] = []
    width = channels
    if convs:
        conv_width, stride = cifar_head_conv(channels, spatial)
        width = conv_width * widen
        layers += _conv_bn_relu(channels, width, 3, stride)
        for _ in range(convs - 1):  # 2c2f: a second conv3x3 s1 at the same width
            layers += _conv_bn_relu(width, width, 3)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    hidden = feature_dim * widen
    for _ in range(fcs - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return Chain(*layers)


class UpsampleTo(nn.Upsample):
    """Bilinear upsample (align_corners=True) that returns its input when it already has the target size.

    At equal sizes the interpolation is an exact identity, but it would still allocate a copy that the next conv saves
    for backward (+1 image-sized map per stage-1 module).

    On a CPU it upsamples in channels_last: torch's NCHW bilinear kernel converts to and from that layout internally
    (3-6x slower, measured 30 vs 5 ms forward+backward for 64x64x8x8 -> 32x32). The result is bit-identical and
    stays channels_last, so the decoder convs after it run in that layout too (1.4-2x faster decoders here); on a
    GPU the layout is left alone."""

    def forward(self, x):
        if tuple(x.shape[-2:]) == tuple(self.size):
            return x
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def cifar_decoder(channels: int, image_size: int, widen: int = 1) -> nn.Sequential:
    """Upsample to the image, conv3x3 (bias) + BN + ReLU, conv3x3 (bias) to 3 channels. Returns *logits*: the
    reference's Sigmoid is folded into the BCE (see :meth:`InfoProRule.reconstruct`)."""
    hidden = 12 * widen
    return Chain(
        UpsampleTo(size=(image_size, image_size), mode="bilinear", align_corners=True),
        *_conv_bn_relu(channels, hidden, 3, bias=True),
        nn.Conv2d(hidden, 3, 3, padding=1, bias=True),
    )


def imagenet_decoder(channels: int, image_size: int) -> nn.Sequential:
    """The 512- or 1024-channel ImageNet decoder (docs/methods/infopro.md#aux-nets), returning logits like :func:`cifar_decoder`."""
    layers: list[nn.Module] = []
    cin = channels
    for cout, kernel, factor in _IMAGENET_DECODER[channels]:
        side = image_size // factor
        layers += _conv_bn_relu(cin, cout, kernel, bias=True)
        layers.append(UpsampleTo(size=(side, side), mode="bilinear", align_corners=True))
        cin = cout
    layers.append(nn.Conv2d(cin, 3, 3, padding=1, bias=True))
    return Chain(*layers)


def imagenet_head(channels: int, out_features: int) -> nn.Sequential:
    """The 512- or 1024-channel ImageNet head (docs/methods/infopro.md#aux-nets): four conv+BN+ReLU, GAP, FC."""
    layers: list[nn.Module] = []
    cin = channels
    for cout, kernel, stride in _IMAGENET_HEAD[channels]:
        layers += _conv_bn_relu(cin, cout, kernel, stride)
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, out_features)]
    return Chain(*layers)


# ---------------------------------------------------------------------------------------------- the rule
class InfoProObjective(LocalRule):
    """``lam1 * BCE(decoder(decoder_input(h)), x01) + lam2 * L_y(head(h), y)``, for a subclass that builds
    ``decoder`` (None when lam1 == 0), ``head`` (None when lam2 == 0), ``lam1``, ``lam2`` and ``loss_kind``."""

    decoder: nn.Module | None
    head: nn.Module | None

    def decoder_input(self, h: Tensor) -> Tensor:
        """What the decoder reads: the feature map itself (token rules lay tokens out on their patch grid)."""
        return h

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        loss = None
        if self.decoder is not None:
            if x01 is None:
                raise ValueError(f"{type(self).__name__} with lam1 != 0 reconstructs the image: pass x01")
            # Sigmoid + BCELoss as BCE-with-logits: the same value (the reference clamps log at -100, reached only
            # for |logit| > 100), but stable and allowed under autocast, where BCE on probabilities is not.
            loss = self.lam1 * F.binary_cross_entropy_with_logits(self.decoder(self.decoder_input(h)), x01)
        if self.head is not None:
            out = self.head(h)
            task = F.cross_entropy(out, y) if self.loss_kind == "ce" else supervised_contrastive_loss(out, y)
            loss = self.lam2 * task if loss is None else loss + self.lam2 * task
        return loss


class InfoProRule(InfoProObjective):
    """``lam1 * BCE(decoder(h), x01) + lam2 * L_y(head(h), y)`` (docs/methods/infopro.md) on a ``channels x spatial^2`` map.

    Only what is used is built (docs/reference-code.md#unused-aux-nets): no decoder when lam1 == 0 (then ``needs_x01`` is False and x01 may be
    None), no head when lam2 == 0. ``loss="contrast"`` makes the head output ``feature_dim`` features for the
    supervised contrastive loss, ``"ce"`` makes it output class logits.
    """

    needs_x01 = True  # instance value: False when lam1 == 0 (no decoder, x01 not needed)

    def __init__(self, channels: int, spatial: int, num_classes: int, image_size: int, *,
                 head: str = "1c2f", loss: str = "ce", lam1: float = 1.0, lam2: float = 1.0,
                 widen: int = 1, feature_dim: int = 128, variant: str = "cifar"):
        super().__init__()
        check_options(head=head, loss=loss, widen=widen, feature_dim=feature_dim, variant=variant)
        self.lam1, self.lam2 = float(lam1), float(lam2)
        if self.lam1 == 0 and self.lam2 == 0:
            raise ConfigError("method.ixx_1", "both loss weights of this module are 0, so it would never train",
                              "lam1 != 0 or lam2 != 0 for every local module (check ixx_*/ixy_* and K)")
        self.loss_kind, self.variant = loss, variant
        out_features = num_classes if loss == "ce" else feature_dim
        if variant == "imagenet":
            if channels not in _IMAGENET_HEAD:
                raise ConfigError("method.variant", f"the ImageNet InfoPro aux nets take a 512- or 1024-channel "
                                  f"map, this module gives {channels}", "variant=cifar, or a split in "
                                  "layer2/layer3 of a bottleneck ResNet")
            if widen != 1:
                raise ConfigError("method.widen", "the ImageNet aux nets have fixed widths", "1")
            self.decoder = imagenet_decoder(channels, image_size) if self.lam1 else None
            self.head = imagenet_head(channels, out_features) if self.lam2 else None
            init_imagenet(self, zero_init_residual=False)
        else:
            self.decoder = cifar_decoder(channels, image_size, widen) if self.lam1 else None
            self.head = cifar_head(head, channels, spatial, out_features, widen, feature_dim) if self.lam2 else None
            init_cifar(self)
        self.needs_x01 = self.decoder is not None

    def reconstruct(self, h: Tensor) -> Tensor:
        """The decoder's image in [0, 1] (the reference's Sigmoid output)."""
        return torch.sigmoid(self.decoder(h))

    def extra_repr(self) -> str:
        return f"variant={self.variant}, loss={self.loss_kind}, lam1={self.lam1:g}, lam2={self.lam2:g}"


def check_options(*, head: str, loss: str, widen: int, feature_dim: int, variant: str) -> None:
    """ConfigError for a bad rule option (the method calls it before any weights exist)."""
    if head not in HEADS:
        raise ConfigError("method.head", f"unknown InfoPro head {head!r}", ", ".join(HEADS))
    if loss not in LOSSES:
        raise ConfigError("method.loss", f"unknown InfoPro loss {loss!r}", ", ".join(LOSSES))
    if variant not in VARIANTS:
        raise ConfigError("method.variant", f"unknown aux-net variant {variant!r}", ", ".join(VARIANTS))
    for key, value in (("widen", widen), ("feature_dim", feature_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"method.{key}", f"must be a positive integer, got {value!r}", ">= 1")
