"""HPFF's patch-wise aux nets (Patch Feature Fusion, docs/methods/hpff.md#aux-nets).

PFF cuts the feature map an aux net receives into a ``grid x grid`` set of patches and computes the aux net on each:

* :class:`PatchDecoder` (InfoPro base): one small decoder per patch, each reconstructing *its* part of the image;
  the patch losses are summed. This is the part the official CIFAR code implements (its ``Decoder``): a 2x2 grid,
  each feature patch upsampled (bilinear, align_corners) to the size of the matching image patch, conv3x3 (bias) +
  BN + ReLU at ``12 * widen`` channels, conv3x3 (bias) to 3 channels, BCE against the image patch.
* :class:`PatchHead`: one classifier head, shared by the patches: its convolutional trunk (up to its pooling and
  Flatten) runs on each patch, the patch feature vectors are averaged ("averaging the patch-level features") and
  its FC layers run once on the average. Heads size themselves for the patch; DGL's ``man`` head, which pools any
  input to 8x8, pools a patch to ``(8/grid)^2``, so a patch-wise head costs what the whole-map head did. The official CIFAR code runs its classifiers on the whole map instead
  (``patch_heads=false``, what ``method.mode=reference`` sets for the InfoPro base).

Patches are taken in the official order: top-left, top-right, bottom-left, bottom-right (row-major), each side cut
at ``side // grid`` steps with the last patch taking the rest.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lla.aux.dgl import dgl_head
from lla.aux.infopro import cifar_head
from lla.aux.local_rule import LocalRule
from lla.backbones.cifar_resnet import init_cifar
from lla.errors import ConfigError
from lla.losses import supervised_contrastive_loss
from lla.recompute import Chain


def cuts(side: int, grid: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the ``grid`` pieces of one side (the last piece takes the remainder)."""
    step = side // grid
    return [(i * step, side if i == grid - 1 else (i + 1) * step) for i in range(grid)]


def split_patches(t: Tensor, grid: int) -> list[Tensor]:
    """The ``grid * grid`` spatial patches of an ``N x C x H x W`` tensor, row-major (top-left first)."""
    rows, cols = cuts(t.shape[-2], grid), cuts(t.shape[-1], grid)
    return [t[..., r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]


def check_grid(grid, spatial: int) -> int:
    """``grid`` if it is an integer in 1..spatial (each patch at least one pixel), else ConfigError."""
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= spatial:
        raise ConfigError("method.patches", f"must be an integer in 1..{spatial} (an aux net here sees a "
                          f"{spatial}x{spatial} map), got {grid!r}", f"1..{spatial} (paper and code: 2)")
    return grid


class PatchDecoder(nn.Module):
    """``sum_p BCE(sigmoid(net_p(up(h_p))), x01_p)`` over the ``grid^2`` patches p; ``nets[p]`` returns logits."""

    def __init__(self, channels: int, grid: int = 2, widen: int = 1):
        super().__init__()
        hidden = 12 * widen
        self.grid = grid
        self.nets = nn.ModuleList(
            Chain(nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                  nn.Conv2d(hidden, 3, 3, padding=1))
            for _ in range(grid * grid))

    def forward(self, h: Tensor, x01: Tensor) -> Tensor:
        loss = h.new_zeros(())
        for net, hp, xp in zip(self.nets, split_patches(h, self.grid), split_patches(x01, self.grid)):
            up = F.interpolate(hp, size=tuple(xp.shape[-2:]), mode="bilinear", align_corners=True)
            # Sigmoid + BCELoss as BCE-with-logits: the same value, stable, and allowed under autocast.
            loss = loss + F.binary_cross_entropy_with_logits(net(up), xp)
        return loss


def fusion_point(net: nn.Sequential) -> int:
    """Index just past the head's first ``Flatten``: where its convolutional trunk ends and its FC layers begin."""
    for i, layer in enumerate(net):
        if isinstance(layer, nn.Flatten):
            return i + 1
    raise ValueError("a patch-wise head needs a Flatten between its trunk and its FC layers")


class PatchHead(nn.Module):
    """A head whose trunk (convs + pooling, up to its Flatten) runs on each patch with shared weights; the patch
    feature vectors are averaged and the FC layers run once on the average (grid 1: the whole map, unchanged)."""

    def __init__(self, net: nn.Sequential, grid: int):
        super().__init__()
        self.net, self.grid = net, grid
        self.split = fusion_point(net)

    def forward(self, h: Tensor) -> Tensor:
        if self.grid == 1:
            return self.net(h)
        trunk, fc = self.net[:self.split], self.net[self.split:]
        trunk.recompute = fc.recompute = getattr(self.net, "recompute", False)  # method.aux_checkpoint reaches both
        feats = [trunk(p) for p in split_patches(h, self.grid)]
        return fc(sum(feats[1:], feats[0]) / len(feats))


def classifier(base: str, head: str, channels: int, spatial: int, num_classes: int, *, grid: int, loss: str = "ce",
               widen: int = 1, feature_dim: int = 128) -> PatchHead:
    """The base rule's classifier head for a ``channels x spatial^2`` map, run on ``grid^2`` patches (1: whole map).

    dgl: a DGL head (docs/methods/dgl.md#heads); infopro: an ``aux_net_config`` head, sized for the patch it sees.
    """
    side = max(1, spatial // grid)
    if base == "dgl":
        net = dgl_head(head, channels, side, num_classes, feature_dim)
        if head == "man" and grid > 1:  # pools to 8x8 whatever it sees: pool a patch to (8/grid)^2 instead, so the
            net[0] = nn.AdaptiveAvgPool2d(max(1, 8 // grid))  # patches together cost what the whole map did
        return PatchHead(net, grid)
    out = num_classes if loss == "ce" else feature_dim
    net = cifar_head(head, channels, side, out, widen, feature_dim)
    init_cifar(net)
    return PatchHead(net, grid)


class ClassifierRule(LocalRule):
    """``L_y(head(h), y)``: CE on class logits, or the supervised contrastive loss on ``feature_dim`` features."""

    def __init__(self, head: PatchHead, loss: str = "ce"):
        super().__init__()
        self.head, self.loss_kind = head, loss

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        out = self.head(h)
        return F.cross_entropy(out, y) if self.loss_kind == "ce" else supervised_contrastive_loss(out, y)


class CascadeRule(LocalRule):
    """The cascaded loss of one module: ``lam1 * PatchDecoder(h, x01) + lam2 * L_y(head(h), y)`` (InfoPro base;
    a part whose weight is 0 is not built) or ``L_y(head(h), y)`` (DGL base: ``decoder=None``, ``lam2=1``)."""

    def __init__(self, decoder: PatchDecoder | None, classifier_rule: ClassifierRule | None, lam1: float = 0.0,
                 lam2: float = 1.0):
        super().__init__()
        self.decoder, self.classifier = decoder, classifier_rule
        self.lam1, self.lam2 = float(lam1), float(lam2)
        self.needs_x01 = decoder is not None
        if decoder is not None:
            init_cifar(decoder)  # the official global init loop reaches the aux nets too

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        loss = h.new_zeros(())
        if self.decoder is not None:
            loss = loss + self.lam1 * self.decoder(h, x01)
        if self.classifier is not None:
            loss = loss + self.lam2 * self.classifier(h, y)
        return loss

    def extra_repr(self) -> str:
        return f"lam1={self.lam1:g}, lam2={self.lam2:g}"


class HPFFAux(nn.Module):
    """Module k's two aux nets, both stepped by module k's optimizer: the independent classifier (reaches module k)
    and the cascaded rule (reaches modules k-1 and k)."""

    def __init__(self, independent: ClassifierRule, cascade: CascadeRule | None):
        super().__init__()
        self.independent, self.cascade = independent, cascade
        self.needs_x01 = cascade is not None and cascade.needs_x01
