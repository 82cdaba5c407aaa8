"""The base rule a plug-in method (MAN, MLAAN) wraps: its options, checked by one set of rules, and InfoPro's
lambda weights for a module.

MAN and MLAAN apply a base local rule (DGL or InfoPro, :mod:`lla.aux.rules`) to features of their own. Both take the
same base-rule options: ``base``, ``head``, ``loss``, ``feature_dim``, ``widen``, InfoPro's weights ``ixx_1, ixy_1,
ixx_2, ixy_2`` and a ``lambda_schedule``. :meth:`BaseRule.checked` validates them before any weights exist, and
:meth:`BaseRule.lambdas` gives module k's ``(lam1, lam2)``, rejecting weights under which a module cannot train.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lla.aux.infopro import infopro_lambdas, stage_index_lambdas
from lla.aux.rules import BASES
from lla.errors import ConfigError
from lla.splits import Split

# module_index: InfoPro's r = k/(K-2); stage_index: MAN's r = stage/(K-2) with the nominal K.
SCHEDULES = ("stage_index", "module_index")


def check_bool(key: str, value: Any) -> bool:
    """``value`` if it is a bool, else ``error: method.<key>: must be a boolean ...``."""
    if not isinstance(value, bool):
        raise ConfigError(f"method.{key}", f"must be a boolean, got {value!r}", "true, false")
    return value


def nominal_k(split: Split) -> int:
    """The table key the split came from (MAN's and MLAAN's ``local_module_num``: 16 for ResNet-32's 15-module
    split), else the user's K label; the K that the stage-index schedule divides by."""
    parts = split.source.split(":")
    if len(parts) == 3 and parts[0] == "table" and parts[2].isdigit():
        return int(parts[2])
    return int(split.k_label)


@dataclass(frozen=True)
class BaseRule:
    """The checked options of the base rule a plug-in method runs; ``head`` is already resolved."""

    base: str
    head: str
    loss: str = "ce"
    feature_dim: int = 128
    widen: int = 1
    lambda_schedule: str = "stage_index"
    weights: tuple[float, float, float, float] = (5.0, 0.5, 0.0, 0.0)  # ixx_1, ixy_1, ixx_2, ixy_2

    @classmethod
    def checked(cls, base: str, head: str | None, default_heads: Mapping[str, str], **options: Any) -> BaseRule:
        """ConfigError for an unknown base or schedule; ``head=None`` takes the method's default for the base.
        ``options`` are the other fields, with the weights given as ``ixx_1, ixy_1, ixx_2, ixy_2``."""
        if base not in BASES:
            raise ConfigError("method.base", f"unknown base rule {base!r}", ", ".join(BASES))
        schedule = options.get("lambda_schedule", "stage_index")
        if schedule not in SCHEDULES:
            raise ConfigError("method.lambda_schedule", f"unknown schedule {schedule!r}", ", ".join(SCHEDULES))
        weights = tuple(options.pop(key, default) for key, default in
                        zip(("ixx_1", "ixy_1", "ixx_2", "ixy_2"), cls.weights))
        return cls(base, head if head is not None else default_heads[base], weights=weights, **options)

    def lambdas(self, k: int, *, num_modules: int, stage: int, nominal_k: int) -> tuple[float, float]:
        """``(lam1, lam2)`` of local module k under the schedule: ``module_index`` r = k/(num_modules-2),
        ``stage_index`` r = stage/(nominal_k-2) with ``stage`` the stage the method's schedule reads.

        The stage-index schedule extrapolates past ``(ixx_2, ixy_2)`` when the stage exceeds K-2 (small K), as the
        references do; weights that come out negative, or both zero (a module that would never train), are an error.
        """
        if self.lambda_schedule == "module_index":
            lam1, lam2 = infopro_lambdas(k, num_modules, *self.weights)
            used_k = num_modules
        else:
            lam1, lam2 = stage_index_lambdas(stage, nominal_k, *self.weights)
            used_k = nominal_k
        if lam1 < 0 or lam2 < 0 or lam1 == lam2 == 0:
            raise ConfigError("method.lambda_schedule", f"{self.lambda_schedule} gives module {k} the weights "
                              f"lam1={lam1:.3g}, lam2={lam2:.3g} at K={used_k}: negative or both zero",
                              "stage_index with K >= 8 (README ixx/ixy), or module_index with ixx_2/ixy_2 not both 0")
        return float(lam1), float(lam2)

    def options(self, head: str | None = None, lam: tuple[float, float] | None = None,
                variant: str = "cifar") -> dict[str, Any]:
        """The ``options`` of :func:`lla.aux.rules.make_rule` for this base (``lam`` only for InfoPro)."""
        head = self.head if head is None else head
        if self.base == "dgl":
            return {"head": head, "feature_dim": self.feature_dim}
        lam1, lam2 = lam
        return {"head": head, "loss": self.loss, "lam1": lam1, "lam2": lam2, "widen": self.widen,
                "feature_dim": self.feature_dim, "variant": variant}
