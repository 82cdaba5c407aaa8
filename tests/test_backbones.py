"""Backbones (docs/splits.md#layer-addresses, docs/backbones.md): shapes, per-layer metadata, torchvision parity, init, registry and configs.

Metadata-only checks build on the meta device (no memory, no init cost); the big ImageNet nets are built for real
once per module and forwarded at 64x64 only, to stay fast on 2 CPU cores.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lla.backbones import BACKBONES, build_backbone
from lla.backbones.cifar_resnet import CifarBasicBlock
from lla.backbones.imagenet_resnet import BasicBlock, Bottleneck
from lla.errors import ConfigError

CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext101_32x8d", "vgg13"]
VIT = ["vit_tiny", "vit_small", "vit_base", "vit_tiny_patch4"]  # token-layout chains: tests/test_vit.py
TORCHVISION_NAME = {"vgg13": "vgg13_bn"}
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "backbone"


def meta_build(name: str, num_classes: int = 10, **kwargs):
    with torch.device("meta"):
        return build_backbone(name, num_classes, **kwargs)


@pytest.fixture(scope="module")
def imagenet_nets():
    """Each ImageNet backbone built once (real weights), shared by every test below."""
    torch.manual_seed(0)
    return {name: build_backbone(name, 1000).eval() for name in IMAGENET}


def walk(net, x):
    """Run the chain layer by layer, returning every layer's output."""
    outs = []
    for layer in net.layers:
        x = layer(x)
        outs.append(x)
    return outs


def check_layer_outputs(net, image_size, outs):
    for spec, out in zip(net.specs, outs, strict=True):
        side = net.spatial_size(spec.index, image_size)
        assert tuple(out.shape[1:]) == (spec.out_channels, side, side), (net.name, spec)


def test_registry_holds_exactly_the_spec_backbones():
    assert sorted(BACKBONES) == sorted(CIFAR + IMAGENET + VIT)


# docs/splits.md#layer-addresses: L values and global indices ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, num_layers, stage_sizes",
    [
        ("resnet20", 10, [3, 3, 3]),
        ("resnet32", 16, [5, 5, 5]),
        ("resnet110", 55, [18, 18, 18]),
        ("resnet18", 9, [2, 2, 2, 2]),
        ("resnet34", 17, [3, 4, 6, 3]),
        ("resnet50", 17, [3, 4, 6, 3]),
        ("resnet101", 34, [3, 4, 23, 3]),
        ("resnet152", 51, [3, 8, 36, 3]),
        ("resnext101_32x8d", 34, [3, 4, 23, 3]),
        ("vgg13", 10, [1, 2, 2, 2, 2]),
    ],
)
def test_layer_counts(name, num_layers, stage_sizes):
    net = meta_build(name)
    assert net.num_layers == len(net.specs) == num_layers
    assert net.stage_sizes == stage_sizes
    assert [s.index for s in net.specs] == list(range(num_layers))


@pytest.mark.parametrize(
    "name, stage_starts",
    [
        ("resnet32", [1, 6, 11]),
        ("resnet110", [1, 19, 37]),
        ("resnet34", [1, 4, 8, 14]),
        ("resnet50", [1, 4, 8, 14]),
        ("resnet101", [1, 4, 8, 31]),
        ("resnet152", [1, 4, 12, 48]),
    ],
)
def test_global_index_matches_methods_section_1(name, stage_starts):
    net = meta_build(name)
    assert net.global_index(0, 0) == 0
    for stage, start in enumerate(stage_starts, start=1):
        assert net.global_index(stage, 0) == start
        assert net.global_index(stage, 2) == start + 2
    # g(s, j) is exactly where spec (s, j) sits in the chain
    assert all(net.global_index(s.stage, s.block) == s.index for s in net.specs)


def test_global_index_rejects_missing_layers():
    net = meta_build("resnet32")
    for stage, block in [(0, 1), (1, 5), (4, 0), (-1, 0), (2, -1)]:
        with pytest.raises(ConfigError, match=r"\[1,0\.\.4\]"):
            net.global_index(stage, block)


# docs/backbones.md: forward shapes and per-layer specs ----------------------------------------------------------------


@pytest.mark.parametrize("name", CIFAR)
@pytest.mark.parametrize("image_size", [16, 32])
def test_cifar_shapes_and_specs(name, image_size):
    net = build_backbone(name, 7).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        outs = walk(net, x)
        assert net.head(outs[-1]).shape == (2, 7)
        assert net(x).shape == (2, 7)
    check_layer_outputs(net, image_size, outs)
    # docs/backbones.md#cifar-resnet stage widths 16/32/64 at full, 1/2, 1/4 resolution
    assert [net.specs[net.global_index(s, 0)].out_channels for s in (1, 2, 3)] == [16, 32, 64]
    assert [net.spatial_size(net.global_index(s, 0), image_size) for s in (1, 2, 3)] == [
        image_size,
        image_size // 2,
        image_size // 4,
    ]


def test_cifar_runs_at_stl10_size_and_reports_section_2_1_shapes():
    net = build_backbone("resnet20", 10).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    r32 = meta_build("resnet32")
    assert [r32.spatial_size(i, 96) for i in (5, 10, 15)] == [96, 48, 24]
    assert [r32.spatial_size(i, 32) for i in (5, 10, 15)] == [32, 16, 8]


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_shapes_and_specs(imagenet_nets, name):
    net = imagenet_nets[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = walk(net, x)
        assert net.head(outs[-1]).shape == (2, 1000)
    check_layer_outputs(net, 64, outs)


def test_spatial_size_rounding_on_odd_inputs(imagenet_nets):
    # ResNet stride-2 ops are padded (ceil); VGG's MaxPool2d(2) floors.
    for name, size in [("resnet18", 50), ("vgg13", 36)]:
        net = imagenet_nets[name]
        with torch.no_grad():
            outs = walk(net, torch.randn(1, 3, size, size))
        check_layer_outputs(net, size, outs)
    assert [imagenet_nets["resnet18"].spatial_size(i, 50) for i in (0, 3, 5, 7)] == [13, 7, 4, 2]
    assert [imagenet_nets["vgg13"].spatial_size(i, 36) for i in (1, 3, 5, 7, 9)] == [36, 18, 9, 4, 2]
    with pytest.raises(ConfigError):
        imagenet_nets["vgg13"].spatial_size(10, 224)


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_specs_are_a_consistent_chain(name):
    net = meta_build(name)
    reduction = 1
    for prev, spec in zip([None, *net.specs], net.specs):
        reduction *= spec.stride
        assert spec.reduction == reduction
        assert spec.in_channels == (3 if prev is None else prev.out_channels)
        assert (spec.kind == "stem") == (spec.index == 0) == (spec.stage == 0)
    assert net.specs[0].stride == {"cifar_resnet": 1, "imagenet_resnet": 4, "vgg": 1}[net.family]
    assert {s.kind for s in net.specs[1:]} == {
        "cifar_resnet": {"basic"},
        "vgg": {"conv"},
        "imagenet_resnet": {"basic"} if name in ("resnet18", "resnet34") else {"bottleneck"},
    }[net.family]


def test_imagenet_spatial_sizes_at_224():
    net = meta_build("resnet50")
    ends = [net.global_index(s, n - 1) for s, n in enumerate(net.stage_sizes, start=1)]
    assert net.spatial_size(0, 224) == 56
    assert [net.spatial_size(i, 224) for i in ends] == [56, 28, 14, 7]
    assert [net.specs[i].out_channels for i in ends] == [256, 512, 1024, 2048]
    assert net.specs[-1].reduction == 32


def test_vgg_pools_open_the_next_layer_and_the_head():
    net = meta_build("vgg13")
    pooled = [i for i, layer in enumerate(net.layers) if isinstance(layer[0], nn.MaxPool2d)]
    assert pooled == [2, 4, 6, 8]
    assert [s.stride for s in net.specs] == [1, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    assert [s.stage for s in net.specs] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert isinstance(net.head[0], nn.MaxPool2d)
    assert all(layer[-3].bias is not None for layer in net.layers)  # conv3x3 with bias (docs/backbones.md#vgg)


# torchvision parity (docs/backbones.md#imagenet-resnet, docs/backbones.md#vgg) ----------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_parameter_count_equals_torchvision(name):
    ours = meta_build(name, 1000)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, TORCHVISION_NAME.get(name, name))(num_classes=1000)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext101_32x8d", "vgg13"])
def test_same_function_as_torchvision(imagenet_nets, name):
    """With our weights loaded into torchvision's model, both give the same logits: same ops, same order."""
    ours = imagenet_nets[name]
    with torch.device("meta"):
        theirs = getattr(torchvision.models, TORCHVISION_NAME.get(name, name))(num_classes=1000)
    theirs = theirs.to_empty(device="cpu").eval()
    theirs.load_state_dict(dict(zip(theirs.state_dict(), ours.state_dict().values(), strict=True)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


# init (docs/backbones.md#cifar-resnet) --------------------------------------------------------------------------------


def test_cifar_init_statistics():
    torch.manual_seed(0)
    net = build_backbone("resnet110", 10)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 9 * 32 * 32:
            expected = math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
            assert m.weight.std().item() == pytest.approx(expected, rel=0.05)
            assert abs(m.weight.mean().item()) < 0.1 * expected
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    fc = net.head[-1]
    bound = 1 / math.sqrt(fc.in_features)  # PyTorch's default Linear init, untouched (docs/backbones.md#cifar-resnet)
    assert fc.weight.abs().max() <= bound and fc.weight.std() > bound / 3
    assert not torch.all(fc.bias == 0)


def test_imagenet_and_vgg_init(imagenet_nets):
    conv = imagenet_nets["resnet34"].layers[16].conv1  # 512 -> 512, 3x3: kaiming fan_out
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (9 * 512)), rel=0.05)
    vgg = imagenet_nets["vgg13"]
    linears = [m for m in vgg.head if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linears] == [25088, 4096, 4096]
    assert linears[1].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert all(torch.all(m.bias == 0) for m in vgg.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("name, last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual(name, last_bn):
    for flag in (False, True):
        net = build_backbone(name, 10, zero_init_residual=flag)
        weights = [getattr(layer, last_bn).weight for layer in net.layers[1:]]
        assert all(torch.all(w == (0.0 if flag else 1.0)) for w in weights)
        assert torch.all(net.layers[1].bn1.weight == 1)


def test_droprate_reaches_every_cifar_block():
    net = build_backbone("resnet20", 10, droprate=0.3)
    assert [layer.dropout.p for layer in net.layers[1:]] == [0.3] * 9
    assert build_backbone("resnet20", 10).layers[1].dropout.p == 0.0


# shortcuts and make_block ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, projections",
    [
        ("resnet32", 2),
        ("resnet110", 2),
        ("resnet18", 3),
        ("resnet34", 3),
        ("resnet50", 4),
        ("resnet152", 4),
        ("resnext101_32x8d", 4),
    ],
)
def test_projection_shortcuts_exactly_where_shape_changes(name, projections):
    net = meta_build(name)
    found = 0
    for spec, layer in zip(net.specs[1:], net.layers[1:]):
        changes = spec.stride != 1 or spec.in_channels != spec.out_channels
        assert (layer.shortcut is not None) == changes, spec
        if changes:
            conv, bn = layer.shortcut
            assert conv.kernel_size == (1, 1) and conv.stride == (spec.stride,) * 2 and conv.bias is None
            assert isinstance(bn, nn.BatchNorm2d)
            found += 1
    assert found == projections


@pytest.mark.parametrize(
    "name, block_type, cin, cout, stride, side",
    [
        ("resnet32", CifarBasicBlock, 16, 32, 2, 8),
        ("resnet32", CifarBasicBlock, 64, 64, 1, 4),
        ("resnet34", BasicBlock, 128, 256, 2, 7),
        ("resnet50", Bottleneck, 256, 512, 2, 8),
        ("resnet50", Bottleneck, 64, 256, 1, 4),
        ("resnext101_32x8d", Bottleneck, 512, 1024, 2, 8),
        ("vgg13", nn.Sequential, 64, 128, 2, 7),
        ("vgg13", nn.Sequential, 128, 128, 1, 5),
    ],
)
def test_make_block(name, block_type, cin, cout, stride, side):
    net = meta_build(name)
    with torch.device("cpu"):
        block = net.make_block(cin, cout, stride)
    assert type(block) is block_type
    if name != "vgg13":
        assert (block.shortcut is not None) == (stride != 1 or cin != cout)
    else:
        assert isinstance(block[0], nn.MaxPool2d) == (stride == 2)
    assert all(p.device.type == "cpu" for p in block.parameters())
    with torch.no_grad():
        out = block.eval()(torch.randn(2, cin, side, side))
    expected = (
        side // stride if name == "vgg13" else -(-side // stride)
    )  # VGG pools floor, ResNets pad (ceil)
    assert out.shape == (2, cout, expected, expected)


def test_make_block_is_fresh_and_matches_backbone_blocks():
    net = build_backbone("resnet32", 10)
    block = net.make_block(16, 16, 1)
    assert all(p is not q for p in block.parameters() for q in net.parameters())
    assert [p.shape for p in block.parameters()] == [p.shape for p in net.layers[2].parameters()]
    assert not torch.equal(block.conv1.weight, net.layers[2].conv1.weight)


# registry errors and Hydra configs ---------------------------------------------------------------------------------


def test_unknown_backbone_lists_the_names():
    with pytest.raises(ConfigError) as err:
        build_backbone("nope", 10)
    assert err.value.key == "backbone"
    assert err.value.allowed == ", ".join(sorted(BACKBONES))
    assert "resnet32" in str(err.value) and "vgg13" in str(err.value)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="droprate"):
        build_backbone("resnet18", 10, droprate=0.1)
    with pytest.raises(ConfigError, match="num_classes"):
        build_backbone("resnet32", 0)


def test_every_backbone_has_a_config_that_builds_it():
    files = {p.stem: p for p in CONF_DIR.glob("*.yaml")}
    assert sorted(files) == sorted(BACKBONES)
    for name, path in files.items():
        cfg = yaml.safe_load(path.read_text())
        assert cfg["_target_"] == "lla.backbones.build_backbone" and cfg["name"] == name
        assert "num_classes" not in cfg
        options = set(inspect.signature(BACKBONES[name]).parameters) - {"num_classes"}
        assert set(cfg) - {"_target_", "name"} == options
    for name in ("resnet32", "resnet18"):
        net = instantiate(OmegaConf.load(files[name]), num_classes=5)
        assert net.name == name and net.num_classes == 5 and net.head[-1].out_features == 5
