"""Vision Transformers (docs/vit.md): torchvision equality, the layer chain, token specs, splits, token aux nets,
gradient reach of every supported method, refusals, and MAN's loss falling on digits."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from lla.aux.tokens import TokenCERule, TokenHead, TokenInfoProRule, patch_grid
from lla.backbones import build_backbone
from lla.backbones.vit import SIZES, load_torchvision_state_dict
from lla.errors import ConfigError
from lla.methods.dgl import DGL
from lla.methods.infopro import InfoPro
from lla.methods.man import MAN
from lla.methods.mlaan import MLAAN
from lla.splits import resolve_split
from tests.helpers import module_of_param, trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}
FAMILIES = ("infopro", "man", "mlaan")


def torchvision_vit(name: str, num_classes: int, image_size: int | None = None):
    patch, size, dim, heads, depth, mlp = SIZES[name]
    return torchvision.models.VisionTransformer(image_size or size, patch, depth, heads, dim, mlp,
                                                num_classes=num_classes)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- the backbone
@pytest.mark.parametrize("name,image_size", [("vit_tiny", None), ("vit_tiny_patch4", None), ("vit_tiny_patch4", 16)])
def test_logits_equal_torchvision_on_shared_weights(name, image_size):
    torch.manual_seed(0)
    ref = torchvision_vit(name, 10, image_size).eval()
    torch.nn.init.normal_(ref.heads.head.weight, std=0.05)  # torchvision zero-initialises it: all logits would be 0
    torch.nn.init.normal_(ref.heads.head.bias, std=0.05)
    ours = build_backbone(name, 10, image_size=image_size).eval()
    assert n_params(ours) == n_params(ref)
    load_torchvision_state_dict(ours, ref.state_dict())
    side = image_size or SIZES[name][1]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,builder", [("vit_small", None), ("vit_base", "vit_b_16")])
def test_parameter_counts_equal_torchvision(name, builder):
    with torch.device("meta"):  # no memory, no init: only the shapes
        ref = getattr(torchvision.models, builder)() if builder else torchvision_vit(name, 1000)
        ours = build_backbone(name, 1000)
    assert n_params(ours) == n_params(ref)
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in ref.parameters())


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
@pytest.mark.parametrize("name,timm_name", [("vit_tiny", "vit_tiny_patch16_224"), ("vit_small", "vit_small_patch16_224"),
                                            ("vit_base", "vit_base_patch16_224")])
def test_parameter_counts_equal_timm(name, timm_name):
    import timm

    with torch.device("meta"):
        assert n_params(build_backbone(name, 1000)) == n_params(timm.create_model(timm_name, pretrained=False))


def test_specs_describe_token_layers():
    b = build_backbone("vit_tiny_patch4", 10)
    assert b.num_layers == 13 and b.stage_sizes == [12]
    assert [s.kind for s in b.specs] == ["patch_embed"] + ["transformer"] * 12
    assert all(s.layout == "tokens" and s.out_channels == 192 for s in b.specs)
    assert [b.spatial_size(i, 32) for i in (0, 12)] == [8, 8]
    x = torch.randn(2, 3, 32, 32)
    for i, layer in enumerate(b.layers):  # every layer really outputs (B, 1 + side^2, D)
        x = layer(x)
        assert x.shape == (2, 1 + b.spatial_size(i, 32) ** 2, b.specs[i].out_channels)
    assert build_backbone("vit_base", 10).specs[5].out_channels == 768
    assert build_backbone("vit_small", 10).spatial_size(3, 224) == 14


def test_layer_chain_and_local_modules_equal_the_full_forward():
    torch.manual_seed(0)
    b = build_backbone("vit_tiny_patch4", 10, image_size=16).eval()
    torch.nn.init.normal_(b.head.head.weight, std=0.05)
    model = DGL(b, k=4, num_classes=10, image_size=16, optim=CONST).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        full = b(x)
        h = x
        for k in range(model.num_modules):
            h = model.forward_module(k, h)
        chained = b.head(h)
    torch.testing.assert_close(chained, full, rtol=0, atol=0)


def test_patch_grid_puts_tokens_back_where_the_patch_conv_put_them():
    torch.manual_seed(0)
    b = build_backbone("vit_tiny_patch4", 10, image_size=16)
    embed = b.layers[0]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = embed(x) - embed.pos_embedding
        torch.testing.assert_close(patch_grid(tokens, 4), embed.conv_proj(x))
        torch.testing.assert_close(tokens[:, 0], embed.class_token[0].expand(2, -1))


def test_image_size_follows_the_data_and_must_fit_the_patches():
    from lla.build import check_run

    check_run(["method=dgl", "backbone=vit_tiny_patch4", "k=4", "dataset=digits", "dataset.image_size=16",
               "logger=none"])
    with pytest.raises(ConfigError, match="backbone.image_size") as err:
        check_run(["method=dgl", "backbone=vit_tiny_patch4", "k=4", "dataset=digits", "dataset.image_size=30",
                   "logger=none"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="16x16"):
        build_backbone("vit_tiny_patch4", 10, image_size=16)(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("name", list(SIZES))
def test_splits_share_the_blocks_evenly_with_the_embedding_in_module_0(name):
    for k in range(1, 14):
        for family in FAMILIES:
            split = resolve_split(name, 13, k, family)
            assert split.num_modules == k
            blocks = [[i for i in split.module_layers(m) if i > 0] for m in range(k)]
            counts = [len(b) for b in blocks]
            if k <= 12:
                assert split.module_layers(0)[0] == 0 and 0 not in split.boundaries
                assert max(counts) - min(counts) <= 1 and counts == sorted(counts)  # extras go to later modules
                if 12 % k == 0:  # MAN++'s grouping: module g holds blocks g*12/K .. (g+1)*12/K - 1
                    assert blocks == [list(range(1 + g * 12 // k, 1 + (g + 1) * 12 // k)) for g in range(k)]
            else:
                assert split.boundaries == tuple(range(12))  # every layer a module, the embedding alone
    assert resolve_split(name, 13, 4, "man").boundaries == (3, 6, 9)
    with pytest.raises(ConfigError):
        resolve_split(name, 13, 14, "man")


# ---------------------------------------------------------------------------------------------- methods
def make(cls, k=4, size=16, **kw):
    torch.manual_seed(0)
    b = build_backbone("vit_tiny_patch4", 10, image_size=size)
    torch.nn.init.normal_(b.head.head.weight, std=0.05)  # a zero head would pass no gradient on the first step
    return cls(b, k=k, num_classes=10, image_size=size, optim=CONST, max_epochs=1,
               denormalize=lambda z: (z * 0.25 + 0.5).clamp(0, 1), **kw)


def loader(n=1, bs=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n * bs, 3, size, size, generator=g), torch.randint(0, 10, (n * bs,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


def reach_probe(cls):
    """After each loss's backward (before any step): the modules whose gradients that loss changed, the loss
    value, and whether any frozen EMA parameter got a gradient."""

    class Probe(cls):
        def backward_local(self, k, loss):
            owner = module_of_param(self)
            before = {id(p): None if p.grad is None else p.grad.clone() for p in self.parameters()}
            super().backward_local(k, loss)
            changed = {owner[id(p)] for p in self.parameters() if p.grad is not None and p.grad.abs().sum() > 0
                       and (before[id(p)] is None or not torch.equal(p.grad, before[id(p)]))}
            frozen = any(p.grad is not None for p in self.parameters() if not p.requires_grad)
            self.seen.append((k, sorted(changed), bool(torch.isfinite(loss)), frozen))

    return Probe


CASES = [  # (method, options, span): loss k reaches modules k-span+1..k
    (DGL, {}, 1),
    (InfoPro, {}, 1),
    (MAN, {"base": "dgl"}, 1),
    (MAN, {"base": "infopro", "lambda_schedule": "module_index", "ixx_2": 1.0, "ixy_2": 1.0}, 1),
    (MAN, {"base": "dgl", "learnable_scale": True, "aux_depth": 2}, 1),  # MAN++'s ViT aux path
    (MLAAN, {"base": "dgl"}, 2),
    (MLAAN, {"base": "infopro", "cascade_span": 3}, 3),
]


@pytest.mark.parametrize("cls,options,span", CASES, ids=lambda c: getattr(c, "__name__", None) or str(c))
def test_every_supported_method_steps_with_finite_losses_and_the_stated_reach(cls, options, span):
    model = make(reach_probe(cls), **options)
    model.seen = []
    trainer(max_steps=1).fit(model, loader())
    K = model.num_modules
    assert K == 4
    assert model.seen == [(k, list(range(max(0, k - span + 1), k + 1)), True, False) for k in range(K)]


def test_aux_nets_are_the_token_ones():
    dgl, man, mlaan = make(DGL), make(MAN, base="dgl"), make(MLAAN, base="dgl")
    assert all(isinstance(a, TokenCERule) for a in dgl.aux)
    info = make(InfoPro)
    assert all(isinstance(a, TokenInfoProRule) and a.decoder is not None for a in info.aux)
    # MAN: copies of module k+1's first block (a transformer block) + MAN++'s class-token classifier
    assert type(man.aux[0].lb) is type(man.backbone.layers[4]) and isinstance(man.aux[0].rule, TokenCERule)
    assert torch.equal(man.aux[0].lb.ln_1.weight, man.backbone.layers[4].ln_1.weight)
    assert isinstance(mlaan.aux[0].mlm, TokenCERule) and isinstance(mlaan.aux[0].lam.rule, TokenCERule)
    head = TokenHead(192, 10)  # reads the class token only
    h = torch.randn(2, 17, 192)
    g = h.clone()
    g[:, 1:] = torch.randn(2, 16, 192)
    torch.testing.assert_close(head(h), head(g))


def test_man_plus_plus_aux_path_copies_two_blocks_and_mixes_the_first():
    """MAN++'s ViT aux net (vit_man.py): s*LB0(h) + (2-s)*EMA0(h), then LB1, then LayerNorm + Linear on the class token."""
    model = make(MAN, base="dgl", learnable_scale=True, aux_depth=2)
    layers = model.backbone.layers
    for k in range(model.num_modules - 1):
        aux, first = model.aux[k], model.next_block_index(k)
        assert len(aux.tail) == 1
        for copy_, source in ((aux.lb, layers[first]), (aux.ema, layers[first]), (aux.tail[0], layers[first + 1])):
            assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), source.state_dict().values()))
    aux = model.aux[0]
    with torch.no_grad():
        aux.scale.fill_(0.3)
        h = torch.randn(2, 17, 192)
        z = aux.tail[0](0.3 * aux.lb(h) + 1.7 * aux.ema(h))
        y = torch.tensor([1, 2])
        torch.testing.assert_close(aux(h, y), F.cross_entropy(aux.rule.head(z), y))
    with pytest.raises(ConfigError, match="method.aux_depth"):
        make(MAN, base="dgl", aux_depth=5)  # module 2's path would run past block 12


@pytest.mark.parametrize("side,image,staged", [(14, 224, True), (4, 16, False)])
def test_infopro_token_decoder_reconstructs_the_image_from_the_patch_grid(side, image, staged):
    rule = TokenInfoProRule(48, side, 10, image)
    wide = []  # full-resolution activations wider than InfoPro's last decoder stage (12 channels)
    for m in rule.decoder:
        m.register_forward_hook(lambda m, i, o: wide.append(o.shape[1]) if o.shape[-1] == image and o.shape[1] > 12
                                else None)
    h = torch.randn(2, 1 + side * side, 48)
    recon = rule.decoder(patch_grid(h, side))
    assert recon.shape == (2, 3, image, image)
    assert (not wide) == staged  # the 16x16-patch decoder upsamples in stages; the CIFAR one upsamples D channels
    loss = rule(h, torch.tensor([1, 2]), torch.rand(2, 3, image, image))
    assert torch.isfinite(loss) and rule.needs_x01


def test_refusals_are_one_clear_line():
    from lla.build import check_run

    with pytest.raises(ConfigError, match="token sequences") as err:
        check_run(["method=auglocal", "backbone=vit_tiny_patch4", "k=4", "dataset=digits", "logger=none"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="method.variant"):
        make(InfoPro, variant="imagenet")


@pytest.mark.slow
def test_man_loss_falls_on_digits():
    from lla.data.digits import load_digits_split

    x, y, _, _ = load_digits_split(size=8)  # the digits' own 8x8: 2x2 patches of 4x4, 5 tokens (fast)
    x = (x - 0.3) / 0.3
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=32, shuffle=True, generator=g)

    class LossLog(MAN):
        def final_loss(self, h, batch):
            loss = super().final_loss(h, batch)
            self.final_losses.append(loss.detach())
            return loss

    model = make(LossLog, size=8, base="dgl", ema_momentum=0.9)
    model.final_losses = []
    trainer(max_steps=32).fit(model, data)
    losses = torch.stack(model.final_losses)
    assert len(losses) == 32 and torch.isfinite(losses).all()
    assert losses[-6:].mean() < 0.7 * losses[:6].mean()
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x[512:768]), y[512:768]) < losses[:6].mean()
