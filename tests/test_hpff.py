"""HPFF (docs/methods/hpff.md): the patch-wise aux nets and the two-level cascade against the official code, gradient
reach, one-step equality with a re-creation of the official training loop (float64), training on digits, refusals."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lla.aux.hpff import split_patches
from lla.backbones import build_backbone
from lla.errors import ConfigError
from lla.methods.hpff import HPFF
from tests.helpers import grad_probe, trainer

ROOT = Path(__file__).resolve().parent.parent
CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}


def unit(x):
    """A stand-in de-normalisation into [0, 1] (InfoPro's reconstruction target)."""
    return torch.sigmoid(x)


def hpff(cls=HPFF, backbone="resnet20", k=4, size=16, **kw):
    torch.manual_seed(0)
    kw.setdefault("denormalize", unit)
    return cls(build_backbone(backbone, 10), k=k, num_classes=10, image_size=size, optim=CONST, max_epochs=1, **kw)


def batches(n=3, bs=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def loader(data, bs=8):
    xs, ys = zip(*data)
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=bs, shuffle=False)


def owners(model):
    return {id(p): k for k in range(model.num_modules) for p in model.module_parameters(k)}


# ---------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("backbone,k,modules,key", [("resnet32", 16, 15, 16), ("resnet32", 15, 15, 16),
                                                    ("resnet110", 55, 54, 55), ("resnet32", 8, 8, 8)])
def test_split_tables_are_the_official_configs(backbone, k, modules, key):
    """config.py lists end with the last block and run the stem outside the modules: key 16 = 15 modules."""
    model = hpff(backbone=backbone, k=k, size=32, base="infopro", mode="reference")
    assert model.num_modules == modules and model.split.source == f"table:hpff:{key}"
    assert model.nominal_k == key
    if (backbone, k) == ("resnet32", 16):
        assert model.split.boundaries == tuple(range(1, 15))  # module 0 = stem + layer1[0], then one block each


def test_the_cascade_joins_two_adjacent_modules():
    model = hpff(backbone="resnet32", k=16, size=32)
    K = model.num_modules
    assert [model.span(k) for k in range(K)] == [1] + [2] * (K - 1)
    assert model._ready == [[]] + [[k - 1] for k in range(1, K - 1)] + [[K - 2, K - 1]]  # steps after loss k+1


def test_infopro_reference_aux_nets_are_the_official_ones():
    """resnetInfoPro_HPFF.py + auxiliary_net.py: module i has a whole-map classifier (net_classifier) and, on the
    cascade, a classifier (aux_classifier) plus a Decoder of four per-quadrant conv nets; module 0 has none."""
    model = hpff(backbone="resnet32", k=16, size=32, base="infopro", mode="reference")
    assert (model.early_losses, model.patch_heads, model.head_kind) == (False, False, "2c2f")
    assert len(model.aux[0]._modules) == 0  # no loss of its own in the official loop
    for k, (channels, conv_out, stride) in ((1, (16, 32, 2)), (6, (32, 64, 2)), (12, (64, 64, 1))):
        aux = model.aux[k]
        assert model.module_output_shape(k)[0] == channels
        for head in (aux.independent.head, aux.cascade.classifier.head):
            assert head.grid == 1  # the whole map
            convs = [m for m in head.net if isinstance(m, nn.Conv2d)]
            linears = [m for m in head.net if isinstance(m, nn.Linear)]
            assert [(c.in_channels, c.out_channels, c.stride[0], c.bias is None) for c in convs] == \
                [(channels, conv_out, stride, True), (conv_out, conv_out, 1, True)]  # 2c2f
            assert [(m.in_features, m.out_features) for m in linears] == [(conv_out, 128), (128, 10)]
        decoder = aux.cascade.decoder
        assert decoder.grid == 2 and len(decoder.nets) == 4
        for net in decoder.nets:
            assert [type(m) for m in net] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
            assert (net[0].in_channels, net[0].out_channels, net[0].kernel_size, net[0].bias is not None) == \
                (channels, 12, (3, 3), True)
            assert (net[3].in_channels, net[3].out_channels, net[3].bias is not None) == (12, 3, True)
        r = k / 14  # ratio = i / (local_module_num - 2), local_module_num = 16
        assert aux.cascade.lam1 == pytest.approx(5 * (1 - r)) and aux.cascade.lam2 == pytest.approx(0.5 * (1 - r))
    own = owners(model)
    assert {own[id(p)] for p in model.aux[3].parameters()} == {3}  # both aux nets train with their module


def test_paper_mode_runs_every_head_on_the_patches_and_module_0_learns():
    model = hpff(backbone="resnet32", k=16, size=32, base="dgl")
    assert (model.early_losses, model.patch_heads, model.head_kind) == (True, True, "man")
    aux = model.aux[0]
    assert aux.independent.head.grid == 2 and aux.cascade.classifier.head.grid == 2
    assert aux.cascade.decoder is None  # DGL: no reconstruction
    assert model.span(0) == 1  # module 0's cascade has no module before it


def test_patches_are_the_official_quadrants_and_patch_features_are_averaged():
    t = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    quads = split_patches(t, 2)
    want = [t[:, :, :3, :3], t[:, :, :3, 3:], t[:, :, 3:, :3], t[:, :, 3:, 3:]]  # auxiliary_net.Decoder's order
    assert all(torch.equal(q, w) for q, w in zip(quads, want))
    assert [tuple(p.shape[-2:]) for p in split_patches(torch.zeros(1, 1, 5, 7), 2)] == [(2, 3), (2, 4), (3, 3), (3, 4)]
    model = hpff(base="dgl")
    head = model.aux[1].independent.head
    head.eval()
    h = torch.randn(4, model.module_output_shape(1)[0], 16, 16)
    cut = [type(m) for m in head.net].index(nn.Flatten) + 1  # the features after pooling, before the FC layers
    feats = sum(head.net[:cut](q) for q in split_patches(h, 2)) / 4
    torch.testing.assert_close(head(h), head.net[cut:](feats))


@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_reference_mode_claims_the_official_loop_and_an_explicit_switch_wins(base):
    model = hpff(base=base, mode="reference")
    assert model.early_losses is False and model.patch_heads is (base == "dgl")  # no DGL script: paper value
    model = hpff(base=base, mode="reference", early_losses=True)
    assert model.early_losses is True and len(model.aux[0]._modules) == 2


# ---------------------------------------------------------------------------------------------- gradient reach
GradProbe = grad_probe(HPFF)


@pytest.mark.parametrize("early", [True, False])
def test_each_loss_reaches_its_module_and_the_one_before(early):
    """helpers.grad_probe: modules holding gradients after loss k. Module k-2 stepped (and freed) after loss k-1."""
    model = hpff(GradProbe, k=5, base="infopro", early_losses=early, ixx_2=1.0, ixy_2=0.1)
    model.seen = []
    trainer(max_steps=1).fit(model, loader(batches(1)))
    first = [(0, [0])] if early else [(0, [])]
    assert model.seen == first + [(k, [k - 1, k]) for k in range(1, 5)]


class ReachProbe(HPFF):
    """Which modules' gradients each loss changed; ``keep`` zeroes the independent ("y") or the cascaded ("x") part
    inside backward_local, so the real routing runs. Also whether every graph was freed."""

    keep = "both"

    def backward_local(self, k, loss):
        own = owners(self)
        before = {id(p): (p.grad.clone() if p.grad is not None else None) for p in self.parameters()}
        handoff = self.handoff
        if handoff is not None and handoff.x is not None and self.keep != "both":
            part = "y" if self.keep == "x" else "x"
            self.handoff = handoff._replace(**{part: 0.0 * getattr(handoff, part)})
        super().backward_local(k, loss)
        changed = set()
        for p in self.parameters():
            old = before[id(p)]
            if p.grad is not None and (old is None or not torch.equal(p.grad, old)) and p.grad.abs().sum() > 0:
                changed.add(own[id(p)])
        self.reach.append((k, sorted(changed)))
        if handoff is not None:
            try:
                torch.autograd.backward(handoff.h, torch.ones_like(handoff.h), inputs=self.layer_params(k))
                self.freed.append(False)
            except RuntimeError:
                self.freed.append(True)


def reach(keep="both", **kw):
    if kw.get("base") == "infopro":  # at K = 5 the README weights reach 0 at module 3 (r = 3/3): no cascade there
        kw.update(ixx_2=1.0, ixy_2=0.1)
    model = hpff(ReachProbe, k=5, **kw)
    model.keep, model.reach, model.freed = keep, [], []
    trainer(max_steps=1).fit(model, loader(batches(1)))
    return model


@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_independent_loss_reaches_its_module_only_and_the_cascade_crosses_one_boundary(base):
    both = reach(base=base)
    assert both.reach == [(0, [0])] + [(k, [k - 1, k]) for k in range(1, 5)]
    assert both.freed == [True] * 5  # no graph survives a module's backward
    x_only = reach("x", base=base)
    assert x_only.reach[:4] == [(k, [k]) for k in range(4)]
    y_only = reach("y", base=base)
    assert y_only.reach[:4] == [(0, [0])] + [(k, [k - 1, k]) for k in range(1, 4)]


def test_a_module_whose_cascaded_weights_are_zero_has_no_cascade():
    """The official r = i/(K-2) reaches 1 at module K-2 when the split has K modules: lam1 = lam2 = 0 there, so its
    loss is the independent one alone (the official backward of 0 * loss_y adds nothing)."""
    model = hpff(k=5, base="infopro")
    assert model.module_lambdas(3) == (0.0, 0.0) and model.aux[3].cascade is None
    assert [model.span(k) for k in range(5)] == [1, 2, 2, 1, 2]


# ---------------------------------------------------------------------------------------------- equivalence
def run_module(model, j, x):
    for i in model.module_layers(j):
        x = model.backbone.layers[i](x)
    return x


def quadrants(t):
    h, w = t.shape[-2:]
    return [t[:, :, :h // 2, :w // 2], t[:, :, :h // 2, w // 2:], t[:, :, h // 2:, :w // 2], t[:, :, h // 2:, w // 2:]]


def official_classifier(head, z, y):
    """AuxClassifier.forward (CE); with patch heads (the paper's PFF) the shared trunk's pooled features of the four
    quadrants are averaged before the FC layers."""
    if head.grid == 1:
        return F.cross_entropy(head.net(z), y)
    cut = [type(m) for m in head.net].index(nn.Flatten) + 1
    return F.cross_entropy(head.net[cut:](sum(head.net[:cut](q) for q in quadrants(z)) / 4), y)


def official_decoder(decoder, z, image):
    """auxiliary_net.Decoder.forward: quadrant i of the features, bilinear to image_size // 2, decoder i, Sigmoid,
    BCELoss against quadrant i of the restored image; the four losses summed."""
    side = image.shape[-1] // 2
    loss = 0
    for net, fq, iq in zip(decoder.nets, quadrants(z), quadrants(image)):
        up = F.interpolate(fq, size=[side, side], mode="bilinear", align_corners=True)
        loss = loss + F.binary_cross_entropy(torch.sigmoid(net(up)), iq)
    return loss


def official_step(model, img, target, opt):
    """resnetInfoPro_HPFF.InfoProResNet.forward + train.py, written plainly (lla's module 0 holds the stem, which the
    official y path reaches through ``y = clone(stem(img))``): the x path detaches after every module; the y path
    recomputes module i-1 and module i from y's detached value; loss_i = wx*loss_x + wy*loss_y, one backward per
    module; the last: wx*CE(fc(x)) + wy*CE(fc(y)); one SGD step over all parameters."""
    K, wx, wy = model.num_modules, model.wx, model.wy
    image = unit(img)  # self._image_restore(img)
    opt.zero_grad()
    x, y = img, img
    for i in range(K - 1):
        aux = model.aux[i]
        if i == 0:
            x = run_module(model, 0, x)
            if model.early_losses:  # the paper's module 0 loss (lla's default); the official loop has none
                loss = wx * official_classifier(aux.independent.head, x, target)
                loss = loss + wy * official_classifier(aux.cascade.classifier.head, x, target) * aux.cascade.lam2
                if aux.cascade.decoder is not None:
                    loss = loss + wy * aux.cascade.lam1 * official_decoder(aux.cascade.decoder, x, image)
                loss.backward()
            x = x.detach()
            continue
        x = run_module(model, i, x)
        y = run_module(model, i - 1, y)
        z = run_module(model, i, y)
        if model.base == "infopro":
            ratio = i / (model.nominal_k - 2)
            ixx_r, ixy_r = 5.0 * (1 - ratio), 0.5 * (1 - ratio)  # README: ixx_1 5, ixy_1 0.5, ixx_2 = ixy_2 = 0
            if ixx_r == ixy_r == 0:  # the last local module of a K-module split: 0 * loss_y adds nothing
                loss_y = 0.0
            else:
                loss_y = ixx_r * official_decoder(aux.cascade.decoder, z, image) + \
                    ixy_r * official_classifier(aux.cascade.classifier.head, z, target)
        else:
            loss_y = official_classifier(aux.cascade.classifier.head, z, target)
        loss = wx * official_classifier(aux.independent.head, x, target) + wy * loss_y
        loss.backward()
        x, y = x.detach(), y.detach()
    x = run_module(model, K - 1, x)
    y = run_module(model, K - 1, run_module(model, K - 2, y))
    loss = wx * F.cross_entropy(model.backbone.head(x), target) + wy * F.cross_entropy(model.backbone.head(y), target)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("base,options", [
    ("infopro", dict(mode="reference")),
    ("infopro", dict()),
    ("dgl", dict(mode="reference")),
    ("dgl", dict(head="official")),
])
def test_per_module_stepping_equals_the_official_training_loop(base, options):
    """Parameters after 3 steps, in float64 (the two summation orders then agree to ~1e-12). BN running stats differ
    by design (the official loop runs three train-mode forwards per module, this engine two) and never enter a
    training-mode forward."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        options = {"feature_dim": 32, **options} if base == "dgl" else options  # a narrower "man" head: faster
        model = hpff(backbone="resnet32", k=8, base=base, wx=0.3, wy=0.7, **options)
        start, ref = copy.deepcopy(model), copy.deepcopy(model)
        opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        data = batches(3)
        for x, y in data:
            official_step(ref, x, y, opt)
        trainer(max_steps=3).fit(model, loader(data))
    finally:
        torch.set_default_dtype(dtype)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-7, msg=n)
    moved = {n for (n, p), (_, p0) in zip(model.named_parameters(), start.named_parameters()) if not torch.equal(p, p0)}
    assert "backbone.layers.0.0.weight" in moved  # the stem learns (reference: through module 1's cascade alone)
    assert {n.split(".")[1] for n in moved if n.startswith("aux.")} == {str(k) for k in range(model.first_loss, 7)}
    if base == "infopro":
        assert "aux.3.cascade.decoder.nets.3.0.weight" in moved


# ---------------------------------------------------------------------------------------------- training
class Recorded(HPFF):
    def final_loss(self, h, batch):
        loss = super().final_loss(h, batch)
        self.final_losses.append(float(loss))
        return loss


@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_loss_falls_on_digits(base):
    from lla.data.digits import DigitsDataModule, load_digits_split

    dm = DigitsDataModule(image_size=16)
    x, y, _, _ = load_digits_split(size=16)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64, shuffle=True, generator=g)
    torch.manual_seed(0)
    model = Recorded(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16, max_epochs=3,
                     optim={"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}, base=base,
                     denormalize=dm.denormalize)
    model.final_losses = []
    trainer(max_epochs=3).fit(model, data)
    losses = model.final_losses
    assert len(losses) == 18
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad,key", [
    (dict(momentum_copies=True), "method.momentum_copies"), (dict(base="man"), "method.base"),
    (dict(base="foo"), "method.base"), (dict(patches=0), "method.patches"), (dict(patches=9), "method.patches"),
    (dict(wx=0.0, wy=0.0), "method.wx"), (dict(head="2c2f"), "method.head"), (dict(loss="contrast"), "method.loss"),
    (dict(base="infopro", head="man"), "method.head"), (dict(early_losses="yes"), "method.early_losses"),
    (dict(mode="official"), "method.mode"), (dict(base="infopro", ixx_1=-1.0), "method.ixx_1")])
def test_bad_options_raise_one_config_error(bad, key):
    with pytest.raises(ConfigError) as err:
        hpff(**bad)
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("override,line", [
    ("method.momentum_copies=true", "error: method.momentum_copies: HPFF's paper and official code describe no MAN "
     "momentum (EMA) copies in its aux nets, so lla does not combine them; allowed: false"),
    ("method.base=mlaan", "error: method.base: unknown base rule 'mlaan'; allowed: dgl, infopro"),
])
def test_refusals_exit_2_with_one_line(override, line):
    proc = subprocess.run([sys.executable, "run.py", "method=hpff", override, "logger=none", "dataset=synthetic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [line], proc.stderr


def test_yaml_lists_every_option():
    conf = yaml.safe_load(open(ROOT / "conf/method/hpff.yaml"))
    assert conf.pop("_target_") == "lla.methods.hpff.HPFF"
    from lla.engine import LocalLearner

    params = {**inspect.signature(LocalLearner.__init__).parameters, **inspect.signature(HPFF.__init__).parameters}
    options = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(conf) == options
    assert all(conf[n] == params[n].default for n in conf)
