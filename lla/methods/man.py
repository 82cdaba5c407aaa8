"""MAN, Momentum Auxiliary Network (Su et al., ECCV 2024, arXiv 2407.05623), docs/methods/man.md.

MAN is a plug-in on a base local rule (InfoPro or DGL). For every local module k < K-1, let B_next be the first
block of module k+1. Module k's aux path gets two copies of B_next: ``EMA_k`` (no gradient, pulled towards the live
B_next by an EMA after every local backward) and ``LB_k`` (a trainable "learnable bias" copy). The base rule then
runs on ``y_k = LB_k(h_k) + EMA_k(h_k)``, sized for B_next's *output* (2x channels, half size if B_next opens a
stage). Loss k reaches LB_k and module k (through EMA_k's activations), never EMA_k's parameters or module k+1.

Matches the reference (JunhaoSu0/MAN) in: the EMA update right after module k's backward, i.e. before module k+1
steps, so it reads B_next's weights from the end of the previous iteration (docs/architecture.md#one-training-step-as-data, docs/methods/man.md#ema-copies); parameters only, BN running
stats not averaged; the stage-index lambda schedule ``r = lo/(K-2)`` with the nominal K (docs/methods/man.md#lambda-schedule, docs/reference-code.md#man-lambda).
Switchable where the reference looks unintended (docs/reference-code.md#man-init, docs/methods/man.md#lambda-schedule):

``mode`` (lla.methods.modes): ``paper`` (default) takes ``PAPER_MODE`` for the switches left null, ``reference`` takes
``REFERENCE_MODE``, the official train.py / imagenet_DDP.py behaviour; an explicit switch wins over either.

* ``init_from_target`` (paper true): LB/EMA start equal to B_next. False reproduces the reference, whose global
  init loop re-draws both copies (independently) after the deepcopy: here a fresh ``backbone.make_block``.
* ``lambda_schedule``: ``stage_index`` (MAN reproduction) or ``module_index`` (InfoPro's own schedule).
* ``learnable_scale``: MAN++'s ``y = s*LB(h) + (2-s)*EMA(h)`` with a learnable scalar s per module, init 1.
* ``aux_depth`` (default 1): how many blocks of the network from B_next on the aux path copies; copies after the first
  are plain trainable blocks applied to y. MAN++'s ViT code uses 2 (docs/vit.md#aux-nets).
* ImageNet (docs/methods/man.md#imagenet): the reference hard-codes ``5*BCE + 0.75*CE``; here ixx/ixy apply, and the default ``ixy_1``
  (null) resolves to 0.75 on ImageNet backbones and 0.5 (MAN README) elsewhere, so defaults give the same loss.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lla.aux.plugin import BaseRule, check_bool, nominal_k
from lla.aux.rules import LocalRule, make_rule
from lla.ema import check_momentum, ema_update, make_ema_copy
from lla.engine import LocalLearner
from lla.errors import ConfigError
from lla.methods.modes import resolve_mode
from lla.recompute import run_segment

DEFAULT_HEADS = {"infopro": "2c2f", "dgl": "man"}  # MAN README (2c2f, flag not passed); MAN++ auxDGL (docs/methods/dgl.md#heads)
PAPER_MODE = {"init_from_target": True, "lambda_schedule": "stage_index", "learnable_scale": False}
# The MAN repository (CIFAR train.py and ImageNet imagenet_DDP.py alike): copies re-drawn by the global init loop
# (not copied from B_next), r = stage(B_next)/(K-2), no MAN++ scale.
REFERENCE_MODE = {"init_from_target": False, "lambda_schedule": "stage_index", "learnable_scale": False}


class MomentumAux(nn.Module):
    """Module k's aux path: ``rule(LB(h) + EMA(h))`` (or MAN++'s scaled mix). Owned by module k's optimizer;
    the EMA copy's parameters have requires_grad=False, so that optimizer skips them."""

    recompute: bool = False  # method.aux_checkpoint: each copy stores only h (lla.recompute)

    def __init__(self, lb: nn.Module, ema: nn.Module, rule: LocalRule, learnable_scale: bool = False,
                 tail: list[nn.Module] | None = None):
        super().__init__()
        self.lb, self.ema, self.rule = lb, ema, rule
        self.scale = nn.Parameter(torch.ones(())) if learnable_scale else None
        self.tail = nn.ModuleList(tail) if tail else None  # aux_depth > 1: trainable copies run after the mix

    @property
    def needs_x01(self) -> bool:
        return self.rule.needs_x01

    def augment(self, h: Tensor) -> Tensor:
        """y = LB(h) + EMA(h) on the same h (no clone: both blocks save the one tensor for backward)."""
        lb, ema = run_segment(self.lb, h, self.recompute), run_segment(self.ema, h, self.recompute)
        if self.scale is None:
            return lb + ema
        return self.scale * lb + (2.0 - self.scale) * ema  # MAN++ (docs/methods/man.md#learnable-bias)

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:
        z = self.augment(h)
        for block in self.tail or ():
            z = run_segment(block, z, self.recompute)
        return self.rule(z, y, x01)


class MAN(LocalLearner):
    """InfoPro+MAN / DGL+MAN. Options are documented in ``conf/method/man.yaml``."""

    split_family = "man"  # MAN's K labels: R32 "16" = 15 modules, R110 "55" = 54 (docs/splits.md#tables, docs/splits.md#k-labels)

    def __init__(self, *args, base: str = "infopro", ema_momentum: float = 0.995, mode: str = "paper",
                 init_from_target: bool | None = None, lambda_schedule: str = "stage_index", ixx_1: float = 5.0, ixy_1: float | None = None,
                 ixx_2: float = 0.0, ixy_2: float = 0.0, head: str | None = None, loss: str = "ce",
                 feature_dim: int = 128, widen: int = 1, learnable_scale: bool = False, aux_depth: int = 1, **kwargs):
        backbone = args[0] if args else kwargs.get("backbone")
        self.mode = mode
        self.switches = resolve_mode(mode, {"init_from_target": init_from_target, "lambda_schedule": lambda_schedule,
                                            "learnable_scale": learnable_scale}, PAPER_MODE, REFERENCE_MODE)
        init_from_target, lambda_schedule, learnable_scale = (
            self.switches[key] for key in ("init_from_target", "lambda_schedule", "learnable_scale"))
        if ixy_1 is None:  # docs/methods/man.md#imagenet: ImageNet's hard-coded 0.75; the CIFAR README's 0.5
            ixy_1 = 0.75 if getattr(backbone, "family", None) == "imagenet_resnet" else 0.5
        self.base_rule = BaseRule.checked(base, head, DEFAULT_HEADS, lambda_schedule=lambda_schedule, loss=loss,
                                          feature_dim=feature_dim, widen=widen, ixx_1=ixx_1, ixy_1=ixy_1,
                                          ixx_2=ixx_2, ixy_2=ixy_2)
        self.init_from_target = check_bool("init_from_target", init_from_target)
        self.base, self.lambda_schedule, self.head_kind = base, lambda_schedule, self.base_rule.head
        self.ema_momentum = check_momentum(ema_momentum)
        self.learnable_scale = bool(learnable_scale)
        if isinstance(aux_depth, bool) or not isinstance(aux_depth, int) or aux_depth < 1:
            raise ConfigError("method.aux_depth", f"must be an integer >= 1, got {aux_depth!r}", "1 (MAN), 2 (MAN++ ViT)")
        self.aux_depth = aux_depth
        self.lambdas: list[tuple[float, float]] = []  # (lam1, lam2) per local module; empty for base dgl
        self.remote_block = None  # trainer=pipeline sets it: k -> the (delayed) B_next of module k, or None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ structure
    def next_block_index(self, k: int) -> int:
        """Global index of B_next, the first layer of module k+1 (docs/methods/man.md#next-block)."""
        return self.module_layers(k + 1)[0]

    def build_aux(self, k: int) -> nn.Module:
        idx = self.next_block_index(k)
        target = self.backbone.layers[idx]
        if self.init_from_target:
            lb, ema = copy.deepcopy(target), make_ema_copy(target)
        else:  # the reference: both copies re-drawn by the init loop, independently (docs/methods/man.md#init)
            lb, ema = self._fresh_block(idx), make_ema_copy(self._fresh_block(idx))
        for p in lb.parameters():
            p.requires_grad_(True)
        last = idx + self.aux_depth - 1  # aux_depth > 1: copies of the blocks after B_next too
        if last > self.backbone.num_layers - 1:
            raise ConfigError("method.aux_depth", f"module {k}'s aux path would copy layers {idx}..{last}, but "
                              f"{self.backbone.name} ends at layer {self.backbone.num_layers - 1}",
                              f"1..{self.backbone.num_layers - idx}")
        tail = [copy.deepcopy(self.backbone.layers[i]).requires_grad_(True) if self.init_from_target
                else self._fresh_block(i) for i in range(idx + 1, last + 1)]
        # The rule sees B_next's output: 2x channels and half the size when B_next opens a stage (docs/methods/man.md#next-block).
        channels = self.backbone.specs[last].out_channels
        spatial = self.backbone.spatial_size(last, self.image_size)
        rule = make_rule(self.base, channels=channels, spatial=spatial, num_classes=self.num_classes,
                         image_size=self.image_size, options=self._rule_options(k, idx),
                         layout=self.backbone.specs[last].layout)
        return MomentumAux(lb, ema, rule, self.learnable_scale, tail)

    def _fresh_block(self, idx: int) -> nn.Module:
        """A newly initialised block with B_next's architecture, drawn with the backbone's own init scheme."""
        spec, target = self.backbone.specs[idx], self.backbone.layers[idx]
        try:
            block = self.backbone.make_block(spec.in_channels, spec.out_channels, spec.stride)
        except NotImplementedError:
            block = None
        want = {n: t.shape for n, t in target.state_dict().items()}
        if block is None or {n: t.shape for n, t in block.state_dict().items()} != want:
            raise ConfigError("method.init_from_target", f"{self.backbone.name} cannot build a fresh copy of layer "
                              f"{idx}", "true (start the copies from B_next's weights)")
        return block.to(next(target.parameters()).device)

    def _rule_options(self, k: int, idx: int) -> dict:
        if self.base == "dgl":
            return self.base_rule.options()
        # InfoPro weights (docs/methods/infopro.md, docs/methods/man.md#lambda-schedule); stage_index: r = lo / (K-2), lo = B_next's stage, K = the nominal label
        # (R32 "16" -> 14, not 13); r > 1 extrapolates past (ixx_2, ixy_2) (docs/reference-code.md#man-lambda) and is rejected when it goes negative
        lam = self.base_rule.lambdas(k, num_modules=self.num_modules, stage=self.backbone.specs[idx].stage,
                                nominal_k=self.nominal_k)
        self.lambdas.append(lam)
        variant = "imagenet" if self.backbone.family == "imagenet_resnet" else "cifar"
        return self.base_rule.options(lam=lam, variant=variant)

    @property
    def nominal_k(self) -> int:
        """The table key the split came from (MAN's ``local_module_num``), else the user's K label."""
        return nominal_k(self.split)

    # ------------------------------------------------------------------ step hooks
    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        aux = self.aux[k]
        return aux(h, batch[1], self.x01(batch) if aux.needs_x01 else None)

    def after_backward(self, k: int) -> None:
        """EMA_k <- m EMA_k + (1-m) B_next, before module k+1 steps this batch (docs/methods/man.md#ema-copies)."""
        if k < self.num_modules - 1:
            # trainer=pipeline: B_next may train on the next stage; a delayed copy of it (docs/pipeline.md#man)
            remote = self.remote_block(k) if self.remote_block is not None else None
            target = remote if remote is not None else self.backbone.layers[self.next_block_index(k)]
            ema_update(self.aux[k].ema, target, self.ema_momentum)

    def describe(self) -> dict:
        out = super().describe()
        out.update(base=self.base, mode=self.mode, ema_momentum=self.ema_momentum, init_from_target=self.init_from_target,
                   lambda_schedule=self.lambda_schedule, learnable_scale=self.learnable_scale,
                   aux_depth=self.aux_depth, lambdas=[list(w) for w in self.lambdas])
        return out
