"""HPFF, Hierarchical Locally Supervised Learning with Patch Feature Fusion (Su et al., ECCV 2024), docs/methods/hpff.md.

A plug-in on a base rule (DGL or InfoPro) with two levels of local modules (HiLo) and patch-wise aux nets (PFF,
:mod:`lla.aux.hpff`). Every local module k < K-1 has two losses on its output h_k:

* independent: ``wx * L_y(head_x(h_k))``, the base rule's classifier on its own head; reaches module k only;
* cascaded: ``wy * rule(h_k)`` on a second aux net, where rule is DGL's CE, or InfoPro's
  ``lam1 * patch-decoder BCE + lam2 * L_y`` with ``r = k/(K-2)`` over the nominal K; it reaches modules k-1 and k
  (a cascade module = two adjacent independent modules), so the gradient crosses one module boundary.

The last module: ``wx * CE(fc(h))`` reaching module K-1 (+ fc) and ``wy * CE(fc(h))`` reaching K-2 and K-1.

On the engine (docs/methods/hpff.md#engine): ``span`` is 2, so a module steps only after the next module's loss.
The official code runs a second "y" path (two module forwards per loss) next to the gradient-isolated "x" path;
here ``forward_module`` recomputes modules k-1..k *with graph* from the detached input the engine kept in
``step_inputs`` (the same values), and ``backward_local`` cuts the graph at h_k: each head is back-propagated alone
to get its gradient on h_k, module k's weights take both, and the cascaded gradient alone continues into module k-1.

Where the official CIFAR script differs from the paper's evident intent, a switch (``method.mode=reference``):

* ``early_losses`` (paper true): module 0 gets its own loss (both heads, reaching module 0 only); false = the
  official loop, where module 0 has no loss and is trained only by module 1's cascaded loss.
* ``patch_heads`` (paper true): the classifier heads run patch-wise too; false = the official CIFAR code, whose
  classifiers see the whole map (only its decoders are patch-wise).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from lla.aux.dgl import DGL_HEADS
from lla.aux.hpff import CascadeRule, ClassifierRule, HPFFAux, PatchDecoder, check_grid, classifier
from lla.aux.infopro import check_options
from lla.aux.plugin import check_bool, nominal_k
from lla.aux.rules import BASES
from lla.engine import LocalLearner
from lla.errors import ConfigError
from lla.methods.modes import configuration, resolve_mode

CASCADE_SPAN = 2  # a cascade module joins two adjacent independent modules (paper and code)
DEFAULT_HEADS = {"dgl": "man", "infopro": "2c2f"}  # auxDGL of the same group's MAN/MLAAN; train.py's default config
MODE_SWITCHES = ("early_losses", "patch_heads")
PAPER_MODE = {"early_losses": True, "patch_heads": True}
# Zeudfish/HPFF "Exp on CIFAR_SVHN_STL" (resnetInfoPro_HPFF.py + train.py), the only CIFAR script: InfoPro base.
# Its loop gives module 0 no loss whatever the base; a DGL script does not exist, so patch_heads keeps the paper value.
REFERENCE_MODE = {
    "cifar/infopro": {"early_losses": False, "patch_heads": False},
    "cifar/dgl": {"early_losses": False},
}


class Handoff(NamedTuple):
    """What ``local_loss`` / ``final_loss`` of module k hand to ``backward_local(k)``."""

    k: int
    h: Tensor  # module k's output, attached to the graph of modules k-span+1..k
    cut: Tensor  # h detached (requires grad): where the heads' graphs start
    x: Tensor | None  # the weighted independent loss (None for the last module)
    y: Tensor | None  # the weighted cascaded loss (the last module: the CE through the classifier, weight wx + wy)
    y_share: float = 1.0  # the share of y's gradient on h that continues upstream (the last module: wy/(wx+wy))


class HPFF(LocalLearner):
    """DGL+HPFF / InfoPro+HPFF. Options are documented in ``conf/method/hpff.yaml``."""

    split_family = "hpff"  # R32 "16" -> 15 modules, R110 "55" -> 54 (docs/splits.md#tables)

    def __init__(self, *args, base: str = "dgl", mode: str = "paper", wx: float = 0.001, wy: float = 0.999,
                 early_losses: bool | None = None, patch_heads: bool | None = None, patches: int = 2,
                 head: str | None = None, loss: str = "ce", feature_dim: int = 128, widen: int = 1,
                 ixx_1: float = 5.0, ixy_1: float = 0.5, ixx_2: float = 0.0, ixy_2: float = 0.0,
                 momentum_copies: bool = False, **kwargs):
        backbone = args[0] if args else kwargs.get("backbone")
        if base == "man":
            raise ConfigError("method.base", "HPFF plugs into a base rule; MAN is a plug-in itself, and HPFF's paper "
                              "and code describe no combination with it", ", ".join(BASES))
        if base not in BASES:
            raise ConfigError("method.base", f"unknown base rule {base!r}", ", ".join(BASES))
        if check_bool("momentum_copies", momentum_copies):
            raise ConfigError("method.momentum_copies", "HPFF's paper and official code describe no MAN momentum "
                              "(EMA) copies in its aux nets, so lla does not combine them", "false")
        self.mode = mode
        self.switches = resolve_mode(mode, {"early_losses": early_losses, "patch_heads": patch_heads},
                                     PAPER_MODE, REFERENCE_MODE, configuration(backbone, base))
        early_losses, patch_heads = (check_bool(key, self.switches[key]) for key in MODE_SWITCHES)
        head = head if head is not None else DEFAULT_HEADS[base]
        if base == "dgl" and head not in DGL_HEADS:
            raise ConfigError("method.head", f"unknown DGL head {head!r}", ", ".join(DGL_HEADS))
        if base == "infopro":
            check_options(head=head, loss=loss, widen=widen, feature_dim=feature_dim, variant="cifar")
        elif loss != "ce":
            raise ConfigError("method.loss", f"the DGL base trains with CE, got {loss!r}", "ce")
        if not (wx >= 0 and wy >= 0 and wx + wy > 0):
            raise ConfigError("method.wx", f"loss weights must be >= 0 and not both 0, got wx={wx}, wy={wy}",
                              "wx, wy >= 0 (code: 0.001, 0.999)")
        weights = (ixx_1, ixy_1, ixx_2, ixy_2)
        if any(w < 0 for w in weights):
            raise ConfigError("method.ixx_1", f"InfoPro weights must be >= 0, got {weights}", ">= 0")
        self.base, self.head_kind, self.loss_kind = base, head, loss
        self.wx, self.wy = float(wx), float(wy)
        self.early_losses, self.patch_heads = early_losses, patch_heads
        self.patches, self.feature_dim, self.widen = patches, feature_dim, widen
        self.weights = tuple(float(w) for w in weights)
        self.first_loss = 0 if early_losses else 1
        self.lambdas: dict[int, tuple[float, float]] = {}
        self.handoff: Handoff | None = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ structure
    @property
    def nominal_k(self) -> int:
        """The table key the split came from (the code's ``local_module_num``: 16 for R32's 15 modules)."""
        return nominal_k(self.split)

    def module_lambdas(self, k: int) -> tuple[float, float]:
        """InfoPro base: ``(lam1, lam2)`` of module k's cascaded loss, ``r = k / (K-2)`` with K the nominal K
        (resnetInfoPro_HPFF.py: ``i / (local_module_num - 2)``, i = module index), linear from (ixx_1, ixy_1)."""
        if self.base == "dgl":
            return 0.0, 1.0
        if k not in self.lambdas:
            K = self.nominal_k
            r = k / (K - 2) if K > 2 else 0.0
            ixx_1, ixy_1, ixx_2, ixy_2 = self.weights
            self.lambdas[k] = (ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r)
        return self.lambdas[k]

    def cascades(self, k: int) -> bool:
        """Whether local module k has a cascaded loss at all (weight wy and a nonzero rule)."""
        return self.wy > 0 and any(w != 0 for w in self.module_lambdas(k))

    def span(self, k: int) -> int:
        """Loss k reaches modules k-1..k; module 0's loss, a module without a loss or a zero cascade reach 1."""
        last = k == self.num_modules - 1
        if last:
            return min(CASCADE_SPAN, k + 1) if self.wy > 0 else 1
        if k < self.first_loss or not self.cascades(k):
            return 1
        return min(CASCADE_SPAN, k + 1)

    def build_aux(self, k: int) -> nn.Module:
        if k < self.first_loss:
            return nn.Module()  # no loss of its own, so no aux net (docs/reference-code.md#unused-aux-nets)
        channels, spatial = self.module_output_shape(k)
        grid = check_grid(self.patches, spatial)
        head_grid = grid if self.patch_heads else 1
        options = dict(grid=head_grid, loss=self.loss_kind, widen=self.widen, feature_dim=self.feature_dim)
        independent = ClassifierRule(classifier(self.base, self.head_kind, channels, spatial, self.num_classes,
                                                **options), self.loss_kind)
        cascade = None
        if self.cascades(k):
            lam1, lam2 = self.module_lambdas(k)
            decoder = PatchDecoder(channels, grid, self.widen) if lam1 else None
            y_rule = ClassifierRule(classifier(self.base, self.head_kind, channels, spatial, self.num_classes,
                                               **options), self.loss_kind) if lam2 else None
            cascade = CascadeRule(decoder, y_rule, lam1, lam2)
        return HPFFAux(independent, cascade)

    # ------------------------------------------------------------------ step hooks
    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        if k < self.first_loss:
            self.handoff = None
            return h.new_zeros(())
        aux, y = self.aux[k], batch[1]
        cut = h.detach().requires_grad_()  # the heads back-propagate to here; backward_local routes the rest
        lx = self.wx * aux.independent(cut, y)
        ly = None
        if aux.cascade is not None:
            ly = self.wy * aux.cascade(cut, y, self.x01(batch) if aux.needs_x01 else None)
        self.handoff = Handoff(k, h, cut, lx, ly)
        return (lx if ly is None else lx + ly).detach()

    def final_loss(self, h: Tensor, batch) -> Tensor:
        cut = h.detach().requires_grad_()
        loss = F.cross_entropy(self.backbone.head(cut), batch[1])
        total = self.wx + self.wy  # wx * CE(fc(x)) + wy * CE(fc(y)): one CE, the two paths share its value
        self.handoff = Handoff(self.num_modules - 1, h, cut, None, total * loss, self.wy / total)
        return loss.detach()

    def backward_local(self, k: int, loss: Tensor) -> None:
        handoff, self.handoff = self.handoff, None
        if handoff is None:  # a module without a loss of its own (early_losses=false)
            return
        if handoff.k != k:
            raise RuntimeError(f"HPFF: backward_local({k}) received module {handoff.k}'s losses")
        gx, gy = self.head_grads(handoff.cut, [handoff.x, handoff.y])
        total = gy if gx is None else (gx if gy is None else gx + gy)
        # module k's weights take gx + gy; the cascaded share of gy alone goes on into module k-1
        cascade = None if gy is None else (gy * handoff.y_share if handoff.y_share != 1.0 else gy)
        self.backward_span(k, handoff.h, total, cascade)

    def describe(self) -> dict:
        out = super().describe()
        out.update(base=self.base, mode=self.mode, cascade_span=CASCADE_SPAN, wx=self.wx, wy=self.wy,
                   early_losses=self.early_losses, patch_heads=self.patch_heads, patches=self.patches,
                   head=self.head_kind, loss=self.loss_kind,
                   lambdas={k: list(self.module_lambdas(k)) for k in range(self.first_loss, self.num_modules - 1)})
        return out
