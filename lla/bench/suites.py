"""Benchmark suites as data: which (method, backbone, K, batch, image size, numerics) rows ``--suite`` runs.

``default`` is issue 7's suite (``make bench``): ResNet-32 K=16 and ResNet-110 K=55 at 32x32, batch 64, for every
method; ImageNet ResNet-101 K=2 (e2e, infopro, man) and ResNet-34 K=16 (auglocal, mlaan) at 224x224, batch 8;
ResNet-32 K=16 again under bf16-mixed and channels_last, and with the memory options (``method.aux_checkpoint``,
then also ``backbone.fused_bn_relu``), to show what each does; ViT-S K=4 (e2e, man) at 224x224, batch 8, and
every ViT method in ``vit``. Every group carries its own E2E row, for the ratios.
"""

from __future__ import annotations

from lla.bench.runner import BenchConfig

# MAN runs on InfoPro here because the reference figures (targets.py) are InfoPro+MAN; MLAAN with GAP+Linear heads
# because the reference figure is resnetMLAAN.py's (auxMLAAN.py heads, docs/methods/mlaan.md); AugLocal's depths are the README's
# (R32 d=2, R110 d=3) and run.sh's ImageNet d=4.
CIFAR_METHODS: dict[str, tuple[tuple[str, object], ...]] = {
    "e2e": (),
    "dgl": (),
    "infopro": (),
    "auglocal": (("depth", 2),),
    "man": (("base", "infopro"),),
    "mlaan": (("head", "linear"),),
}
LOCAL_METHODS = tuple(m for m in CIFAR_METHODS if m != "e2e")
AUX_CHECKPOINT = (("aux_checkpoint", True),)
LEAN = (*AUX_CHECKPOINT, ("backbone.fused_bn_relu", True))  # every memory option lla has


def row_options(method: str, extra: tuple[tuple[str, object], ...]) -> tuple[tuple[str, object], ...]:
    """``extra`` for one row: dotted (network) options go to every row, method options skip E2E (no aux net)."""
    return tuple((key, v) for key, v in extra if "." in key or method != "e2e")


def _cifar(backbone: str, k: int, depth: int, precision: str = "32-true", channels_last: bool = False,
           methods: tuple[str, ...] = tuple(CIFAR_METHODS), extra: tuple[tuple[str, object], ...] = ()):
    rows = []
    for method in methods:
        options = CIFAR_METHODS[method]
        if method == "auglocal":
            options = (("depth", depth),)
        rows.append(BenchConfig(method, backbone, k, 64, 32, options + row_options(method, extra), precision,
                                channels_last))
    return rows


def _imagenet(backbone: str, k: int, methods: dict[str, tuple], batch: int = 8):
    return [BenchConfig(m, backbone, k, batch, 224, opts) for m, opts in methods.items()]


# ViT-S K=4 at 224x224, batch 8: MAN++'s ImageNet ViT setting (docs/vit.md#memory). MAN on DGL, as MAN++'s ViT code.
VIT_METHODS: dict[str, tuple] = {"e2e": (), "dgl": (), "infopro": (), "man": (("base", "dgl"),), "mlaan": ()}


def vit_suite() -> list[BenchConfig]:
    """Every method that runs on ViTs, on ViT-S K=4 (``lla-bench --suite vit``)."""
    return _imagenet("vit_small", 4, VIT_METHODS)


def default_suite() -> list[BenchConfig]:
    return [
        *_cifar("resnet32", 16, depth=2),
        *_cifar("resnet110", 55, depth=3),
        *_imagenet("resnet101", 2, {"e2e": (), "infopro": (), "man": (("base", "infopro"),)}),
        *_imagenet("resnet34", 16, {"e2e": (), "auglocal": (("depth", 4),), "mlaan": ()}),
        *_imagenet("vit_small", 4, {m: VIT_METHODS[m] for m in ("e2e", "man")}),  # the rest: --suite vit
        # bf16 has no hardware support on an AVX2-only CPU (emulated, 10-15x slower): two methods show the memory
        # effect; every method runs under bf16 in `lla-bench --methods ... --precision bf16-mixed`.
        *_cifar("resnet32", 16, depth=2, precision="bf16-mixed", methods=("e2e", "dgl")),
        *_cifar("resnet32", 16, depth=2, channels_last=True, methods=("e2e", "dgl", "man")),
        # method.aux_checkpoint: the same rows recomputing aux activations in backward (memory vs time) ...
        *_cifar("resnet32", 16, depth=2, methods=LOCAL_METHODS, extra=AUX_CHECKPOINT),
        # ... and with backbone.fused_bn_relu on top (E2E included, so the ratios compare like with like)
        *_cifar("resnet32", 16, depth=2, extra=LEAN),
        *_cifar("resnet110", 55, depth=3, methods=("e2e", "auglocal", "man"), extra=LEAN),
    ]


def quick_suite() -> list[BenchConfig]:
    """ResNet-32 K=16 only: plain, with aux_checkpoint, and lean (both memory options); the reference comparisons."""
    return [*_cifar("resnet32", 16, depth=2), *_cifar("resnet32", 16, depth=2, methods=LOCAL_METHODS,
                                                       extra=AUX_CHECKPOINT), *_cifar("resnet32", 16, 2, extra=LEAN)]


def hpff_suite() -> list[BenchConfig]:
    """HPFF on ResNet-32 K=16 (15 modules) at 32x32, batch 64, on both bases, beside E2E (docs/methods/hpff.md#memory)."""
    return [BenchConfig("e2e", "resnet32", 16, 64, 32),
            *(BenchConfig("hpff", "resnet32", 16, 64, 32, (("base", base),)) for base in ("dgl", "infopro"))]


SUITES = {"default": default_suite, "quick": quick_suite, "hpff": hpff_suite, "vit": vit_suite}
