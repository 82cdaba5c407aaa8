"""AugLocal, augmented local learning (Ma et al., ICLR 2024), docs/methods/auglocal.md, docs/methods/auglocal.md#k-minus-d, docs/reference-code.md#auglocal-quirks.

Every layer (stem + each block) is its own module. Module k minimises ``CE(aux_k(h_k), y)`` with weight 1, where
aux_k rebuilds d layers sampled uniformly from the rest of the network with fresh weights (lla.aux.auglocal).

Matches the reference (ChenxiangMA/AugLocal):
  * CIFAR: ``K_eff = K - d`` modules (``k_minus_d``; "K=16, d=2" on ResNet-32 is 14 modules whose last holds layers
    13..15) and the pyramidal depth schedule (``pyramid``, ``pyramid_coeff``) over those K_eff modules;
  * ImageNet ResNets and VGG13: no pyramid, no K - d, GAP + Linear head (no BN1d) / the VGG MLP head.
The nominal K stays ``split.k_label``; the real module count is ``num_modules`` (docs/splits.md#k-labels, docs/methods/auglocal.md#k-minus-d).
Deliberate fixes: the stride counter reads the un-widened widths (the CIFAR code reads the widened ones, which only
matters for widen != 1), and K_eff = 2 gives its one aux module depth d instead of dividing by zero.
Memory: each module's loss is back-propagated on its own (the ImageNet script's default summed-loss mode is
numerically the same but saves no memory, docs/methods/auglocal.md).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lla.aux.auglocal import VARIANTS, auglocal_aux, default_variant, pyramid_depths
from lla.engine import LocalLearner
from lla.errors import ConfigError
from lla.methods.modes import resolve_mode
from lla.splits import Split, resolve_split

PAPER_MODE: dict = {}
# Nothing to switch: pyramid and k_minus_d (null = auto) already follow the CIFAR / ImageNet scripts; the two fixes
# above (un-widened stride counter, K_eff = 2) only differ where the reference fails or widen != 1.
REFERENCE_MODE: dict = {}


class AugLocal(LocalLearner):
    split_family = "auglocal"

    def __init__(self, backbone: nn.Module, *args, mode: str = "paper", depth: int = 2, pyramid: bool | None = None,
                 pyramid_coeff: float = 0.5, k_minus_d: bool | None = None, widen: float = 1.0,
                 variant: str = "auto", **kwargs):
        self.mode, self.switches = mode, resolve_mode(mode, {}, PAPER_MODE, REFERENCE_MODE)
        if getattr(backbone, "family", "") == "vit":  # docs/vit.md#methods
            raise ConfigError("method", f"AugLocal's aux nets are conv layers and pooling heads; {backbone.name} "
                              "outputs token sequences", "dgl, infopro, man, mlaan, e2e")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ConfigError("method.depth", f"aux-net depth must be a whole number, got {depth!r}", "0, 1, 2, ...")
        for key, value in (("pyramid", pyramid), ("k_minus_d", k_minus_d)):
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"method.{key}", f"must be true, false or null (auto), got {value!r}",
                                  "true, false, null")
        if isinstance(pyramid_coeff, bool) or not isinstance(pyramid_coeff, (int, float)) \
                or not 0 <= pyramid_coeff <= 1:
            raise ConfigError("method.pyramid_coeff", f"got {pyramid_coeff!r}", "a number in [0, 1]")
        if isinstance(widen, bool) or not isinstance(widen, (int, float)) or widen <= 0:
            raise ConfigError("method.widen", f"aux width multiplier must be positive, got {widen!r}", "> 0")
        if variant != "auto" and variant not in VARIANTS:
            raise ConfigError("method.variant", f"unknown AugLocal variant {variant!r}", "auto, " + ", ".join(VARIANTS))
        natural = default_variant(backbone)
        self.variant = natural if variant == "auto" else variant
        if (self.variant == "vgg") != (natural == "vgg"):
            raise ConfigError("method.variant", f"variant {self.variant!r} does not fit backbone {backbone.name}",
                              f"auto or {natural}")
        # The CIFAR reference's rules; its ImageNet script (ResNets and VGG) uses neither (docs/methods/auglocal.md).
        cifar = self.variant == "cifar"
        self.depth = depth
        self.pyramid = cifar if pyramid is None else pyramid
        self.pyramid_coeff = float(pyramid_coeff)
        self.k_minus_d = cifar if k_minus_d is None else k_minus_d
        self.widen = float(widen)
        super().__init__(backbone, *args, **kwargs)
        self.aux_depths = self.module_depths()
        # Record the resolved values (valid constructor arguments), not "auto"/null.
        self.hparams.update(variant=self.variant, pyramid=self.pyramid, k_minus_d=self.k_minus_d)

    def resolve_split(self, backbone: nn.Module, k: int) -> Split:
        """Single-layer modules; on CIFAR only the first K - d of them (docs/methods/auglocal.md#k-minus-d)."""
        return resolve_split(backbone.name, backbone.num_layers, k, "auglocal", aux_depth=self.depth,
                             k_minus_d=self.k_minus_d)

    def module_depths(self) -> list[int]:
        """Aux depth d_k of modules 0..K-2: pyramidal over the real module count, or d everywhere."""
        if self.pyramid:
            return pyramid_depths(self.depth, self.num_modules, self.pyramid_coeff)
        return [self.depth] * (self.num_modules - 1)

    def build_aux(self, k: int) -> nn.Module:
        # The aux net samples the layers after the module's LAST layer (a module may hold several, e.g. with an
        # explicit split); the engine only builds aux nets for k < K-1, all of which are used.
        return auglocal_aux(self.backbone, self.module_layers(k)[-1], self.module_depths()[k], self.num_classes,
                            self.image_size, self.variant, self.widen)

    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        return F.cross_entropy(self.aux[k](h), batch[1])

    def describe(self) -> dict:
        return {**super().describe(), "aux_depths": list(self.aux_depths), "variant": self.variant,
                "pyramid": self.pyramid, "k_minus_d": self.k_minus_d}
