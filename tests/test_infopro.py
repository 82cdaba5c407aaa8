"""InfoPro (docs/methods/infopro.md): lambda schedules, contrastive loss, aux-net shapes, presets, splits, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lla.aux.infopro import (
    HEADS,
    InfoProRule,
    infopro_lambdas,
    load_presets,
    stage_index_lambdas,
)
from lla.aux.rules import make_rule
from lla.backbones import build_backbone
from lla.errors import ConfigError
from lla.losses import supervised_contrastive_loss
from lla.methods.infopro import InfoPro
from tests.helpers import grad_probe, trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}


def denorm(x):
    return x * 0.5 + 0.5


def infopro(k=4, backbone="resnet20", size=16, **kw):
    torch.manual_seed(0)
    kw.setdefault("denormalize", denorm)
    return InfoPro(build_backbone(backbone, 10), k=k, num_classes=10, image_size=size, optim=CONST,
                   max_epochs=1, **kw)


def template_data(n=256, size=16, classes=10, noise=0.15, seed=0):
    """Class c = a fixed random template + small noise, normalised with mean/std 0.5 (so denorm gives x01)."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=size, mode="bilinear")
    y = torch.arange(n) % classes
    x01 = (templates[y] + noise * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return TensorDataset((x01 - 0.5) / 0.5, y)


# ------------------------------------------------------------------------------------------------ lambda schedules
def test_infopro_lambdas_interpolate_over_module_index():
    w = (5, 0.05, 0.2, 0.5)  # CIFAR-10 R32 K=16
    assert infopro_lambdas(0, 16, *w) == pytest.approx((5, 0.05))
    assert infopro_lambdas(14, 16, *w) == pytest.approx((0.2, 0.5))
    assert infopro_lambdas(7, 16, *w) == pytest.approx((2.6, 0.275))  # r = 1/2
    assert infopro_lambdas(1, 4, 6, 0, 1, 2) == pytest.approx((3.5, 1.0))  # R32 K=4, r = 1/2
    assert infopro_lambdas(2, 8, 5, 0, 0, 2) == pytest.approx((5 * 4 / 6, 2 * 2 / 6))  # r = 2/6
    assert infopro_lambdas(0, 2, 5, 1, 0, 0) == (5, 1)  # K = 2: r = 0
    for bad in ((-1, 4), (3, 4), (0, 1)):
        with pytest.raises(ValueError):
            infopro_lambdas(*bad, 1, 1, 1, 1)


def test_stage_index_lambdas_match_man_examples():
    w = (5, 0.5, 0, 0)  # MAN README
    got = [stage_index_lambdas(s, 16, *w) for s in (1, 2, 3)]
    expected = [(4.64, 0.46), (4.29, 0.43), (3.93, 0.39)]
    assert [tuple(round(v, 2) for v in pair) for pair in got] == expected
    assert [stage_index_lambdas(s, 8, 6, 6, 0, 0)[0] for s in (1, 2, 3)] == pytest.approx([5, 4, 3])  # r = s/6
    assert stage_index_lambdas(3, 4, *w) == pytest.approx((-2.5, -0.25))  # K = 4: r = 3/2, negative (docs/methods/man.md#lambda-schedule)
    assert stage_index_lambdas(2, 2, *w) == (5, 0.5)


# ------------------------------------------------------------------------------------------------ contrastive loss
def reference_supcon(features, labels, t=0.07, base=0.07):
    """Per-anchor loop straight from the definition."""
    z = [f / f.norm() for f in features]
    n, total = len(z), 0.0
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue  # contributes 0, still counted in the mean
        log_denominator = math.log(sum(math.exp(float(z[i] @ z[a]) / t) for a in others))
        mean_log_prob = sum(float(z[i] @ z[p]) / t - log_denominator for p in positives) / len(positives)
        total += -(t / base) * mean_log_prob
    return total / n


def test_supervised_contrastive_loss_matches_per_anchor_definition():
    torch.manual_seed(0)
    features = torch.randn(7, 5) * 3
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3])  # classes 2 and 3 have no positive pair
    got = supervised_contrastive_loss(features, labels)
    assert got.item() == pytest.approx(reference_supcon(features, labels), rel=1e-5)
    assert supervised_contrastive_loss(features, labels, 0.5, 0.07).item() == pytest.approx(
        reference_supcon(features, labels, 0.5, 0.07), rel=1e-5)
    # normalised inside: scaling a feature changes nothing
    scaled = features * torch.tensor([[1.0], [4], [0.2], [1], [9], [1], [3]])
    assert supervised_contrastive_loss(scaled, labels).item() == pytest.approx(got.item(), rel=1e-5)


def test_supervised_contrastive_loss_without_positives_is_zero_and_finite():
    for n in (1, 4):
        features = torch.randn(n, 8, requires_grad=True)
        loss = supervised_contrastive_loss(features, torch.arange(n))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(features.grad).all()


# ------------------------------------------------------------------------------------------------ CIFAR aux nets
def layer_shapes(net):
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.bias is not None)
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    fcs = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]
    return convs, fcs


# docs/methods/infopro.md: conv (width, stride) for C = 16, 32, 64
CONV = {16: (32, 2), 32: (64, 2), 64: (64, 1)}


@pytest.mark.parametrize("channels,spatial", [(16, 16), (32, 8), (64, 4)])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_cifar_heads_follow_the_table(head, channels, spatial):
    width, stride = CONV[channels]
    convs = {"0": [], "1": [(channels, width, 3, stride, False)],
             "2": [(channels, width, 3, stride, False), (width, width, 3, 1, False)]}[head[0]]
    feat_in = width if convs else channels
    for loss, out in (("ce", 10), ("contrast", 128)):
        fcs = {"1f": [(feat_in, out)], "2f": [(feat_in, 128), (128, out)],
               "3f": [(feat_in, 128), (128, 128), (128, out)]}[head[2:]]
        rule = InfoProRule(channels, spatial, 10, 16, head=head, loss=loss, lam1=0.0)
        assert rule.decoder is None and not rule.needs_x01
        assert layer_shapes(rule.head) == (convs, fcs)
        assert rule.head(torch.randn(2, channels, spatial, spatial)).shape == (2, out)


def test_widen_and_other_widths():
    rule = InfoProRule(16, 16, 10, 16, head="1c2f", loss="contrast", lam1=1.0, widen=2, feature_dim=64)
    assert layer_shapes(rule.head) == ([(16, 64, 3, 2, False)], [(64, 128), (128, 64)])
    assert layer_shapes(rule.decoder)[0][0] == (16, 24, 3, 1, True)
    # widths outside the CIFAR table: double + stride 2 while the map is larger than 8x8, else keep
    assert layer_shapes(InfoProRule(128, 28, 10, 224, lam1=0.0).head)[0] == [(128, 256, 3, 2, False)]
    assert layer_shapes(InfoProRule(512, 7, 10, 224, lam1=0.0).head)[0] == [(512, 512, 3, 1, False)]


def test_decoder_reconstructs_image_size_and_bce_targets_x01():
    torch.manual_seed(0)
    rule = InfoProRule(64, 4, 10, 16, lam1=1.0, lam2=0.0)
    assert rule.head is None and rule.needs_x01
    assert layer_shapes(rule.decoder)[0] == [(64, 12, 3, 1, True), (12, 3, 3, 1, True)]
    h, y = torch.randn(2, 64, 4, 4), torch.tensor([0, 1])
    x01 = torch.rand(2, 3, 16, 16)
    recon = rule.reconstruct(h)
    assert recon.shape == (2, 3, 16, 16) and 0 <= recon.min() and recon.max() <= 1
    loss = rule(h, y, x01)
    torch.testing.assert_close(loss, F.binary_cross_entropy(recon, x01))
    assert not torch.allclose(loss, rule(h, y, 1 - x01))  # the target really is x01
    upsampled = F.interpolate(h, size=16, mode="bilinear", align_corners=True)
    torch.testing.assert_close(rule.decoder[0](h), upsampled)
    with pytest.raises(ValueError, match="x01"):
        rule(h, y)


def test_decoder_upsample_is_bit_identical_in_its_faster_cpu_layout():
    """UpsampleTo runs channels_last on a CPU (torch's NCHW bilinear kernel is several times slower): same values and
    input gradients as the plain NCHW interpolation, and the layout carries on into the decoder's convs."""
    from lla.aux.infopro import UpsampleTo

    h = torch.randn(4, 32, 8, 8, requires_grad=True)
    up = UpsampleTo(size=(32, 32), mode="bilinear", align_corners=True)(h)
    ref = F.interpolate(h, size=32, mode="bilinear", align_corners=True)
    assert torch.equal(up, ref) and up.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ref)
    (g_up,), (g_ref,) = torch.autograd.grad(up, h, g, retain_graph=True), torch.autograd.grad(ref, h, g)
    assert torch.equal(g_up, g_ref)


def test_rule_combines_weighted_terms():
    torch.manual_seed(0)
    h, y, x01 = torch.randn(4, 32, 8, 8), torch.tensor([0, 1, 0, 1]), torch.rand(4, 3, 16, 16)
    torch.manual_seed(1)
    rule = InfoProRule(32, 8, 10, 16, head="1c2f", loss="ce", lam1=2.0, lam2=0.5)
    expected = 2.0 * F.binary_cross_entropy(rule.reconstruct(h), x01) + 0.5 * F.cross_entropy(rule.head(h), y)
    torch.testing.assert_close(rule(h, y, x01), expected)
    contrast = InfoProRule(32, 8, 10, 16, loss="contrast", lam1=0.0, lam2=3.0)
    torch.testing.assert_close(contrast(h, y), 3.0 * supervised_contrastive_loss(contrast.head(h), y))
    assert isinstance(make_rule("infopro", channels=32, spatial=8, num_classes=10, image_size=16,
                                options={"head": "2c2f", "lam1": 5.0, "lam2": 0.5}), InfoProRule)


# ------------------------------------------------------------------------------------------------ ImageNet aux nets
@pytest.mark.parametrize("channels,spatial,decoder,ups,head", [
    (512, 28, [(512, 128, 1), (128, 32, 3), (32, 12, 3), (12, 3, 3)], [56, 112, 224],
     [(512, 128, 1, 1), (128, 256, 3, 2), (256, 512, 3, 2), (512, 2048, 1, 1)]),
    (1024, 14, [(1024, 192, 1), (192, 64, 1), (64, 32, 3), (32, 12, 3), (12, 3, 3)], [28, 56, 112, 224],
     [(1024, 256, 1, 1), (256, 256, 3, 2), (256, 512, 3, 2), (512, 2048, 1, 1)]),
])
def test_imagenet_rule_structure_and_shapes(channels, spatial, decoder, ups, head):
    rule = InfoProRule(channels, spatial, 1000, 224, loss="ce", lam1=5.0, lam2=0.75, variant="imagenet")
    dec_convs, _ = layer_shapes(rule.decoder)
    assert [c[:3] for c in dec_convs] == decoder and all(c[4] for c in dec_convs)
    assert [m.size[0] for m in rule.decoder if isinstance(m, nn.Upsample)] == ups
    head_convs, head_fcs = layer_shapes(rule.head)
    assert [c[:4] for c in head_convs] == head and not any(c[4] for c in head_convs)
    assert head_fcs == [(2048, 1000)]
    h = torch.randn(2, channels, spatial, spatial)
    with torch.no_grad():
        assert rule.reconstruct(h).shape == (2, 3, 224, 224)
        assert rule.head(h).shape == (2, 1000)
        assert torch.isfinite(rule(h, torch.tensor([3, 999]), torch.rand(2, 3, 224, 224)))


def test_imagenet_rule_rejects_other_widths():
    with pytest.raises(ConfigError, match="method.variant"):
        InfoProRule(256, 14, 1000, 224, variant="imagenet")


def test_imagenet_backbone_picks_imagenet_rule_and_readme_weights():
    model = InfoPro(build_backbone("resnet101", 1000), k=2, num_classes=1000, image_size=224)
    assert model.split.boundaries == (4,) and model.variant == "imagenet" and model.loss_kind == "ce"
    assert model.lambdas(0) == (5.0, 0.75)
    assert layer_shapes(model.aux[0].head)[0][0][:2] == (512, 128)


# ------------------------------------------------------------------------------------------------ method options
def test_infopro_star_split_from_balanced_memory():
    cifar = InfoPro(build_backbone("resnet110", 10), k=3, balanced_memory="cifar10")
    stl = InfoPro(build_backbone("resnet110", 10), k=3, balanced_memory="stl10")
    plain = InfoPro(build_backbone("resnet110", 10), k=3)
    assert cifar.split.boundaries == (10, 21) and stl.split.boundaries == (9, 20)
    assert plain.split.boundaries == (18, 36)
    star = InfoPro(build_backbone("resnet110", 10), k=4, preset="stl10_resnet110_star_k4")
    assert star.split.boundaries == (7, 15, 27) and star.weights == (20, 0.5, 10, 1)
    with pytest.raises(ConfigError, match="balanced_memory"):
        InfoPro(build_backbone("resnet32", 10), k=2, balanced_memory="cifar10")  # no InfoPro* rows for R32


def test_presets_are_the_methods_table():
    """lla/aux/infopro_presets.yaml against docs/methods/infopro.md#presets (ixx_1, ixy_1, ixx_2, ixy_2)."""
    table = {
        ("cifar10", "resnet32"): {2: (5, 1, 0, 0), 4: (6, 0, 1, 2), 8: (5, 0, 0, 2), 16: (5, 0.05, 0.2, 0.5)},
        ("cifar10", "resnet110"): {2: (5, 0.5, 0, 0), 4: (1, 0, 0, 1), 8: (5, 0, 0, 1), 16: (5, 0, 0.5, 1)},
        ("cifar10", "resnet110_star"): {2: (5, 0.1, 0, 0), 3: (5, 0, 5, 0.1), 4: (5, 0, 5, 0.1)},
        ("stl10", "resnet110"): {2: (10, 1, 0, 0), 4: (20, 0.2, 5, 2), 8: (20, 0.2, 5, 1), 16: (20, 0.5, 10, 0.1)},
        ("stl10", "resnet110_star"): {2: (20, 1, 0, 0), 3: (20, 0.5, 5, 2), 4: (20, 0.5, 10, 1)},
        ("svhn", "resnet110"): {2: (1, 0.1, 0, 0), 4: (5, 0, 0.5, 1), 8: (5, 0, 0.5, 2), 16: (5, 0.2, 0.5, 1)},
    }
    rows = load_presets()
    for (data, net), by_k in table.items():
        for k, weights in by_k.items():
            row = rows[f"{data}_{net}_k{k}"]
            assert (row["backbone"], row["k"]) == (net.removesuffix("_star"), k)
            assert tuple(row[key] for key in ("ixx_1", "ixy_1", "ixx_2", "ixy_2")) == weights
            assert row.get("balanced_memory") == (data if net.endswith("_star") else None)
    assert rows["imagenet_resnet101_k2"]["ixy_1"] == 0.75 and rows["imagenet_resnet152_k2"]["ixy_1"] == 1


def test_preset_precedence_and_checks():
    model = infopro(k=16, backbone="resnet32", size=32, preset="cifar10_resnet32_k16", ixy_2=0.9)
    assert model.weights == (5, 0.05, 0.2, 0.9) and model.loss_kind == "contrast"
    assert model.aux[0].lam1 == 5 and model.aux[14].lam2 == pytest.approx(0.9)
    auglocal = infopro(k=16, backbone="resnet32", size=32, preset="auglocal_resnet32_k16")
    assert auglocal.loss_kind == "ce" and auglocal.aux[0].head[-1].out_features == 10
    with pytest.raises(ConfigError, match="resnet110 K=8, but this run is resnet32 K=16"):
        infopro(k=16, backbone="resnet32", preset="cifar10_resnet110_k8")
    with pytest.raises(ConfigError, match="method.preset"):
        infopro(k=4, preset="cifar100_nope")
    with pytest.raises(ConfigError, match="method.loss"):
        infopro(k=16, backbone="resnet32", preset="auglocal_resnet32_k16", loss="contrast")


@pytest.mark.parametrize("option,value", [("head", "3c3f"), ("loss", "mse"), ("variant", "vit"), ("widen", 0),
                                          ("lambda_schedule", "epoch"), ("balanced_memory", "svhn")])
def test_bad_options_raise_config_error(option, value):
    with pytest.raises(ConfigError, match=f"method.{option}"):
        infopro(**{option: value})


def test_zero_weights_build_nothing_unused():
    model = infopro(k=4, ixx_1=0, ixx_2=0, ixy_1=1, ixy_2=1, denormalize=None)  # no denormalize needed
    assert all(rule.decoder is None and not rule.needs_x01 for rule in model.aux)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(model.local_loss(0, model.forward_module(0, x), (x, y)))
    with pytest.raises(ConfigError, match="both loss weights"):
        infopro(k=4, ixx_1=1, ixy_1=1, ixx_2=0, ixy_2=0)  # module K-2 would have nothing to learn from


def test_local_loss_uses_denormalised_batch_and_chosen_schedule():
    model = infopro(k=4, loss="ce")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    h = model.forward_module(0, x)
    torch.manual_seed(0)
    got = model.local_loss(0, h, (x, y))
    torch.testing.assert_close(got, model.aux[0](h, y, denorm(x)))
    stage = infopro(k=4, lambda_schedule="stage_index", ixx_1=5, ixy_1=0.5, ixx_2=1, ixy_2=1)
    next_stages = [stage.backbone.specs[stage.module_layers(k + 1)[0]].stage for k in range(3)]
    assert len(set(next_stages)) > 1  # the schedule follows the stage, not the module index
    assert [stage.aux[k].lam1 for k in range(3)] == pytest.approx([5 - 4 * s / 2 for s in next_stages])


# ------------------------------------------------------------------------------------------------ training
GradProbe = grad_probe(InfoPro)


def test_gradient_isolation_each_loss_reaches_only_its_module():
    torch.manual_seed(0)
    model = GradProbe(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16, optim=CONST,
                      max_epochs=1, denormalize=denorm, ixx_1=1, ixy_1=1, ixx_2=1, ixy_2=1)
    model.seen = []
    trainer(max_steps=2).fit(model, DataLoader(template_data(n=16), batch_size=8))
    assert model.num_modules == 4
    assert model.seen[:4] == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]


class Recorder(InfoPro):
    def final_loss(self, h, batch):
        loss = super().final_loss(h, batch)
        self.final_losses.append(loss.item())
        return loss

    def local_loss(self, k, h, batch):
        loss = super().local_loss(k, h, batch)
        if k == 0:
            self.first_module_losses.append(loss.item())
        return loss


def mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("loss", ["ce", "contrast"])
def test_trains_on_a_small_learnable_synthetic_problem_and_its_loss_falls(loss):
    torch.manual_seed(0)
    model = Recorder(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16, max_epochs=1,
                     optim=CONST, denormalize=denorm, loss=loss, ixx_1=1, ixy_1=1, ixx_2=0.5, ixy_2=1)
    model.final_losses, model.first_module_losses = [], []
    trainer(max_steps=40).fit(model, DataLoader(template_data(), batch_size=32, shuffle=True))
    final, local = model.final_losses, model.first_module_losses
    assert len(final) == len(local) == 40
    assert mean(final[-5:]) < 0.7 * mean(final[:5]), final
    # the InfoPro loss itself (BCE + L_y on module 0) falls too, not just the last module's CE
    assert mean(local[-5:]) < 0.8 * mean(local[:5]), local


# ------------------------------------------------------------------ published weights picked by (dataset, backbone, K)
def _composed_infopro(overrides, monkeypatch):
    """(composed config, InfoPro) of ``python run.py method=infopro <overrides>``, built on the meta device."""
    from hydra import compose, initialize_config_dir

    from lla.cli import CONF_DIR, build

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=infopro", *overrides])
    monkeypatch.setattr(InfoPro, "build_aux", lambda self, k: nn.Identity())
    with torch.device("meta"):
        return cfg, build(cfg)[1]


def test_bare_infopro_takes_the_published_weights_of_its_dataset_backbone_and_k(monkeypatch, caplog):
    run = ["dataset=stl10", "backbone=resnet110", "k=16"]
    with caplog.at_level("INFO", logger="lla"):
        cfg, model = _composed_infopro(run, monkeypatch)
    shown = OmegaConf.to_container(cfg.method.paper_weights)["k16"]  # what `--cfg job` prints
    assert shown == {"preset": "stl10_resnet110_k16", "ixx_1": 20, "ixy_1": 0.5, "ixx_2": 10, "ixy_2": 0.1}
    assert model.weights == (20.0, 0.5, 10.0, 0.1) and model.preset == "stl10_resnet110_k16"
    assert not [r for r in caplog.records if "generic default" in r.getMessage()]
    # an explicit weight wins over the table, per weight; an explicit preset wins over the auto row
    assert _composed_infopro([*run, "method.ixx_1=3"], monkeypatch)[1].weights == (3.0, 0.5, 10.0, 0.1)
    named = _composed_infopro([*run, "method.preset=cifar10_resnet110_k16"], monkeypatch)[1]
    assert named.weights == (5.0, 0.0, 0.5, 1.0) and named.preset == "cifar10_resnet110_k16"
    assert _composed_infopro([*run, "method.preset=null"], monkeypatch)[1].weights == (5.0, 0.05, 0.2, 0.5)
    # other datasets get their own rows
    assert _composed_infopro(["dataset=svhn", "backbone=resnet110", "k=8"], monkeypatch)[1].weights == (5, 0, 0.5, 2)
    assert _composed_infopro(["dataset=cifar10", "backbone=resnet32", "k=4"], monkeypatch)[1].weights == (6, 0, 1, 2)


@pytest.mark.parametrize("run", [["dataset=stl10", "backbone=resnet110", "k=6"], ["dataset=digits", "k=4"]])
def test_without_a_published_row_the_default_applies_with_one_log_line(run, monkeypatch, caplog):
    with caplog.at_level("INFO", logger="lla"):
        _, model = _composed_infopro(run, monkeypatch)
    assert model.weights == (5.0, 0.05, 0.2, 0.5) and model.preset is None
    assert len([r for r in caplog.records if "generic default" in r.getMessage()]) == 1


def test_paper_weights_tables_are_the_named_preset_rows():
    from pathlib import Path

    from lla.cli import CONF_DIR

    files = sorted((Path(CONF_DIR) / "paper_weights").glob("infopro_*.yaml"))
    rows = load_presets()
    plain = {n for n in rows if not n.startswith("auglocal_") and "_star_" not in n}
    seen = set()
    for path in files:
        dataset, backbone = path.stem.removeprefix("infopro_").split("_", 1)
        table = OmegaConf.to_container(OmegaConf.load(path))["paper_weights"]
        for key, entry in table.items():
            row = rows[entry["preset"]]
            assert (row["backbone"], f"k{row['k']}") == (backbone, key)
            assert entry["preset"].startswith(f"{dataset}_{backbone}_k")
            assert {w: entry[w] for w in ("ixx_1", "ixy_1", "ixx_2", "ixy_2")} == \
                   {w: row[w] for w in ("ixx_1", "ixy_1", "ixx_2", "ixy_2")}
            seen.add(entry["preset"])
    assert seen == plain  # every published (dataset, backbone, K) row is picked automatically
