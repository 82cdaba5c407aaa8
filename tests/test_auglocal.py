"""AugLocal (docs/methods/auglocal.md, docs/methods/auglocal.md#k-minus-d, docs/reference-code.md#auglocal-quirks): sampling, pyramid, stride rule, aux nets, K - d split, training."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lla.aux.auglocal import auglocal_aux, aux_plan, net_dims, pyramid_depths, sample_layers
from lla.backbones import build_backbone
from lla.errors import ConfigError
from lla.methods.auglocal import AugLocal
from tests.helpers import grad_probe, trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}


def auglocal(backbone="resnet32", k=16, size=32, cls=AugLocal, **kw):
    torch.manual_seed(0)
    return cls(build_backbone(backbone, 10), k=k, num_classes=10, image_size=size, optim=CONST, max_epochs=1, **kw)


@pytest.fixture(scope="module")
def vgg13():
    torch.manual_seed(0)
    return build_backbone("vgg13", 10)


# ---------------------------------------------------------------- pure schedule functions
def test_sample_layers_unifsamp():
    assert sample_layers(0, 16, 2) == [8, 15]          # round(7.5) = 8
    assert sample_layers(6, 16, 2) == [10, 15]         # round(10.5) = 10 under banker's rounding (floor(x+.5) = 11)
    assert sample_layers(12, 16, 2) == [14, 15]        # round(13.5) = 14
    assert sample_layers(0, 55, 3) == [18, 36, 54]
    assert sample_layers(13, 16, 2) == [14, 15]        # depth >= L-1-l: every remaining layer
    assert sample_layers(13, 16, 5) == [14, 15]
    assert sample_layers(3, 16, 0) == []
    for layer in range(15):
        for d in range(1, 6):
            s = sample_layers(layer, 16, d)
            assert s[-1] == 15 and s == sorted(set(s)) and all(i > layer for i in s)


def test_pyramid_depths_match_methods_examples():
    assert pyramid_depths(2, 14, 0.5) == [2] * 13                        # R32 K=16 d=2
    assert pyramid_depths(3, 13, 0.5) == [3] * 6 + [2] * 6               # R32 d=3
    assert pyramid_depths(3, 52, 0.5) == [3] * 25 + [2] * 26             # R110 K=55 d=3: 0..24 -> 3, 25..50 -> 2
    assert pyramid_depths(1, 10, 0.5) == [1] * 9
    assert pyramid_depths(2, 2, 0.5) == [2]                              # K_eff - 2 == 0: no division by zero
    assert pyramid_depths(3, 1, 0.5) == []


def test_pyramid_uses_bankers_rounding():
    # d=4, c=0.5, last module: 4*(1-0.5) + 0.5 = 2.5 exactly; Python's round gives 2, floor(x + 0.5) gives 3.
    depths = pyramid_depths(4, 10, 0.5)
    x = 4 * (1 - 0.5) + 0.5
    assert x == 2.5 and math.floor(x + 0.5) == 3
    assert depths[-1] == 2
    assert depths == [4, 4, 4, 3, 3, 3, 3, 3, 2]
    assert pyramid_depths(2, 4, 1.0) == [2, 2, 1]                        # 1.5 -> 2 (even), then 1


def test_aux_plan_stride_counter_carries_and_drops_leftover():
    assert aux_plan([1, 2], [16, 64, 64], 16) == [(1, 64, 2), (2, 64, 2)]  # log2(4) = 2: one now, one carried
    assert aux_plan([1], [16, 64], 16) == [(1, 64, 2)]                     # the leftover is dropped
    assert aux_plan([1, 2], [16, 16, 32], 16) == [(1, 16, 1), (2, 32, 2)]
    # VGG: pool whenever the width changes, however much it changes, and never otherwise.
    assert aux_plan([1, 2], [64, 512, 512], 64, pool_on_change=True) == [(1, 512, 2), (2, 512, 1)]
    with pytest.raises(ValueError):
        aux_plan([1], [64, 32], 64)


@pytest.mark.parametrize("module, expected", [
    (0, [(8, 32, 2), (15, 64, 2)]),
    (6, [(10, 32, 1), (15, 64, 2)]),
    (7, [(11, 64, 2), (15, 64, 1)]),
    (12, [(14, 64, 1), (15, 64, 1)]),
])
def test_worked_example_resnet32_k16_d2(module, expected):
    """docs/methods/auglocal.md's table, through the method: module k is layer k, and its aux net samples the layers after it."""
    model = auglocal("resnet32", k=16, depth=2)
    layer = model.module_layers(module)[-1]
    dims = net_dims(model.backbone)
    assert dims == [16] * 6 + [32] * 5 + [64] * 5                        # docs/methods/auglocal.md#k-minus-d net_dim of R32
    assert aux_plan(sample_layers(layer, 16, model.aux_depths[module]), dims, dims[layer]) == expected


# ---------------------------------------------------------------- split and options
def test_k_minus_d_module_counts():
    model = auglocal("resnet32", k=16, depth=2)
    assert (model.split.k_label, model.num_modules, len(model.aux)) == (16, 14, 13)
    assert list(model.module_layers(13)) == [13, 14, 15]
    assert all(list(model.module_layers(k)) == [k] for k in range(13))
    assert model.describe()["k"] == 16 and model.describe()["modules"] == 14
    off = auglocal("resnet32", k=16, depth=2, k_minus_d=False)
    assert off.num_modules == 16 and list(off.module_layers(15)) == [15]
    r110 = auglocal("resnet110", k=55, depth=3)
    assert r110.num_modules == 52 and r110.aux_depths == [3] * 25 + [2] * 26


def test_bn1d_present_iff_depth_at_most_one():
    def has_bn1d(aux):
        return any(isinstance(m, nn.BatchNorm1d) for m in aux.modules())

    assert all(has_bn1d(a) for a in auglocal("resnet20", k=6, size=16, depth=1).aux)
    assert not any(has_bn1d(a) for a in auglocal("resnet20", k=6, size=16, depth=2, pyramid=False).aux)
    # pyramid d=2, c=1 on K_eff=4: depths [2, 2, 1] -> only the last aux net is shallow enough for BN1d
    model = auglocal("resnet20", k=6, size=16, depth=2, pyramid_coeff=1.0)
    assert model.aux_depths == [2, 2, 1]
    assert [has_bn1d(a) for a in model.aux] == [False, False, True]
    assert not any(has_bn1d(a) for a in auglocal("resnet34", k=3, size=64, depth=1).aux)  # ImageNet head: never


@pytest.mark.parametrize("kw, key", [
    ({"depth": -1}, "method.depth"),
    ({"depth": 1.5}, "method.depth"),
    ({"pyramid_coeff": 1.5}, "method.pyramid_coeff"),
    ({"widen": 0}, "method.widen"),
    ({"pyramid": "yes"}, "method.pyramid"),
    ({"variant": "tiny"}, "method.variant"),
    ({"variant": "vgg"}, "method.variant"),                # VGG head on a ResNet
    ({"depth": 16}, "k"),                                  # K - d = 0 modules
])
def test_bad_options_raise_config_error(kw, key):
    with pytest.raises(ConfigError) as err:
        auglocal("resnet32", k=16, **kw)
    assert err.value.key == key


def test_yaml_lists_every_option():
    cfg = yaml.safe_load(open("conf/method/auglocal.yaml"))
    assert cfg.pop("_target_") == "lla.methods.auglocal.AugLocal"
    import inspect

    from lla.engine import LocalLearner

    kwonly = {n for cls in (AugLocal, LocalLearner) for n, p in inspect.signature(cls.__init__).parameters.items()
              if p.kind is p.KEYWORD_ONLY}  # the method's options and the engine's (aux_checkpoint)
    assert set(cfg) == kwonly


# ---------------------------------------------------------------- built aux nets
def test_aux_blocks_are_fresh_and_unshared():
    model = auglocal("resnet32", k=16, depth=2)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not any(id(p) in backbone_ids for p in model.aux.parameters())
    # module 6 rebuilds layer 10 (32 -> 32, stride 1): same shapes as the primary block, different values
    block, primary = model.aux[6][0], model.backbone.layers[10]
    assert block is not primary and type(block) is type(primary)
    for (n, p), (_, q) in zip(block.named_parameters(), primary.named_parameters()):
        assert p.shape == q.shape
        if p.dim() > 1:
            assert not torch.equal(p, q), n


@pytest.mark.parametrize("module", [0, 6, 7, 12])
def test_aux_output_shapes_follow_the_plan(module):
    model = auglocal("resnet32", k=16, depth=2)
    layer = model.module_layers(module)[-1]
    dims = net_dims(model.backbone)
    plan = aux_plan(sample_layers(layer, 16, 2), dims, dims[layer])
    aux = model.aux[module]
    outs = []
    hooks = [aux[i].register_forward_hook(lambda m, i, o: outs.append(o.shape)) for i in range(len(plan))]
    c, s = model.module_output_shape(module)
    logits = aux(torch.randn(2, c, s, s))
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 10)
    for (idx, width, stride), shape in zip(plan, outs):
        s = s // stride
        assert tuple(shape) == (2, width, s, s)
        assert s == model.backbone.spatial_size(idx, 32)  # the aux blocks track the primary net's resolution


def test_imagenet_resnet34_aux_on_tiny_input():
    torch.manual_seed(0)
    r34 = build_backbone("resnet34", 10)
    for layer, first in ((0, 64), (7, 128), (15, 512)):
        aux = auglocal_aux(r34, layer, 4, 10, 64, "imagenet")
        blocks = [m for m in aux if not isinstance(m, (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear))]
        assert blocks[0].conv1.in_channels == first  # the stem module feeds its 64 channels (docs/methods/auglocal.md)
        assert not any(isinstance(m, nn.BatchNorm1d) for m in aux.modules())
        assert aux[-1].in_features == 512
        s = r34.spatial_size(layer, 64)
        assert aux(torch.randn(2, first, s, s)).shape == (2, 10)
    assert sample_layers(0, 17, 4) == [4, 8, 12, 16]
    # the method on resnet34: ImageNet variant picked automatically, no K - d, no pyramid
    model = auglocal("resnet34", k=3, size=64, depth=4)
    assert (model.variant, model.k_minus_d, model.pyramid) == ("imagenet", False, False)
    assert model.num_modules == 3 and model.aux_depths == [4, 4]
    x = torch.randn(2, 3, 64, 64)
    h = model.forward_module(0, x)
    assert model.local_loss(0, h, (x, torch.tensor([1, 2]))).dim() == 0


def test_imagenet_bottleneck_aux_reads_planes():
    """R50: net_dim counts planes, so the stem (64) -> layer1 (256 = 64 planes x 4) needs no down-sampling."""
    torch.manual_seed(0)
    r50 = build_backbone("resnet50", 10)
    assert net_dims(r50) == [64] * 4 + [128] * 4 + [256] * 6 + [512] * 3   # the reference's net_dim
    aux = auglocal_aux(r50, 0, 3, 10, 64, "imagenet")                     # samples layers 5, 11, 16
    assert [aux[i].conv3.out_channels for i in range(3)] == [512, 1024, 2048]
    assert [aux[i].conv2.stride[0] for i in range(3)] == [2, 2, 2]
    assert aux(torch.randn(2, 64, 16, 16)).shape == (2, 10)
    assert aux[-1].in_features == 2048


def test_vgg13_aux_structure(vgg13):
    # samples conv 3, 6, 9 (128, 512, 512 wide): a pool before the first two only (64 -> 512 is still one pool)
    aux = auglocal_aux(vgg13, 0, 3, 10, 32, "vgg")
    kinds = [type(m).__name__ for m in aux]
    assert kinds == ["Sequential"] * 3 + ["Flatten", "AdaptiveAvgPool1d", "Linear", "BatchNorm1d", "ReLU",
                                          "Linear", "BatchNorm1d", "ReLU", "Linear"]
    for block, width, pool in zip(aux[:3], (128, 512, 512), (True, True, False)):
        assert [type(m).__name__ for m in block] == ["MaxPool2d"] * pool + ["Conv2d", "BatchNorm2d", "ReLU"]
        assert block[-3].out_channels == width and block[-3].bias is not None
    assert aux(torch.randn(2, 64, 32, 32)).shape == (2, 10)
    deep = auglocal_aux(vgg13, 6, 3, 10, 32, "vgg")   # conv 7, 8, 9 after a 512 module: no width change, no pool
    assert not any(isinstance(m, nn.MaxPool2d) for m in deep.modules())
    assert deep(torch.randn(2, 512, 4, 4)).shape == (2, 10)
    with pytest.raises(ConfigError):
        auglocal_aux(vgg13, 0, 3, 10, 2, "vgg")       # two pools take a 2px map below one pixel
    model = AugLocal(vgg13, k=3, num_classes=10, image_size=32, optim=CONST, depth=2)
    assert (model.variant, model.k_minus_d, model.pyramid, model.num_modules) == ("vgg", False, False, 3)


# ---------------------------------------------------------------- training
GradProbe = grad_probe(AugLocal)


def synthetic(n=128, size=16, classes=10, seed=0, batch_size=16):
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    x = templates[y] + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def test_gradient_isolation():
    model = auglocal("resnet20", k=6, size=16, cls=GradProbe, depth=2)
    model.seen = []
    trainer(max_steps=2).fit(model, synthetic(n=64))
    assert model.num_modules == 4
    assert model.seen[:4] == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]


class Recorder(AugLocal):
    def final_loss(self, h, batch):
        loss = super().final_loss(h, batch)
        self.final_losses.append(float(loss.detach()))
        return loss

    def local_loss(self, k, h, batch):
        loss = super().local_loss(k, h, batch)
        if k == 0:
            self.first_losses.append(float(loss.detach()))
        return loss


def test_trains_on_a_small_learnable_synthetic_problem_and_its_loss_falls():
    model = auglocal("resnet20", k=6, size=16, cls=Recorder, depth=2)
    model.final_losses, model.first_losses = [], []
    trainer(max_steps=20).fit(model, synthetic())
    assert len(model.final_losses) == 20
    first, last = model.final_losses[:5], model.final_losses[-5:]
    assert sum(last) / 5 < 0.5 * sum(first) / 5
    assert sum(model.first_losses[-5:]) < sum(model.first_losses[:5])  # the aux-trained module 0 learns too
