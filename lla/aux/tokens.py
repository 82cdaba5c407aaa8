"""Aux nets for token sequences (docs/vit.md#aux-nets): what DGL, InfoPro, MAN and MLAAN put on a ViT module.

A ViT layer outputs (B, 1 + N, D): the class token, then the N = side^2 patch tokens in row-major order
(``LayerSpec.layout == "tokens"``). The conv heads of the CNN rules do not apply, so:

* classification (the DGL rule, InfoPro's and MLAAN's heads, MAN's rule): MAN++'s ViT aux classifier, a LayerNorm
  (eps 1e-6) on the class token and one Linear layer, weights truncated-normal(0.02), biases 0 (MAN++'s init);
* InfoPro's reconstruction: the patch tokens laid back on their grid, (B, D, side, side), then one of InfoPro's
  decoders: for 16x16 patches (a 14x14 grid at 224) the ImageNet decoder of a 14x14 map (conv + BN + ReLU, then a
  2x bilinear upsample, four times, widths 192/64/32/12, then conv3x3 to 3 channels; its first conv takes D channels
  instead of 1024), which never holds a D-channel map at full resolution; otherwise the CIFAR decoder (bilinear
  upsample to the image, conv3x3 + BN + ReLU, conv3x3 to 3). InfoPro's ``head`` (conv configs) does not apply to
  tokens; ``variant=imagenet`` is refused.

MAN++ (JunhaoSu0/MAN_PlusPlus, ``vit_man.py``) builds its aux path from copies of the next module's first blocks
(the MAN method does that for any backbone) and ends it in :class:`TokenHead`, with a CE loss: the DGL rule here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lla.aux.infopro import LOSSES, InfoProObjective, UpsampleTo, cifar_decoder
from lla.aux.local_rule import LocalRule
from lla.backbones.cifar_resnet import init_cifar
from lla.backbones.imagenet_resnet import init_imagenet
from lla.errors import ConfigError
from lla.recompute import Chain

# InfoPro's ImageNet decoder for a 1024-channel 14x14 map (docs/methods/infopro.md#aux-nets): (width, kernel) per
# stage, each stage followed by a 2x bilinear upsample (14 -> 28 -> 56 -> 112 -> 224).
STAGED_DECODER = ((192, 1), (64, 1), (32, 3), (12, 3))


def is_tokens(spec) -> bool:
    """Whether a layer's output is a token sequence (ViT) rather than a (B, C, H, W) map."""
    return getattr(spec, "layout", "map") == "tokens"


def backbone_is_tokens(backbone) -> bool:
    return any(is_tokens(s) for s in getattr(backbone, "specs", ()))


def patch_grid(h: Tensor, side: int) -> Tensor:
    """(B, 1 + side^2, D) tokens -> (B, D, side, side): the patch tokens on their grid, class token dropped."""
    b, n, d = h.shape
    if n != 1 + side * side:
        raise ValueError(f"expected 1 + {side}x{side} tokens, got {n}")
    return h[:, 1:].transpose(1, 2).reshape(b, d, side, side)


def staged_decoder(dim: int, side: int) -> nn.Module:
    """InfoPro's 14x14-map ImageNet decoder with a ``dim``-channel input, for a ``side`` grid 16x below the image."""
    layers: list[nn.Module] = []
    cin = dim
    for i, (cout, kernel) in enumerate(STAGED_DECODER, start=1):
        target = side * 2 ** i
        layers += [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                   UpsampleTo(size=(target, target), mode="bilinear", align_corners=True)]
        cin = cout
    layers.append(nn.Conv2d(cin, 3, 3, padding=1))
    decoder = Chain(*layers)
    init_imagenet(decoder, zero_init_residual=False)
    return decoder


def token_decoder(dim: int, side: int, image_size: int, widen: int = 1) -> nn.Module:
    """The decoder :class:`TokenInfoProRule` uses (module docstring); returns logits like InfoPro's."""
    if side * 16 == image_size:
        if widen != 1:
            raise ConfigError("method.widen", "the 16x16-patch token decoder has InfoPro's fixed ImageNet widths", "1")
        return staged_decoder(dim, side)
    decoder = cifar_decoder(dim, image_size, widen)
    init_cifar(decoder)
    return decoder


class TokenHead(nn.Module):
    """MAN++'s ViT aux classifier: ``Linear(LayerNorm(h[:, 0]))``."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, out_features)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(self.norm(h[:, 0]))


class TokenCERule(LocalRule):
    """CE on :class:`TokenHead`: the DGL rule on tokens (and MLAAN's GAP+Linear head's counterpart)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = TokenHead(dim, num_classes)

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        return F.cross_entropy(self.head(h), y)


class TokenInfoProRule(InfoProObjective):
    """``lam1 * BCE(decoder(patch grid), x01) + lam2 * L_y(TokenHead(h), y)``; only the used parts are built."""

    def __init__(self, dim: int, side: int, num_classes: int, image_size: int, *, loss: str = "ce",
                 lam1: float = 1.0, lam2: float = 1.0, widen: int = 1, feature_dim: int = 128):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError("method.loss", f"unknown InfoPro loss {loss!r}", ", ".join(LOSSES))
        self.lam1, self.lam2, self.side, self.loss_kind = float(lam1), float(lam2), side, loss
        if self.lam1 == 0 and self.lam2 == 0:
            raise ConfigError("method.ixx_1", "both loss weights of this module are 0, so it would never train",
                              "lam1 != 0 or lam2 != 0 for every local module (check ixx_*/ixy_* and K)")
        self.decoder = token_decoder(dim, side, image_size, widen) if self.lam1 else None
        self.head = TokenHead(dim, num_classes if loss == "ce" else feature_dim) if self.lam2 else None
        self.needs_x01 = self.decoder is not None

    def decoder_input(self, h: Tensor) -> Tensor:
        return patch_grid(h, self.side)

    def extra_repr(self) -> str:
        return f"loss={self.loss_kind}, lam1={self.lam1:g}, lam2={self.lam2:g}"


def token_rule(base: str, *, dim: int, side: int, num_classes: int, image_size: int, options: dict) -> LocalRule:
    """The ``base`` rule for a token sequence of width ``dim`` on a ``side x side`` patch grid.

    ``options`` are those of :func:`lla.aux.rules.make_rule`; the CNN-only ones are refused when they ask for
    something tokens cannot have (an InfoPro ImageNet variant), and ignored where they only pick a conv head.
    """
    if base == "dgl":
        return TokenCERule(dim, num_classes)
    if base == "infopro":
        if options.get("variant", "cifar") != "cifar":
            raise ConfigError("method.variant", "the ImageNet InfoPro aux nets take a 512/1024-channel conv map, "
                              "a ViT module outputs tokens", "auto, cifar")
        keep = {k: options[k] for k in ("loss", "lam1", "lam2", "widen", "feature_dim") if k in options}
        return TokenInfoProRule(dim, side, num_classes, image_size, **keep)
    raise ConfigError("method.base", f"unknown base rule {base!r}", "dgl, infopro")
