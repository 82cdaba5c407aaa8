"""MLAAN, Multilaminar Leap Augmented Auxiliary Network (Zhang, ..., Su, Cai; arXiv 2406.16633, AAAI 2025), docs/methods/mlaan.md.

A plug-in on a base rule (DGL or InfoPro). Every local module k < K-1 has two losses on its output h_k:

* MLM, independent: ``wx * rule(h_k)`` on its own head; it reaches module k only;
* MLM, cascaded + LAM: ``wy * lam_rule(LAM_k(h_k))`` where ``LAM_k`` is built from copies of downstream primary
  blocks (``lla.aux.lam``) and its first block is paired with an EMA copy of the live primary block. This loss reaches
  modules k-span+1..k (span = ``cascade_span``, fewer at the start): the gradient crosses module boundaries.

The last module: ``wx * CE(fc(h))`` reaching module K-1 (+ fc) and ``wy * CE(fc(h))`` reaching the last span modules.

The engine steps a module only after the last loss that reaches it (``span``). Instead of the reference's second
"y" path (span+1 module forwards per loss), ``forward_module`` recomputes modules k-span+1..k *with graph* from the
detached input the engine kept in ``step_inputs``: span forwards per loss, same values. ``backward_local`` cuts the
graph at h_k: each head is back-propagated alone to get its gradient on h_k, then module k receives the independent
gradient (``inputs=`` module k's parameters, the one retained pass) and the cascaded one goes through all span
modules, which frees every graph. BN running stats update once per forward, so span times per step (the reference:
span+1 times); they never affect training-mode outputs, only evaluation.

Faithful to the reference in: the LAM tables, ``A[0](z) + EMA[0](z)``, EMA over parameters only, right after the
module's backward (so it reads the source block's weights from the end of the previous step), wx/wy 0.001/0.999.
Deliberate defaults for the paper's intent, each switchable back to a reference quirk (docs/reference-code.md#mlaan-quirks, docs/methods/mlaan.md#differences):

* ``update_all_ema`` (true): every module's EMA is updated; false = CIFAR code, only the last local module's.
* ``early_losses`` (true): modules before the first full window get a loss over the modules that exist (module 0:
  span 1); false = reference, which gives modules k < span-1 no loss of their own (only the cascade reaches them).
* ``final_x_loss`` (true): final loss ``wx*CE(x) + wy*CE(y)`` (ImageNet code); false = CIFAR code, whose CE(x) is
  overwritten, leaving ``CE(y)`` with weight 1.
* ``lam_init_from_primary`` (true): LAM copies start equal to the primary (CIFAR); false = fresh init (ImageNet).

``mode=reference`` (lla.methods.modes) sets all of these at once to what the official script of the configuration
does (``REFERENCE_MODE``: resnetMLAAN.py for CIFAR-style nets with base dgl, resnetInfoProbin.py with base infopro,
ImageNet resnet34.py / resnet101.py); an explicit switch still wins.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from lla.aux.dgl import DGL_HEADS
from lla.aux.lam import DEFAULT_DEPTH, LAMNet, LinearRule, copy_lam_blocks, lam_lists, lam_output_shape
from lla.aux.plugin import BaseRule, check_bool, nominal_k
from lla.aux.rules import LocalRule, make_rule
from lla.aux.tokens import TokenCERule
from lla.ema import check_momentum, ema_update
from lla.engine import LocalLearner
from lla.errors import ConfigError
from lla.methods.modes import configuration, resolve_mode

DEFAULT_HEADS = {"dgl": "man", "infopro": "1c2f"}  # auxDGL (resnetDGLbin.py); run32-cifar10.txt passes 1c2f
LAM_HEADS = ("linear", "rule")
MODE_SWITCHES = ("cascade_span", "update_all_ema", "early_losses", "final_x_loss", "lam_init_from_primary", "head")
PAPER_MODE = {"cascade_span": 2, "update_all_ema": True, "early_losses": True, "final_x_loss": True,
              "lam_init_from_primary": True}  # head: null = DEFAULT_HEADS
# The official scripts, per configuration (lla.methods.modes.configuration). A switch a script's
# behaviour is not known for keeps its paper value.
REFERENCE_MODE = {
    "cifar/dgl": {"cascade_span": 2, "update_all_ema": False, "early_losses": False, "final_x_loss": False,
                  "lam_init_from_primary": True, "head": "linear"},  # resnetMLAAN.py, the model train.py builds
    "cifar/infopro": {"cascade_span": 3, "update_all_ema": False, "early_losses": False},  # resnetInfoProbin.py
    "imagenet": {"cascade_span": 3, "update_all_ema": True, "early_losses": False, "final_x_loss": True,
                 "lam_init_from_primary": False},  # ImageNet resnet34.py / resnet101.py
}


class MLAANAux(nn.Module):
    """Module k's aux nets: the independent MLM head and the LAM net (both stepped by module k's optimizer)."""

    def __init__(self, mlm: LocalRule, lam: LAMNet):
        super().__init__()
        self.mlm, self.lam = mlm, lam
        self.needs_x01 = mlm.needs_x01 or lam.needs_x01


class HeadLosses(NamedTuple):
    """What ``local_loss`` / ``final_loss`` of module k hand to ``backward_local(k)``: the heads' losses, not yet
    back-propagated, and the two ends of the cut where the heads' graphs meet the module's."""

    k: int  # the module these losses belong to
    h: Tensor  # module k's output, attached to the graph of modules k-span+1..k
    cut: Tensor  # h detached (requires grad): where every head's graph starts
    heads: tuple[tuple[float, Tensor], ...]  # (weight, loss) per head, back-propagated one at a time
    # None: a local module, heads = ((wx, MLM loss), (wy, LAM loss)). The last module has one head (CE through the
    # classifier); x_share of its gradient on h is the "x" part (module K-1 alone), the rest the cascaded "y" part.
    x_share: float | None = None


class MLAAN(LocalLearner):
    """DGL+MLAAN / InfoPro+MLAAN. Options are documented in ``conf/method/mlaan.yaml``."""

    split_family = "mlaan"  # R32 "16" -> 15 modules, R110 "55" -> 54 (docs/splits.md#tables, docs/splits.md#k-labels)

    def __init__(self, *args, base: str = "dgl", mode: str = "paper", cascade_span: int | None = None,
                 wx: float = 0.001, wy: float = 0.999, ema_momentum: float = 0.995, update_all_ema: bool | None = None,
                 lam_init_from_primary: bool | None = None, lam_depth: int = DEFAULT_DEPTH,
                 lam_head: str | None = None, early_losses: bool | None = None, final_x_loss: bool | None = None,
                 head: str | None = None, loss: str = "ce", feature_dim: int = 128, widen: int = 1,
                 lambda_schedule: str = "stage_index", ixx_1: float = 5.0, ixy_1: float = 0.5, ixx_2: float = 0.0,
                 ixy_2: float = 0.0, **kwargs):
        backbone = args[0] if args else kwargs.get("backbone")
        given = {"cascade_span": cascade_span, "update_all_ema": update_all_ema, "early_losses": early_losses,
                 "final_x_loss": final_x_loss, "lam_init_from_primary": lam_init_from_primary, "head": head}
        self.mode = mode
        self.switches = resolve_mode(mode, given, PAPER_MODE, REFERENCE_MODE, configuration(backbone, base))
        cascade_span, update_all_ema, early_losses, final_x_loss, lam_init_from_primary, head = (
            self.switches[key] for key in MODE_SWITCHES)
        self.base_rule = BaseRule.checked(base, head, DEFAULT_HEADS, lambda_schedule=lambda_schedule, loss=loss,
                                          feature_dim=feature_dim, widen=widen, ixx_1=ixx_1, ixy_1=ixy_1,
                                          ixx_2=ixx_2, ixy_2=ixy_2)
        for key, value, lo in (("cascade_span", cascade_span, 1), ("lam_depth", lam_depth, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"method.{key}", f"must be an integer >= {lo}, got {value!r}", f">= {lo}")
        if not (wx >= 0 and wy >= 0 and wx + wy > 0):
            raise ConfigError("method.wx", f"loss weights must be >= 0 and not both 0, got wx={wx}, wy={wy}",
                              "wx, wy >= 0 (paper: 0.001, 0.999)")
        for key, value in (("update_all_ema", update_all_ema), ("lam_init_from_primary", lam_init_from_primary),
                           ("early_losses", early_losses), ("final_x_loss", final_x_loss)):
            check_bool(key, value)
        self.base, self.head_kind = base, self.base_rule.head
        if base == "dgl" and self.head_kind not in (*DGL_HEADS, "linear"):
            raise ConfigError("method.head", f"unknown DGL head {self.head_kind!r}", ", ".join((*DGL_HEADS, "linear")))
        self.lam_head = lam_head if lam_head is not None else ("linear" if base == "dgl" else "rule")
        if self.lam_head not in LAM_HEADS:
            raise ConfigError("method.lam_head", f"unknown LAM head {lam_head!r}", ", ".join(LAM_HEADS))
        self.cascade_span, self.wx, self.wy = cascade_span, float(wx), float(wy)
        self.ema_momentum = check_momentum(ema_momentum)
        self.update_all_ema, self.lam_init_from_primary, self.lam_depth = update_all_ema, lam_init_from_primary, lam_depth
        self.early_losses, self.final_x_loss = early_losses, final_x_loss
        self.lambda_schedule = lambda_schedule
        # The reference gives a module its own loss only once a full window exists (k >= span-1).
        self.first_loss = 0 if early_losses else cascade_span - 1
        self.lam_layers: list[list[int]] | None = None
        self.lam_source, self.lambdas = "", {}
        self.handoff: HeadLosses | None = None  # local_loss / final_loss -> backward_local of the same module
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ structure
    def span(self, k: int) -> int:
        """Loss k reaches modules k-span+1..k; a module without its own loss, or a zero cascade weight, reaches 1."""
        last = k == self.num_modules - 1
        wy = (self.wy if self.final_x_loss else 1.0) if last else self.wy
        if (k < self.first_loss and not last) or wy == 0:
            return 1
        return min(self.cascade_span, k + 1)

    def build_aux(self, k: int) -> nn.Module:
        if self.lam_layers is None:
            self.lam_layers, self.lam_source = lam_lists(self.backbone, self.split, self.lam_depth)
        if k < self.first_loss:
            return nn.Module()  # no loss of its own, so no aux net (docs/reference-code.md#unused-aux-nets)
        channels, spatial = self.module_output_shape(k)
        layers = self.lam_layers[k]
        lam_c, lam_s = lam_output_shape(self.backbone, layers, channels, spatial)
        mlm = self._rule(self.head_kind, channels, spatial, k)
        lam_rule = self._rule("linear", lam_c, lam_s, k) if self.lam_head == "linear" else \
            self._rule(self.head_kind, lam_c, lam_s, k)
        blocks, ema = copy_lam_blocks(self.backbone, layers, self.lam_init_from_primary)
        return MLAANAux(mlm, LAMNet(blocks, ema, lam_rule))

    def _rule(self, head: str, channels: int, spatial: int, k: int) -> LocalRule:
        layout = self.module_output_spec(k).layout  # ViT tokens: class-token heads (docs/vit.md#aux-nets)
        if head == "linear" and layout == "tokens":
            return TokenCERule(channels, self.num_classes)
        if self.base == "dgl":
            if head == "linear":  # resnetMLAAN.py: GAP + Linear
                return LinearRule(channels, self.num_classes)
            options = self.base_rule.options(head)
        else:
            # Always the width-generic CIFAR aux nets: MLAAN heads sit on every block's output (64..2048 wide), and
            # MLAAN's ImageNet code has no InfoPro variant (its heads are GAP+FC), so the fixed 512/1024-channel
            # ImageNet nets of docs/methods/infopro.md do not apply.
            options = self.base_rule.options(head, self._lambdas(k), variant="cifar")
        return make_rule(self.base, channels=channels, spatial=spatial, num_classes=self.num_classes,
                         image_size=self.image_size, options=options, layout=layout)

    def _lambdas(self, k: int) -> tuple[float, float]:
        """InfoPro weights of module k; the same pair for both heads (resnetInfoProbin.py)."""
        if k not in self.lambdas:  # stage_index: r = stage(end of module k) / (K-2), K = the table key (docs/reference-code.md#man-lambda)
            self.lambdas[k] = self.base_rule.lambdas(k, num_modules=self.num_modules,
                                                     stage=self.module_output_spec(k).stage, nominal_k=self.nominal_k)
        return self.lambdas[k]

    @property
    def nominal_k(self) -> int:
        """The table key the split came from (MLAAN's ``local_module_num``), else the user's K label."""
        return nominal_k(self.split)

    # ------------------------------------------------------------------ step hooks
    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        if k < self.first_loss:
            self.handoff = None
            return h.new_zeros(())
        aux, y = self.aux[k], batch[1]
        x01 = self.x01(batch) if aux.needs_x01 else None
        cut = h.detach().requires_grad_()  # heads back-propagate to here; backward_local routes the rest
        loss_x, loss_y = aux.mlm(cut, y, x01), aux.lam(cut, y, x01)
        self.handoff = HeadLosses(k, h, cut, ((self.wx, loss_x), (self.wy, loss_y)))
        return (self.wx * loss_x + self.wy * loss_y).detach()

    def final_loss(self, h: Tensor, batch) -> Tensor:
        cut = h.detach().requires_grad_()
        loss = F.cross_entropy(self.backbone.head(cut), batch[1])
        wfx, wfy = (self.wx, self.wy) if self.final_x_loss else (0.0, 1.0)
        self.handoff = HeadLosses(self.num_modules - 1, h, cut, ((wfx + wfy, loss),), wfx / (wfx + wfy))
        return loss.detach()

    def backward_local(self, k: int, loss: Tensor) -> None:
        handoff, self.handoff = self.handoff, None
        if handoff is None:  # a module without a loss of its own (early_losses=false)
            return
        if handoff.k != k:
            raise RuntimeError(f"MLAAN: backward_local({k}) received module {handoff.k}'s losses")
        h = handoff.h
        grads = self.head_grads(handoff.cut, [w * part for w, part in handoff.heads])
        if handoff.x_share is not None:  # the final module: one head, split into its x and y shares
            gx = grads[0] * handoff.x_share
            grads = [gx, grads[0] - gx] if handoff.x_share > 0 else [None, grads[0]]
        gx, gy = grads
        if gx is None:  # the cascade alone: modules k-span+1..k
            self.backward_span(k, h, gy)
        else:  # module k's weights take gx + gy; the cascade carries gy alone into the modules before it
            self.backward_span(k, h, gx + gy, gy)

    def after_backward(self, k: int) -> None:
        """EMA_k <- m EMA_k + (1-m) source, before the source block's module steps in this batch (docs/methods/mlaan.md)."""
        if self.first_loss <= k < self.num_modules - 1 and (self.update_all_ema or k == self.num_modules - 2):
            ema_update(self.aux[k].lam.ema, self.backbone.layers[self.lam_layers[k][0]], self.ema_momentum)

    def describe(self) -> dict:
        out = super().describe()
        out.update(base=self.base, mode=self.mode, cascade_span=self.cascade_span, wx=self.wx, wy=self.wy,
                   ema_momentum=self.ema_momentum, update_all_ema=self.update_all_ema,
                   early_losses=self.early_losses, final_x_loss=self.final_x_loss,
                   lam_init_from_primary=self.lam_init_from_primary, head=self.head_kind, lam_source=self.lam_source,
                   lam_layers=self.lam_layers, lambdas={k: list(v) for k, v in self.lambdas.items()})
        return out
