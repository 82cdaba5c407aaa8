"""Local-module splits: the papers' split tables (YAML data) plus a balanced splitter for every other K.

A split is a sorted tuple of K-1 global layer indices, the *boundaries*: module k ends right after layer
``boundaries[k]`` and the last module runs to layer L-1 plus the classifier; module 0 always holds the stem
(docs/splits.md#layer-addresses). The tables in ``tables/<backbone>.yaml`` keep the ``[stage, block]`` split points exactly as
the reference configs list them, so they can be checked line by line against docs/splits.md#tables; this module
converts them.

The tables also register the split families: a family exists because a table file has a block for it under
``families:`` (:func:`families`), so a method with K labels of its own adds its table blocks and nothing here.

Pure Python + yaml on purpose (no torch, no backbones): callers pass ``num_layers``.
"""

from __future__ import annotations

import copy
import functools
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from lla.errors import ConfigError

__all__ = [
    "FAMILIES",
    "TABLELESS_FAMILIES",
    "Split",
    "balanced_boundaries",
    "families",
    "global_index",
    "lam_layers",
    "load_table",
    "resolve_split",
    "stage_sizes",
]

# Which table a method reads (its class attribute ``split_family``). DGL / InfoPro / E2E-like baselines use
# "infopro". K labels differ per family (docs/splits.md#tables, docs/splits.md#k-labels). Every family but these is declared by the table files
# themselves (a block under ``families:``); ``lla.splits.FAMILIES`` is :func:`families`, read from them.
TABLELESS_FAMILIES = ("e2e",)  # one module whatever K says: no table

TABLE_DIR = Path(__file__).with_name("tables")

# Blocks per stage of the torchvision-layout ImageNet nets (docs/backbones.md#imagenet-resnet).
_IMAGENET_STAGES = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnext50_32x4d": (3, 4, 6, 3),
    "resnext101_32x8d": (3, 4, 23, 3),
}
_CIFAR_RESNET = re.compile(r"resnet(\d+)")
_CIFAR_BOTTLENECK_DEPTHS = (164, 1001)  # 9 layers per block, not 6 (docs/backbones.md#cifar-resnet)
_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Split:
    """K contiguous local modules over L layers, plus where the split came from (for logs, docs/splits.md#k-labels)."""

    backbone: str
    num_layers: int
    boundaries: tuple[int, ...]
    k_label: int  # the K the user asked for (paper's nominal label; may differ from num_modules)
    family: str  # which table family resolved it
    # "table:<family>:<key>", "table:<family>:balanced_memory:<dataset>:<key>", "balanced", "e2e",
    # or "rule:auglocal"
    source: str

    def __post_init__(self):
        b = tuple(int(x) for x in self.boundaries)
        object.__setattr__(self, "boundaries", b)
        if any(x >= y for x, y in zip(b, b[1:])) or (b and (b[0] < 0 or b[-1] > self.num_layers - 2)):
            raise ValueError(
                f"boundaries {b} must be strictly increasing within 0..{self.num_layers - 2} "
                f"for {self.backbone} ({self.num_layers} layers)"
            )

    @property
    def num_modules(self) -> int:
        return len(self.boundaries) + 1

    def module_layers(self, k: int) -> range:
        """Global layer indices of module k (module 0 starts with the stem, the last ends at layer L-1)."""
        if not 0 <= k < self.num_modules:
            raise IndexError(f"module {k} out of range 0..{self.num_modules - 1}")
        start = 0 if k == 0 else self.boundaries[k - 1] + 1
        stop = self.boundaries[k] + 1 if k < len(self.boundaries) else self.num_layers
        return range(start, stop)

    def module_of_layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        # Module k holds the layers <= boundaries[k], so count the boundaries strictly before `layer`.
        return bisect_left(self.boundaries, layer)


def stage_sizes(backbone: str) -> tuple[int, ...] | None:
    """Residual blocks per stage, from the name alone (docs/backbones.md#cifar-resnet, docs/backbones.md#imagenet-resnet); None for nets without stages (VGG)."""
    if backbone in _IMAGENET_STAGES:
        return _IMAGENET_STAGES[backbone]
    m = _CIFAR_RESNET.fullmatch(backbone)
    if m is None:
        return None
    depth = int(m[1])
    per_block = 9 if depth in _CIFAR_BOTTLENECK_DEPTHS else 6
    if depth < 2 + per_block or (depth - 2) % per_block:
        return None
    n = (depth - 2) // per_block
    return (n, n, n)


def global_index(backbone: str, stage: int, block: int) -> int:
    """g(s, j) of docs/splits.md#layer-addresses: the stem is [0, 0] = 0, then blocks in forward order."""
    stages = stage_sizes(backbone)
    if stages is None:
        raise ValueError(f"{backbone} has no [stage, block] addressing")
    return _global(stages, stage, block)


def _global(stages: tuple[int, ...], s: int, j: int) -> int:
    if s == 0 and j == 0:
        return 0
    if not (1 <= s <= len(stages) and 0 <= j < stages[s - 1]):
        raise ValueError(f"[{s}, {j}] is not a layer of a net with stages {list(stages)}")
    return 1 + sum(stages[: s - 1]) + j


def balanced_boundaries(num_layers: int, num_modules: int) -> tuple[int, ...]:
    """Contiguous modules whose layer counts differ by at most one.

    The extra layers go to the *later* modules: early layers carry the largest activations, so keeping early
    modules short keeps the peak memory of a local step low.
    """
    if (
        isinstance(num_modules, bool)
        or not isinstance(num_modules, int)
        or not 1 <= num_modules <= num_layers
    ):
        raise ConfigError(
            "k", f"{num_modules} modules cannot be cut from {num_layers} layers", f"1..{num_layers}"
        )
    base, extra = divmod(num_layers, num_modules)
    ends, end = [], -1
    for m in range(num_modules - 1):
        end += base + (1 if m >= num_modules - extra else 0)
        ends.append(end)
    return tuple(ends)


def families() -> tuple[str, ...]:
    """Every split family: ``e2e``, then each name under ``families:`` in any ``tables/<backbone>.yaml``, sorted.

    A table file registers its families itself: nothing else lists them.
    """
    return _families(TABLE_DIR)


def __getattr__(name: str):
    if name == "FAMILIES":  # the families the table files declare right now (see families())
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_table(backbone: str) -> dict:
    """The parsed ``tables/<backbone>.yaml`` (a copy); ``{}`` for a backbone without a table."""
    return copy.deepcopy(_read_table(_check_name(backbone)))


def resolve_split(
    backbone: str,
    num_layers: int,
    k: int,
    family: str = "infopro",
    *,
    aux_depth: int | None = None,
    k_minus_d: bool = True,
    balanced_memory: str | None = None,
) -> Split:
    """The split a method of `family` uses for the user's K on `backbone` (docs/splits.md#tables).

    A paper table entry wins (after the family's K-label aliases, e.g. MLAAN 55 -> 54); any other K gets
    `balanced_boundaries`. `aux_depth` / `k_minus_d` only matter for AugLocal (K_eff = K - d, docs/methods/auglocal.md#k-minus-d);
    `balanced_memory` ("cifar10" | "stl10") picks the InfoPro* rows of docs/splits.md#resnet110.
    """
    backbone = _check_name(backbone)
    known = families()
    if family not in known:
        raise ConfigError(
            "family",
            f"unknown split family {family!r} (no table file declares it under families:)",
            ", ".join(known),
        )
    table = _read_table(backbone)
    num_layers = _check_num_layers(backbone, num_layers, table)
    if family == "e2e":  # one module whatever K says
        return Split(backbone, num_layers, (), k, family, "e2e")
    _check_k(backbone, num_layers, k)

    fam = table.get("families", {}).get(family) or {}
    if balanced_memory is not None:
        return _balanced_memory_split(backbone, num_layers, k, family, fam, balanced_memory)
    if family == "auglocal":
        return _auglocal_split(backbone, num_layers, k, fam, aux_depth, k_minus_d)

    key = (fam.get("aliases") or {}).get(k, k)
    entry = (fam.get("splits") or {}).get(key)
    if entry is None:
        return Split(backbone, num_layers, balanced_boundaries(num_layers, k), k, family, "balanced")
    return Split(backbone, num_layers, _to_boundaries(entry, backbone), k, family, f"table:{family}:{key}")


def lam_layers(backbone: str, k_label: int) -> list[list[int]] | None:
    """MLAAN LAM blocks (docs/methods/mlaan.md) as global layer indices, one list per local module 0..K-2.

    None when there is no LAM table for this K: the MLAAN method then picks downstream layers itself.
    """
    fam = _read_table(_check_name(backbone)).get("families", {}).get("mlaan") or {}
    key = (fam.get("aliases") or {}).get(k_label, k_label)
    ranges = (fam.get("lam") or {}).get(key)
    if ranges is None:
        return None
    per_module: list[list[int] | None] = [None] * (key - 1)
    for item in ranges:
        layers = list(_to_boundaries(item["layers"], backbone, ordered=False))
        for m in _parse_modules(item["modules"]):
            if not 0 <= m < len(per_module) or per_module[m] is not None:
                raise ValueError(f"{backbone} LAM K={key}: module {m} is out of range or listed twice")
            per_module[m] = list(layers)
    missing = [m for m, v in enumerate(per_module) if v is None]
    if missing:
        raise ValueError(f"{backbone} LAM K={key}: modules {missing} have no list")
    return per_module  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------


def _read_table(backbone: str) -> dict:
    return _read_file(TABLE_DIR / f"{backbone}.yaml")


@functools.cache
def _read_file(path: Path) -> dict:
    """A parsed table file, cached by path (so a different TABLE_DIR reads its own files)."""
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


@functools.cache
def _families(table_dir: Path) -> tuple[str, ...]:
    declared: set[str] = set()
    for path in sorted(table_dir.glob("*.yaml")):
        for name in _read_file(path).get("families") or {}:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"{path}: family {name!r} is not a name (lowercase letters, digits and _)")
            declared.add(name)
    return (*TABLELESS_FAMILIES, *sorted(declared - set(TABLELESS_FAMILIES)))


def _check_name(backbone: str) -> str:
    if not isinstance(backbone, str) or not _NAME.fullmatch(backbone):
        raise ConfigError(
            "backbone", f"{backbone!r} is not a backbone name", "lowercase letters, digits and _"
        )
    return backbone


def _check_num_layers(backbone: str, num_layers: int, table: dict) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError("num_layers", f"{num_layers!r} is not a layer count", "an integer >= 1")
    stages = stage_sizes(backbone)
    expected = 1 + sum(stages) if stages else table.get("num_layers")
    if expected is not None and num_layers != expected:
        raise ConfigError(
            "backbone",
            f"{backbone} has {expected} layers, but num_layers={num_layers} was passed",
            str(expected),
        )
    return num_layers


def _check_k(backbone: str, num_layers: int, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_layers:
        raise ConfigError(
            "k", f"{backbone} has {num_layers} layers, so K={k!r} is impossible", f"1..{num_layers}"
        )


def _to_boundaries(entry: Iterable, backbone: str, *, ordered: bool = True) -> tuple[int, ...]:
    """[s, j] pairs -> g(s, j); bare integers are already global indices (VGG)."""
    stages = stage_sizes(backbone)
    out = []
    for item in entry:
        if isinstance(item, int):
            out.append(item)
        elif stages is None:
            raise ValueError(f"{backbone} has no [stage, block] addressing, got {item}")
        else:
            out.append(_global(stages, *item))
    if ordered and out != sorted(set(out)):
        raise ValueError(f"{backbone}: split points {list(entry)} are not strictly increasing")
    return tuple(out)


def _parse_modules(spec: str | int) -> list[int]:
    """'0-1, 3' -> [0, 1, 3]: module ranges written the way docs/methods/mlaan.md writes them."""
    out: list[int] = []
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _auglocal_split(
    backbone: str, num_layers: int, k: int, fam: dict, aux_depth: int | None, k_minus_d: bool
) -> Split:
    """AugLocal keeps the first K_eff - 1 boundaries of the all-layers list (docs/methods/auglocal.md#k-minus-d).

    K_eff = K - d on CIFAR; the ImageNet code makes no adjustment (k_minus_d=False, K_eff = K).
    """
    if k_minus_d:
        if isinstance(aux_depth, bool) or not isinstance(aux_depth, int) or aux_depth < 0:
            raise ConfigError(
                "aux_depth",
                f"AugLocal's K - d rule (k_minus_d=True) needs the aux-net depth d, got {aux_depth!r}",
                "an integer >= 0",
            )
        k_eff = k - aux_depth
        if not 1 <= k_eff <= num_layers:
            raise ConfigError(
                "k",
                f"AugLocal runs K - d = {k} - {aux_depth} = {k_eff} modules, "
                f"but {backbone} has {num_layers} layers",
                f"{aux_depth + 1}..{num_layers}",
            )
    else:
        k_eff = k
    entry = (fam.get("splits") or {}).get(k)
    all_layers = _to_boundaries(entry, backbone) if entry is not None else tuple(range(num_layers - 1))
    source = f"table:auglocal:{k}" if entry is not None else "rule:auglocal"
    return Split(backbone, num_layers, all_layers[: k_eff - 1], k, "auglocal", source)


def _balanced_memory_split(
    backbone: str, num_layers: int, k: int, family: str, fam: dict, dataset: str
) -> Split:
    """InfoPro* rows (docs/splits.md#resnet110): only where a table has them; an explicit request never falls back to balanced."""
    rows = fam.get("balanced_memory") or {}
    if dataset not in rows:
        where = ", ".join(sorted(rows)) if rows else _balanced_memory_index(TABLE_DIR)
        raise ConfigError(
            "balanced_memory",
            f"no InfoPro* balanced-memory split for {family} on {backbone}/{dataset!r}",
            where,
        )
    entry = rows[dataset].get(k)
    if entry is None:
        allowed = ", ".join(str(x) for x in sorted(rows[dataset]))
        raise ConfigError("k", f"the {dataset} balanced-memory table of {backbone} has no K={k}", allowed)
    return Split(
        backbone,
        num_layers,
        _to_boundaries(entry, backbone),
        k,
        family,
        f"table:{family}:balanced_memory:{dataset}:{k}",
    )


@functools.cache
def _balanced_memory_index(table_dir: Path) -> str:
    """Where balanced-memory rows exist at all, for the error message."""
    found = []
    for path in sorted(table_dir.glob("*.yaml")):
        fams = (_read_file(path).get("families") or {}).items()
        for name, fam in fams:
            for dataset in (fam or {}).get("balanced_memory") or {}:
                found.append(f"{path.stem}/{name}/{dataset}")
    return "null, or one of: " + ", ".join(found) if found else "null"
