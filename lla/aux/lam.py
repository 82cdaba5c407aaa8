"""MLAAN's Leap Augmented Modules (LAM, docs/methods/mlaan.md): aux nets made of copies of *downstream* primary blocks.

Module k's LAM net is a list of copies of primary blocks that lie after module k, ending at the last block, so the
local loss sees features shaped like the network's own deep features. Only its first block is paired with a frozen
EMA copy (``A[0](h) + EMA[0](h)``); later blocks are plain trainable copies. Unlike AugLocal's aux nets (docs/methods/auglocal.md), the
copies start from the primary's weights (the CIFAR reference; ``init_from_primary``).

Which blocks: the reference tables (``lla.splits.lam_layers``) cover only R32 K=8/15, R110 K=32/54 and the ImageNet
R34/R101 rows. For every other K, :func:`sample_lam_layers` applies the rule read off those tables:

1. keep the first block of every later stage (every layer that changes width or resolution), or the copies would not
   chain, and always end at the last block L-1 (every CIFAR table row does both);
2. fill up to ``depth`` blocks (4, the longest CIFAR row) with blocks of the deepest stage reached, skipping the
   block right after the point where that stage is entered while more blocks remain than slots to fill.

The rule reproduces every CIFAR table row whose module ends before the last stage except a few hand-made variants
that pick one block later (R32 K=8 module 2, K=15 modules 2/4; R110 K=32 module 21, K=54 module 35). Inside the last
stage the tables keep only 1-3 blocks, the rule up to ``depth``. The ImageNet rows (R34 K=16, R101 K=33) follow no
clear rule: some stop at layer4[1] and some copy blocks that lie before the module's own end.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lla.aux.local_rule import LocalRule
from lla.ema import make_ema_copy
from lla.errors import ConfigError
from lla.recompute import run_segment
from lla.splits import Split, lam_layers

DEFAULT_DEPTH = 4  # the longest LAM row of the CIFAR tables (docs/methods/mlaan.md)


def shape_changers(specs) -> list[int]:
    """Global indices of the blocks that change width or resolution (stage openers); the stem is never one."""
    return [s.index for s in specs if s.index > 0 and (s.stride != 1 or s.in_channels != s.out_channels)]


def sample_lam_layers(end: int, num_layers: int, openers: Sequence[int], depth: int = DEFAULT_DEPTH) -> list[int]:
    """LAM blocks (global indices) for a module that ends at layer ``end``, by the rule in the module docstring.

    ``depth`` is a soft cap: a module that must still cross more stage openers than ``depth`` keeps them all.
    """
    last = num_layers - 1
    if not 0 <= end < last:
        raise ValueError(f"a module ending at layer {end} of {num_layers} has no downstream blocks")
    if depth < 1:
        raise ValueError(f"LAM depth must be >= 1, got {depth}")
    later = [o for o in openers if end < o]
    must = sorted(set(later) | {last})
    room = depth - len(must)
    entry = later[-1] if later else end  # where the deepest stage is entered (or the module's own end)
    free = [i for i in range(entry + 1, last) if i not in must]
    fill = [] if room <= 0 else (free[1:1 + room] if len(free) > room else free)
    return sorted(must + fill)


def lam_lists(backbone, split: Split, depth: int = DEFAULT_DEPTH) -> tuple[list[list[int]], str]:
    """One LAM list per local module 0..K-2, plus where it came from ("table:mlaan:<K>" or "rule").

    The table is used only when the split itself came from MLAAN's table for the same K (a LAM row describes one
    particular split); any other split gets :func:`sample_lam_layers`.
    """
    K = split.num_modules
    prefix = "table:mlaan:"
    if split.source.startswith(prefix):
        table = lam_layers(backbone.name, split.k_label)
        if table is not None and len(table) == K - 1:
            return [list(row) for row in table], split.source
    openers = shape_changers(backbone.specs)
    ends = [split.module_layers(k)[-1] for k in range(K - 1)]
    return [sample_lam_layers(e, backbone.num_layers, openers, depth) for e in ends], "rule"


def lam_output_shape(backbone, layers: Sequence[int], channels: int, spatial: int) -> tuple[int, int]:
    """(channels, side) after running ``layers`` on a ``channels x spatial`` map; checks that the copies chain."""
    for i in layers:
        spec = backbone.specs[i]
        if spec.in_channels != channels:
            raise ConfigError("method.lam", f"LAM block {i} of {backbone.name} expects {spec.in_channels} channels "
                              f"but receives {channels}: the LAM list {list(layers)} skips a stage opener",
                              "a list that keeps every width-changing block")
        channels = spec.out_channels
        for _ in range(int(math.log2(spec.stride))):
            spatial = -(-spatial // 2) if backbone.ceil_halving else spatial // 2
    return channels, spatial


def copy_lam_blocks(backbone, layers: Sequence[int], init_from_primary: bool = True) -> tuple[list[nn.Module], nn.Module]:
    """Trainable copies of ``layers`` and a frozen EMA copy of the first one.

    ``init_from_primary``: copies (and the EMA) start equal to the primary's current weights (CIFAR reference);
    otherwise every copy, and the EMA separately, is freshly drawn by the backbone's init (ImageNet reference).
    """
    if init_from_primary:
        blocks = [copy.deepcopy(backbone.layers[i]) for i in layers]
        for block in blocks:
            block.requires_grad_(True)
        return blocks, make_ema_copy(blocks[0])
    blocks = [_fresh_block(backbone, i) for i in layers]
    return blocks, make_ema_copy(_fresh_block(backbone, layers[0]))


def _fresh_block(backbone, i: int) -> nn.Module:
    spec, target = backbone.specs[i], backbone.layers[i]
    try:
        block = backbone.make_block(spec.in_channels, spec.out_channels, spec.stride)
    except NotImplementedError:
        block = None
    want = {n: t.shape for n, t in target.state_dict().items()}
    if block is None or {n: t.shape for n, t in block.state_dict().items()} != want:
        raise ConfigError("method.lam_init_from_primary", f"{backbone.name} cannot build a fresh copy of layer {i}",
                          "true (start the LAM copies from the primary's weights)")
    return block.to(next(target.parameters()).device)


class LinearRule(LocalRule):
    """GAP + Linear + CE: the heads of MLAAN's CIFAR code (``auxMLAAN.py``)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        return F.cross_entropy(self.fc(h.mean(dim=(2, 3))), y)


class LAMNet(nn.Module):
    """``rule(A[-1](...A[1](A[0](h) + EMA(h))))``: the cascaded aux path of one MLAAN module (docs/methods/mlaan.md).

    The EMA copy's parameters have requires_grad=False, so the owning optimizer skips them; the loss still flows
    through its activations into the module.
    """

    recompute: bool = False  # method.aux_checkpoint: each block stores only its input (lla.recompute)

    def __init__(self, blocks: Sequence[nn.Module], ema: nn.Module, rule: LocalRule):
        super().__init__()
        if not blocks:
            raise ValueError("a LAM net needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.ema = ema
        self.rule = rule

    @property
    def needs_x01(self) -> bool:
        return self.rule.needs_x01

    def features(self, h: Tensor) -> Tensor:
        z = run_segment(self.blocks[0], h, self.recompute) + run_segment(self.ema, h, self.recompute)
        for block in self.blocks[1:]:
            z = run_segment(block, z, self.recompute)
        return z

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        return self.rule(self.features(h), y, x01)
