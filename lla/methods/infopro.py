"""InfoPro (Wang et al., "Revisiting Locally Supervised Learning", ICLR 2021), docs/methods/infopro.md.

Local module k < K-1 minimises ``lam1_k * BCE(Decoder(h_k), x01) + lam2_k * L_y(Head(h_k), y)`` on its own output,
with ``r_k = k/(K-2)`` interpolating (lam1, lam2) from (ixx_1, ixy_1) at module 0 to (ixx_2, ixy_2) at module K-2;
the last module is plain CE through the real classifier (engine default).

Matches the reference (blackfeather-wang/InfoPro-Pytorch) in splits (InfoPro tables, InfoPro* with
``balanced_memory``), heads, decoder, contrastive loss, weight schedule and the ImageNet K=2 aux nets (chosen
automatically for ImageNet ResNets). Deliberate differences: the STL-10 class count comes from the data (the
reference's 100-way typo, docs/reference-code.md#stl10-classes), x01 comes from the data module instead of CUDA buffers sized to the batch, and
only the aux nets that are used exist (docs/reference-code.md#unused-aux-nets).

Loss weights: the docs/methods/infopro.md per-(dataset, net, K) table is data (``lla/aux/infopro_presets.yaml``), picked by
``preset``. ``preset="auto"`` (the YAML default) takes the row for the run's K from ``paper_weights``, the table
conf/paper_weights/infopro_<dataset>_<backbone>.yaml puts into the composed config, and logs one line when there is
none. Precedence per weight: explicit option > named preset row > auto row > default, where the default is
CIFAR-10 R32 K=16 (5, 0.05, 0.2, 0.5) on CIFAR-style nets and the ImageNet README's 5 / 0.75 on ImageNet ResNets. ``loss=auto`` is
the preset's loss, else ``contrast`` (comand.sh) on CIFAR-style nets and ``ce`` (ImageNet README) on ImageNet.
``lambda_schedule=stage_index`` swaps in MAN's r = stage(B_next)/(K-2) (docs/methods/man.md#lambda-schedule) for ablations, with K the real
module count; weights that go negative there (K = 3, 4) are used as they come, as MAN ran them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import Tensor, nn

from lla.aux.infopro import (
    VARIANTS,
    InfoProRule,
    check_options,
    infopro_lambdas,
    load_presets,
    stage_index_lambdas,
)
from lla.aux.tokens import is_tokens, token_rule
from lla.engine import LocalLearner
from lla.errors import ConfigError
from lla.methods.modes import resolve_mode
from lla.splits import Split, resolve_split

WEIGHT_KEYS = ("ixx_1", "ixy_1", "ixx_2", "ixy_2")
DEFAULT_WEIGHTS = {"cifar": (5.0, 0.05, 0.2, 0.5), "imagenet": (5.0, 0.75, 5.0, 0.75)}
DEFAULT_LOSS = {"cifar": "contrast", "imagenet": "ce"}  # comand.sh (CIFAR family) vs ImageNet README
SCHEDULES = ("module_index", "stage_index")
BALANCED = ("cifar10", "stl10")
PAPER_MODE: dict = {}
# Nothing to switch: the defaults already run comand.sh's heads, loss, weights and schedule; the differences listed
# above (class count from the data, x01 source, unused aux nets) change no result and are not switchable.
REFERENCE_MODE: dict = {}

log = logging.getLogger("lla")


class InfoPro(LocalLearner):
    split_family = "infopro"

    def __init__(self, backbone: nn.Module, k: int = 1, *, mode: str = "paper", head: str = "1c2f", loss: str = "auto",
                 preset: str | None = None, paper_weights: Mapping | None = None, ixx_1: float | None = None, ixy_1: float | None = None,
                 ixx_2: float | None = None, ixy_2: float | None = None, widen: int = 1, feature_dim: int = 128,
                 balanced_memory: str | None = None, lambda_schedule: str = "module_index",
                 variant: str = "auto", **kwargs):
        self.mode, self.switches = mode, resolve_mode(mode, {}, PAPER_MODE, REFERENCE_MODE)
        self.variant = _resolve_variant(variant, backbone)
        explicit = dict(zip(WEIGHT_KEYS, (ixx_1, ixy_1, ixx_2, ixy_2)))
        if preset == "auto" and all(v is not None for v in explicit.values()):
            preset, row = None, {}  # every weight given: no table applies
        elif preset == "auto":
            preset, row = _auto_row(paper_weights, backbone.name, int(k), DEFAULT_WEIGHTS[self.variant])
        else:
            row = _preset_row(preset, backbone.name, int(k))
        self.preset = preset
        self.loss_kind = _agree("loss", None if loss == "auto" else loss, row.get("loss"), preset,
                                DEFAULT_LOSS[self.variant])
        self.balanced_memory = _agree("balanced_memory", balanced_memory, row.get("balanced_memory"), preset, None)
        self.weights = tuple(
            float(explicit[key] if explicit[key] is not None else row.get(key, default))
            for key, default in zip(WEIGHT_KEYS, DEFAULT_WEIGHTS[self.variant])
        )
        check_options(head=head, loss=self.loss_kind, widen=widen, feature_dim=feature_dim, variant=self.variant)
        if lambda_schedule not in SCHEDULES:
            raise ConfigError("method.lambda_schedule", f"unknown schedule {lambda_schedule!r}", ", ".join(SCHEDULES))
        if self.balanced_memory not in (None, *BALANCED):
            raise ConfigError("method.balanced_memory", f"no InfoPro* split for {self.balanced_memory!r}",
                              "null, " + ", ".join(BALANCED))
        self.head_kind, self.widen, self.feature_dim = head, widen, feature_dim
        self.lambda_schedule = lambda_schedule
        super().__init__(backbone, k, **kwargs)

    def resolve_split(self, backbone: nn.Module, k: int) -> Split:
        """InfoPro tables, or the InfoPro* rows when ``balanced_memory`` names a dataset (docs/splits.md#resnet110)."""
        return resolve_split(backbone.name, backbone.num_layers, k, self.split_family,
                             balanced_memory=self.balanced_memory)

    def lambdas(self, k: int) -> tuple[float, float]:
        """(lam1, lam2) of local module k under the chosen schedule."""
        if self.lambda_schedule == "stage_index":  # stage of the block that opens module k+1 (docs/methods/man.md#lambda-schedule)
            stage = self.backbone.specs[self.module_layers(k + 1)[0]].stage
            return stage_index_lambdas(stage, self.num_modules, *self.weights)
        return infopro_lambdas(k, self.num_modules, *self.weights)

    def build_aux(self, k: int) -> nn.Module:
        channels, spatial = self.module_output_shape(k)
        lam1, lam2 = self.lambdas(k)
        if is_tokens(self.module_output_spec(k)):  # ViT: decoder on the patch grid, class-token head (docs/vit.md#aux-nets)
            return token_rule("infopro", dim=channels, side=spatial, num_classes=self.num_classes,
                              image_size=self.image_size, options=dict(loss=self.loss_kind, lam1=lam1, lam2=lam2,
                              widen=self.widen, feature_dim=self.feature_dim, variant=self.variant))
        return InfoProRule(channels, spatial, self.num_classes, self.image_size, head=self.head_kind,
                           loss=self.loss_kind, lam1=lam1, lam2=lam2, widen=self.widen,
                           feature_dim=self.feature_dim, variant=self.variant)

    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        rule = self.aux[k]
        return rule(h, batch[1], self.x01(batch) if rule.needs_x01 else None)

    def describe(self) -> dict:
        return {**super().describe(), "preset": self.preset, "variant": self.variant, "loss": self.loss_kind,
                "lambdas": [list(self.lambdas(k)) for k in range(self.num_modules - 1)]}


def _resolve_variant(variant: str, backbone: nn.Module) -> str:
    """auto: the ImageNet aux nets for ImageNet ResNets (docs/methods/infopro.md), the CIFAR ones for everything else."""
    if variant == "auto":
        return "imagenet" if getattr(backbone, "family", "") == "imagenet_resnet" else "cifar"
    if variant not in VARIANTS:
        raise ConfigError("method.variant", f"unknown aux-net variant {variant!r}", "auto, " + ", ".join(VARIANTS))
    return variant


def _preset_row(preset: str | None, backbone: str, k: int) -> dict:
    """The preset's row, after checking it was measured on this backbone and K."""
    if preset is None:
        return {}
    rows = load_presets()
    fitting = [name for name, r in rows.items() if r["backbone"] == backbone and r["k"] == k]
    allowed = "null" + "".join(f", {name}" for name in fitting)
    if preset not in rows:
        raise ConfigError("method.preset", f"unknown InfoPro preset {preset!r}", allowed)
    row = rows[preset]
    if (row["backbone"], row["k"]) != (backbone, k):
        raise ConfigError("method.preset", f"{preset} holds the weights for {row['backbone']} K={row['k']}, but "
                          f"this run is {backbone} K={k}", allowed)
    return row


def _auto_row(paper_weights: Mapping | None, backbone: str, k: int, default: tuple) -> tuple[str | None, dict]:
    """(row name, weights) of the published row for this K, or (None, {}) and one log line when there is none."""
    entry = dict((paper_weights or {}).get(f"k{k}") or {})
    if not entry:
        log.info("lla: infopro: no published loss weights for this dataset with %s K=%d; using the generic default "
                 "ixx_1/ixy_1/ixx_2/ixy_2 = %s", backbone, k, "/".join(f"{w:g}" for w in default))
        return None, {}
    name = entry.pop("preset", None)
    unknown = set(entry) - set(WEIGHT_KEYS)
    if unknown:
        raise ConfigError("method.paper_weights", f"k{k} has keys {sorted(unknown)}", "preset, " + ", ".join(WEIGHT_KEYS))
    return name, entry


def _agree(key: str, explicit, from_preset, preset: str | None, default):
    """An option a preset row fixes: the row's value unless set explicitly, and a clash is an error."""
    if explicit is not None and from_preset is not None and explicit != from_preset:
        raise ConfigError(f"method.{key}", f"preset {preset} was run with {key}={from_preset}, not {explicit}",
                          f"{from_preset}, or another preset")
    for value in (explicit, from_preset):
        if value is not None:
            return value
    return default
