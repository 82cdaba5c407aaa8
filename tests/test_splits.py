"""Split tables vs docs/splits.md#tables / docs/methods/mlaan.md, K-label rules, and the balanced splitter."""

from __future__ import annotations

import ast

import pytest

from lla.errors import ConfigError
from lla.splits import (
    FAMILIES,
    TABLE_DIR,
    Split,
    balanced_boundaries,
    families,
    global_index,
    lam_layers,
    load_table,
    resolve_split,
    stage_sizes,
)

# Layer counts L from the task brief / docs/splits.md#layer-addresses, docs/backbones.md.
# fmt: off
NUM_LAYERS = {
    "resnet20": 10, "resnet32": 16, "resnet44": 22, "resnet56": 28, "resnet110": 55,
    "resnet18": 9, "resnet34": 17, "resnet50": 17, "resnet101": 34, "resnet152": 51,
    "resnext101_32x8d": 34, "vgg13": 10,
    "vit_tiny": 13, "vit_small": 13, "vit_base": 13, "vit_tiny_patch4": 13,
}
# fmt: on


def split(backbone, k, family="infopro", **kw) -> Split:
    return resolve_split(backbone, NUM_LAYERS[backbone], k, family, **kw)


def table_points(backbone, family, key, section="splits"):
    return [tuple(p) for p in load_table(backbone)["families"][family][section][key]]


def rng(a, b):
    """Inclusive range as a tuple, the way the split tables write 'a..b'."""
    return tuple(range(a, b + 1))


# ---- docs/splits.md#resnet32 ResNet-32, InfoPro: (K, [s,j] column, global column) ----
R32_INFOPRO = [
    (2, [(2, 1)], (7,)),
    (3, [(1, 4), (2, 4)], (5, 10)),
    (4, [(1, 2), (2, 1), (3, 0)], (3, 7, 11)),
    (8, [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)], (1, 3, 5, 7, 9, 11, 13)),
]


@pytest.mark.parametrize("k, points, bounds", R32_INFOPRO)
def test_resnet32_infopro_rows(k, points, bounds):
    assert table_points("resnet32", "infopro", k) == points
    s = split("resnet32", k)
    assert s.boundaries == bounds and s.num_modules == k and s.source == f"table:infopro:{k}"
    # MAN and MLAAN share these rows for K=2,3,4,8 (docs/splits.md#resnet32).
    assert split("resnet32", k, "man").boundaries == bounds
    assert split("resnet32", k, "mlaan").boundaries == bounds


def test_resnet32_infopro_k16_every_layer():
    points = table_points("resnet32", "infopro", 16)
    assert points[0] == (0, 0) and points[1:] == [(s, j) for s in (1, 2, 3) for j in range(5)][:-1]
    s = split("resnet32", 16)
    assert s.boundaries == rng(0, 14) and s.num_modules == 16
    assert all(len(s.module_layers(m)) == 1 for m in range(16))


# ---- docs/splits.md#resnet110 ResNet-110 ----
# fmt: off
R110_ROWS = [
    (2, [(2, 8)], (27,)),
    (3, [(1, 17), (2, 17)], (18, 36)),
    (4, [(1, 11), (2, 7), (3, 3)], (12, 26, 40)),
    (8, [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)], (5, 12, 19, 26, 33, 40, 47)),
    (16,
     [(1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11), (2, 15),
      (3, 1), (3, 5), (3, 9), (3, 13)],
     (2, 5, 8, 11, 14, 17, 20, 23, 26, 30, 34, 38, 42, 46, 50)),
]
R110_K32_POINTS = [
    (1, 1), (1, 2), (1, 4), (1, 5), (1, 7), (1, 9), (1, 11), (1, 13), (1, 14), (1, 16), (1, 17),
    (2, 1), (2, 2), (2, 4), (2, 5), (2, 7), (2, 9), (2, 11), (2, 13), (2, 14), (2, 16), (2, 17),
    (3, 1), (3, 3), (3, 4), (3, 6), (3, 7), (3, 9), (3, 11), (3, 13), (3, 15),
]
R110_K32_BOUNDS = (2, 3, 5, 6, 8, 10, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 28, 30, 32, 33,
                   35, 36, 38, 40, 41, 43, 44, 46, 48, 50, 52)
# fmt: on


@pytest.mark.parametrize("k, points, bounds", R110_ROWS)
@pytest.mark.parametrize("family", ["infopro", "man", "mlaan"])
def test_resnet110_rows(family, k, points, bounds):
    assert table_points("resnet110", family, k) == points
    s = split("resnet110", k, family)
    assert s.boundaries == bounds and s.num_modules == k


@pytest.mark.parametrize("family", ["man", "mlaan", "infopro"])
def test_resnet110_k32(family):
    assert table_points("resnet110", family, 32) == R110_K32_POINTS
    s = split("resnet110", 32, family)
    assert s.boundaries == R110_K32_BOUNDS and s.num_modules == 32


BALANCED_MEMORY = [  # docs/splits.md#resnet110 InfoPro*: (dataset, K, [s,j], globals)
    ("cifar10", 2, [(1, 14)], (15,)),
    ("cifar10", 3, [(1, 9), (2, 2)], (10, 21)),
    ("cifar10", 4, [(1, 6), (1, 14), (2, 8)], (7, 15, 27)),
    ("stl10", 2, [(1, 14)], (15,)),
    ("stl10", 3, [(1, 8), (2, 1)], (9, 20)),
    ("stl10", 4, [(1, 6), (1, 14), (2, 8)], (7, 15, 27)),
]


@pytest.mark.parametrize("dataset, k, points, bounds", BALANCED_MEMORY)
def test_infopro_balanced_memory(dataset, k, points, bounds):
    rows = load_table("resnet110")["families"]["infopro"]["balanced_memory"][dataset]
    assert [tuple(p) for p in rows[k]] == points
    s = split("resnet110", k, balanced_memory=dataset)
    assert s.boundaries == bounds and s.num_modules == k
    assert split("resnet110", k, "man", balanced_memory=dataset).boundaries == bounds
    # MAN++ (CIFAR) always puts the stem in its own module.
    assert split("resnet110", k, "manpp", balanced_memory=dataset).boundaries == (0, *bounds)
    # The plain K=2..4 rows differ, so the flag really selects another table.
    assert split("resnet110", k).boundaries != bounds


def test_balanced_memory_errors():
    with pytest.raises(ConfigError, match="resnet110/infopro/cifar10"):
        split("resnet32", 2, balanced_memory="cifar10")
    with pytest.raises(ConfigError) as err:
        split("resnet110", 8, balanced_memory="cifar10")
    assert err.value.key == "k" and "1, 2, 3, 4" in str(err.value)
    with pytest.raises(ConfigError):
        split("resnet110", 2, balanced_memory="svhn")
    with pytest.raises(ConfigError):
        split("resnet110", 4, "mlaan", balanced_memory="cifar10")


# ---- docs/splits.md#imagenet-splits ImageNet ----
IMAGENET_ROWS = [  # (backbone, family, K, [s,j] points, globals)
    ("resnet101", "infopro", 2, [(2, 0)], (4,)),
    ("resnet152", "infopro", 2, [(2, 5)], (9,)),
    ("resnext101_32x8d", "infopro", 2, [(2, 2)], (6,)),
    ("resnet101", "man", 2, [(2, 0)], (4,)),
    ("resnet152", "man", 2, [(2, 5)], (9,)),
    ("resnext101_32x8d", "man", 2, [(2, 0)], (4,)),
    ("resnet34", "man", 2, [(2, 0)], (4,)),
    ("resnet101", "manpp", 4, [(2, 2), (3, 8), (3, 16)], (6, 16, 24)),
    ("resnext101_32x8d", "manpp", 4, [(2, 2), (3, 8), (3, 16)], (6, 16, 24)),
    ("resnet152", "manpp", 4, [(2, 6), (3, 13), (3, 25)], (10, 25, 37)),
]


@pytest.mark.parametrize("backbone, family, k, points, bounds", IMAGENET_ROWS)
def test_imagenet_rows(backbone, family, k, points, bounds):
    assert table_points(backbone, family, k) == points
    s = split(backbone, k, family)
    assert s.boundaries == bounds and s.num_modules == k


@pytest.mark.parametrize("backbone, k, last", [("resnet34", 16, 15), ("resnet101", 33, 32)])
def test_imagenet_mlaan_every_block_stem_glued(backbone, k, last):
    s = split(backbone, k, "mlaan")
    assert s.boundaries == rng(1, last) and s.num_modules == k
    assert list(s.module_layers(0)) == [0, 1]  # stem + layer1[0]


@pytest.mark.parametrize(
    "backbone, k, last", [("resnet34", 17, 15), ("resnet50", 17, 15), ("resnet101", 34, 32), ("vgg13", 10, 8)]
)
def test_imagenet_auglocal_no_k_minus_d(backbone, k, last):
    s = split(backbone, k, "auglocal", aux_depth=4, k_minus_d=False)
    assert s.boundaries == rng(0, last) and s.num_modules == k


def test_global_index_matches_section_1():
    assert [global_index("resnet32", s, 0) for s in (1, 2, 3)] == [1, 6, 11]
    assert [global_index("resnet110", s, 0) for s in (1, 2, 3)] == [1, 19, 37]
    assert [global_index("resnet34", s, 0) for s in (2, 3, 4)] == [4, 8, 14]
    assert [global_index("resnet101", s, 0) for s in (2, 3, 4)] == [4, 8, 31]
    assert [global_index("resnet152", s, 0) for s in (2, 3, 4)] == [4, 12, 48]
    assert global_index("resnet32", 0, 0) == 0
    with pytest.raises(ValueError):
        global_index("resnet32", 1, 5)  # stage 1 has blocks 0..4


# ---- K labels (docs/splits.md#tables, docs/splits.md#k-labels) ----
def test_k_labels():
    man16 = split("resnet32", 16, "man")
    assert man16.boundaries == rng(1, 14) and man16.num_modules == 15 and man16.k_label == 16
    man55 = split("resnet110", 55, "man")
    assert man55.boundaries == rng(1, 53) and man55.num_modules == 54 and man55.k_label == 55
    # MLAAN: honest keys plus MAN's labels as aliases; `method=mlaan backbone=resnet110 k=55` -> 54 modules.
    for k in (54, 55):
        s = split("resnet110", k, "mlaan")
        assert s.num_modules == 54 and s.boundaries == rng(1, 53) and s.source == "table:mlaan:54"
        assert s.k_label == k
    for k in (15, 16):
        assert split("resnet32", k, "mlaan").boundaries == rng(1, 14)
    assert split("resnet32", 15, "man").boundaries == rng(1, 14)
    # MAN++ (CIFAR) splits the stem off: "16" and "55" are true module counts.
    assert split("resnet32", 16, "manpp").boundaries == rng(0, 14)
    assert split("resnet110", 55, "manpp").boundaries == rng(0, 53)
    assert split("resnet32", 8, "manpp").boundaries == (0, 1, 3, 5, 7, 9, 11, 13)
    assert split("resnet110", 32, "manpp").boundaries == (0, *R110_K32_BOUNDS)
    # AugLocal / InfoPro baselines at R110 K=55: a true 55 modules (docs/splits.md#resnet110 last row).
    assert split("resnet110", 55).boundaries == rng(0, 53)


def test_e2e_is_one_module_whatever_k():
    for k in (1, 16, 99):
        s = split("resnet32", k, "e2e")
        assert s.boundaries == () and s.num_modules == 1 and s.module_layers(0) == range(16)


def test_auglocal_k_minus_d():
    s = split("resnet32", 16, "auglocal", aux_depth=2)
    assert s.num_modules == 14 and s.boundaries == rng(0, 12)
    assert list(s.module_layers(13)) == [13, 14, 15]
    s = split("resnet110", 55, "auglocal", aux_depth=3)
    assert s.num_modules == 52 and list(s.module_layers(51)) == [51, 52, 53, 54]  # last d+1 layers
    # Prefix keys (docs/methods/auglocal.md#k-minus-d): key k -> first k-1 layers alone, the rest in one module.
    s = split("resnet32", 7, "auglocal", aux_depth=0)
    assert s.boundaries == rng(0, 5) and s.module_layers(6) == range(6, 16)
    # The same rule on a backbone without an AugLocal table.
    assert split("resnet44", 10, "auglocal", aux_depth=3).boundaries == rng(0, 5)
    with pytest.raises(ConfigError, match="aux_depth"):
        split("resnet32", 16, "auglocal")
    with pytest.raises(ConfigError, match=r"3\.\.16"):
        split("resnet32", 2, "auglocal", aux_depth=2)


# ---- balanced splitter ----
def check_partition(s: Split):
    layers = [list(s.module_layers(m)) for m in range(s.num_modules)]
    assert [x for chunk in layers for x in chunk] == list(range(s.num_layers))  # contiguous, covers all
    sizes = [len(c) for c in layers]
    assert min(sizes) >= 1
    return sizes


@pytest.mark.parametrize("backbone", ["resnet32", "resnet110"])
def test_balanced_every_k(backbone):
    n = NUM_LAYERS[backbone]
    for k in range(1, n + 1):
        b = balanced_boundaries(n, k)
        sizes = check_partition(Split(backbone, n, b, k, "infopro", "balanced"))
        assert len(sizes) == k and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes)  # the extra layers sit in the later modules
        # Every K resolves, table or not; a K without a table entry uses exactly the balanced split.
        s = split(backbone, k, "man")
        check_partition(s)
        if s.source == "balanced":
            assert s.boundaries == b and s.num_modules == k


def test_balanced_examples():
    assert balanced_boundaries(16, 3) == (4, 9)  # 5, 5, 6
    assert balanced_boundaries(10, 4) == (1, 3, 6)  # 2, 2, 3, 3
    assert balanced_boundaries(16, 1) == ()
    assert split("resnet32", 5).source == "balanced"
    assert split("resnet18", 3).boundaries == (2, 5)  # no tables for ResNet-18 at all


@pytest.mark.parametrize("k", [0, -1, 17, 100])
@pytest.mark.parametrize("family", ["infopro", "man", "mlaan", "manpp"])
def test_invalid_k(family, k):
    with pytest.raises(ConfigError) as err:
        split("resnet32", k, family)
    msg = str(err.value)
    assert err.value.key == "k" and "resnet32" in msg and "16 layers" in msg and "1..16" in msg


def test_invalid_inputs():
    with pytest.raises(ConfigError, match="1..55"):
        split("resnet110", 56, "auglocal", aux_depth=0)
    with pytest.raises(ConfigError):
        balanced_boundaries(16, 0)
    with pytest.raises(ConfigError, match="family"):
        split("resnet32", 4, "greedy")
    with pytest.raises(ConfigError, match="16 layers"):
        resolve_split("resnet32", 15, 4)  # wrong layer count from the caller
    with pytest.raises(ConfigError):
        resolve_split("ResNet-32", 16, 4)
    with pytest.raises(ValueError):
        Split("resnet32", 16, (3, 3), 3, "infopro", "x")
    with pytest.raises(ValueError):
        Split("resnet32", 16, (15,), 2, "infopro", "x")  # the last module would be empty


# ---- Split helpers ----
@pytest.mark.parametrize(
    "s",
    [
        split("resnet32", 4),
        split("resnet32", 16, "man"),
        split("resnet110", 32, "manpp"),
        split("resnet110", 55, "auglocal", aux_depth=3),
        split("resnet152", 4, "manpp"),
        split("resnet32", 1, "e2e"),
    ],
)
def test_module_layers_and_module_of_layer(s):
    check_partition(s)
    for m in range(s.num_modules):
        assert all(s.module_of_layer(layer) == m for layer in s.module_layers(m))
        if m < s.num_modules - 1:
            assert s.module_layers(m)[-1] == s.boundaries[m]
    assert s.module_of_layer(0) == 0 and s.module_of_layer(s.num_layers - 1) == s.num_modules - 1
    with pytest.raises(IndexError):
        s.module_layers(s.num_modules)
    with pytest.raises(IndexError):
        s.module_of_layer(s.num_layers)


# ---- LAM lists (docs/methods/mlaan.md) ----
def g(backbone, *points):
    return [global_index(backbone, s, j) for s, j in points]


def test_lam_resnet32():
    lam8 = lam_layers("resnet32", 8)
    assert len(lam8) == 7
    assert lam8[0] == lam8[1] == g("resnet32", (2, 0), (3, 0), (3, 2), (3, 4)) == [6, 11, 13, 15]
    assert lam8[2] == g("resnet32", (2, 0), (3, 0), (3, 3), (3, 4))
    assert lam8[6] == [14, 15]
    lam15 = lam_layers("resnet32", 15)
    assert len(lam15) == 14 and lam_layers("resnet32", 16) == lam15  # MAN label alias
    assert lam15[3] == lam15[0] == [6, 11, 13, 15] and lam15[2] == lam15[4] == [6, 11, 14, 15]
    assert lam15[10] == g("resnet32", (3, 1), (3, 2), (3, 4)) and lam15[13] == [15]


def test_lam_resnet110_and_imagenet():
    lam32 = lam_layers("resnet110", 32)
    assert len(lam32) == 31 and lam32[10] == [19, 37, 39, 54] and lam32[11] == [37, 39, 40, 54]
    assert lam32[21] == g("resnet110", (3, 0), (3, 3), (3, 4), (3, 17)) and lam32[25] == [45, 54]
    lam54 = lam_layers("resnet110", 54)
    assert len(lam54) == 53 and lam_layers("resnet110", 55) == lam54
    assert lam54[17] == [19, 37, 39, 54] and lam54[35] == [37, 40, 41, 54] and lam54[52] == [54]
    r34 = lam_layers("resnet34", 16)
    assert len(r34) == 15 and r34[0] == [4, 5, 8, 14, 16] and r34[13] == [15, 15, 16]  # duplicate kept
    r101 = lam_layers("resnet101", 33)
    assert len(r101) == 32 and r101[7] == r101[29] == [31, 32] and r101[31] == [32, 33]


def test_lam_none_without_table():
    assert lam_layers("resnet32", 4) is None
    assert lam_layers("resnet110", 16) is None
    assert lam_layers("resnet152", 50) is None  # MLAAN's R152 LAM has no split entry (docs/splits.md#imagenet-splits)
    assert lam_layers("vgg13", 10) is None


@pytest.mark.parametrize(
    "backbone, k",
    [
        ("resnet32", 8),
        ("resnet32", 15),
        ("resnet110", 32),
        ("resnet110", 54),
        ("resnet34", 16),
        ("resnet101", 33),
    ],
)
def test_lam_fits_its_split(backbone, k):
    """One LAM list per local module; listed blocks lie at or after the module's end.

    Exception kept from the reference data: MLAAN's ResNet-34 lists for modules 5-6 (from layer2[1], global 5)
    and 9-12 (from layer3[1], global 9) start upstream of those modules' ends.
    """
    s = split(backbone, k, "mlaan")
    lam = lam_layers(backbone, k)
    assert len(lam) == s.num_modules - 1
    upstream = [m for m, layers in enumerate(lam) if min(layers) < s.module_layers(m)[-1]]
    assert upstream == ([5, 6, 9, 10, 11, 12] if backbone == "resnet34" else [])
    assert all(max(layers) < s.num_layers for layers in lam)


# ---- the YAML files themselves ----
def test_every_table_entry_resolves():
    files = sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))
    assert set(files) == set(NUM_LAYERS)
    for backbone in files:
        table = load_table(backbone)
        n = NUM_LAYERS[backbone]
        assert table["backbone"] == backbone and table["num_layers"] == n
        stages = stage_sizes(backbone)
        assert stages is None or 1 + sum(stages) == n
        for family, fam in table["families"].items():
            assert family in FAMILIES
            for key in fam["splits"]:
                s = split(backbone, key, family, aux_depth=0)
                assert s.source == f"table:{family}:{key}"
                if family == "auglocal":  # the all-layers list
                    assert s.boundaries == rng(0, n - 2)
            for alias, key in (fam.get("aliases") or {}).items():
                assert split(backbone, alias, family).boundaries == split(backbone, key, family).boundaries


def test_the_table_files_register_the_families(tmp_path, monkeypatch):
    assert families() == FAMILIES == ("e2e", "auglocal", "hpff", "infopro", "man", "manpp", "mlaan")

    def tables(name: str, edit: dict[str, tuple[str, str]]):
        """A copy of the tables with (old, new) text replacements per file, made the table folder in use."""
        folder = tmp_path / name
        folder.mkdir()
        for path in TABLE_DIR.glob("*.yaml"):
            old, new = edit.get(path.stem, ("", ""))
            (folder / path.name).write_text(path.read_text().replace(old, new, 1) if old else path.read_text())
        monkeypatch.setattr("lla.splits.TABLE_DIR", folder)

    tables("plain", {})
    with pytest.raises(ConfigError, match="unknown split family 'greedy'"):
        split("resnet20", 4, "greedy")
    # a block under families: in one table file is all a new family needs
    tables("greedy", {"resnet20": ("families: {}", "families:\n  greedy:\n    splits:\n      3: [[1, 2], [2, 2]]")})
    assert "greedy" in families()
    s = split("resnet20", 3, "greedy")
    assert (s.boundaries, s.family, s.source) == ((3, 6), "greedy", "table:greedy:3")
    assert split("resnet20", 4, "greedy").source == "balanced"  # a K without a row
    tables("bad", {"vgg13": ("  auglocal:", "  Bad-Name:")})
    with pytest.raises(ValueError, match="Bad-Name"):
        families()


def test_load_table_is_a_copy_and_unknown_backbones_fall_back():
    load_table("resnet32")["families"]["infopro"]["splits"][2] = [[1, 0]]
    assert split("resnet32", 2).boundaries == (7,)
    assert load_table("vgg19") == {}
    s = resolve_split("vgg19", 16, 16, "infopro")  # no table, no known layer count: balanced
    assert s.source == "balanced" and s.num_modules == 16


def test_splits_imports_no_torch():
    """lla.splits must stay importable without torch or the backbones (callers pass num_layers)."""
    tree = ast.parse((TABLE_DIR.parent / "__init__.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in names if m.split(".")[0] == "torch" or m.startswith("lla.backbones")}
