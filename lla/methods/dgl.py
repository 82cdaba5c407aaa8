"""DGL, Decoupled Greedy Learning (Belilovsky et al., ICML 2020), docs/methods/dgl.md.

Module k (k < K-1) minimises ``CE(aux_k(h_k), y)`` with weight 1 on a small auxiliary classifier; there is no
reconstruction term. ``head`` picks one of the three published heads (official | auglocal | man), which is why "DGL"
rows differ between papers (docs/methods/dgl.md#heads).
"""

from __future__ import annotations

from torch import Tensor, nn

from lla.aux.dgl import DGL_HEADS
from lla.aux.rules import DGLRule
from lla.aux.tokens import TokenCERule, is_tokens
from lla.engine import LocalLearner
from lla.errors import ConfigError
from lla.methods.modes import resolve_mode

PAPER_MODE: dict = {}
REFERENCE_MODE: dict = {}  # head=official already is eugenium/DGL's; other papers' DGL heads are rows, not modes


class DGL(LocalLearner):
    split_family = "infopro"  # DGL rows use InfoPro's split tables (docs/methods/dgl.md)

    def __init__(self, *args, mode: str = "paper", head: str = "official", feature_dim: int = 128, **kwargs):
        self.mode, self.switches = mode, resolve_mode(mode, {}, PAPER_MODE, REFERENCE_MODE)
        if head not in DGL_HEADS:
            raise ConfigError("method.head", f"unknown DGL head {head!r}", ", ".join(DGL_HEADS))
        self.head_kind, self.feature_dim = head, feature_dim
        super().__init__(*args, **kwargs)

    def build_aux(self, k: int) -> nn.Module:
        channels, spatial = self.module_output_shape(k)
        if is_tokens(self.module_output_spec(k)):  # ViT: MAN++'s class-token classifier (docs/vit.md#aux-nets)
            return TokenCERule(channels, self.num_classes)
        return DGLRule(channels, spatial, self.num_classes, self.head_kind, self.feature_dim)

    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        return self.aux[k](h, batch[1])
