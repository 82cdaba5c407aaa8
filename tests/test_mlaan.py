"""MLAAN (docs/methods/mlaan.md): LAM lists, cascade reach, EMA, equivalence with the reference's dual-path loop, training."""

from __future__ import annotations

import copy
import importlib.util
import inspect

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from lla.aux.lam import sample_lam_layers, shape_changers
from lla.backbones import build_backbone
from lla.ema import ema_update
from lla.errors import ConfigError
from lla.methods.mlaan import MLAAN
from lla.splits import lam_layers
from tests.helpers import trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}
HAS_INFOPRO = importlib.util.find_spec("lla.aux.infopro") is not None


def batches(n=3, bs=8, size=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


def loader(data, bs=8):
    xs, ys = zip(*data)
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=bs, shuffle=False)


def mlaan(cls=MLAAN, backbone="resnet20", k=4, size=16, **kw):
    torch.manual_seed(0)
    return cls(build_backbone(backbone, 10), k=k, num_classes=10, image_size=size, optim=CONST, max_epochs=1, **kw)


def owners(model):
    return {id(p): k for k in range(model.num_modules) for p in model.module_parameters(k)}


# ---------------------------------------------------------------------------------------------- LAM lists
def test_r32_k15_lam_of_module_0_copies_layers_6_11_13_15():
    model = mlaan(backbone="resnet32", k=15, size=32, head="linear")
    assert model.num_modules == 15 and model.lam_source == "table:mlaan:15"
    assert model.lam_layers[0] == [6, 11, 13, 15]  # (2,0), (3,0), (3,2), (3,4)
    assert model.lam_layers[13] == [15]
    lam = model.aux[0].lam
    for block, i in zip(lam.blocks, [6, 11, 13, 15]):
        primary = model.backbone.layers[i]
        assert block is not primary
        for (n, p), q in zip(block.named_parameters(), primary.parameters()):
            assert p.data_ptr() != q.data_ptr() and torch.equal(p, q), n  # a copy, equal at init
    assert all(not p.requires_grad for p in lam.ema.parameters())
    assert all(torch.equal(p, q) for p, q in zip(lam.ema.parameters(), model.backbone.layers[6].parameters()))
    own = owners(model)
    assert {own[id(p)] for p in model.aux[0].parameters()} == {0}  # LAM + MLM train with module 0


def test_lam_init_from_primary_false_draws_fresh_copies():
    model = mlaan(backbone="resnet32", k=15, size=32, head="linear", lam_init_from_primary=False)
    lam = model.aux[0].lam
    assert not torch.equal(lam.blocks[0].conv1.weight, model.backbone.layers[6].conv1.weight)
    assert not torch.equal(lam.ema.conv1.weight, lam.blocks[0].conv1.weight)  # drawn separately, as the reference


@pytest.mark.parametrize("k", [55, 54])
def test_k55_label_gives_54_modules_on_resnet110(k):
    model = mlaan(backbone="resnet110", k=k, size=32, head="linear")
    assert model.num_modules == 54 and len(model.aux) == 53
    assert model.lam_source == "table:mlaan:54"
    assert model.lam_layers[0] == [19, 37, 39, 54] and model.lam_layers[52] == [54]
    assert model.describe()["modules"] == 54


def test_k_without_table_samples_a_lam_list_and_trains():
    model = mlaan(backbone="resnet32", k=4, size=32, head="linear")
    assert lam_layers("resnet32", 4) is None and model.lam_source == "rule"
    # modules end at 3, 7, 11: stage openers 6 and 11 kept, last block 15, deepest stage filled skipping one block
    assert model.lam_layers == [[6, 11, 13, 15], [11, 13, 14, 15], [12, 13, 14, 15]]
    t = trainer(max_steps=1)
    t.fit(model, loader(batches(1, size=32)))
    assert t.global_step == 1


def test_sampling_rule_reproduces_the_regular_cifar_table_rows():
    for name, k, rows in (("resnet32", 15, [0, 1, 3, 5, 6, 7, 8, 9, 12, 13]), ("resnet32", 8, [0, 1, 3, 4, 6]),
                          ("resnet110", 54, list(range(35)) + [52]), ("resnet110", 32, list(range(21)))):
        model_bb = build_backbone(name, 10)
        from lla.splits import resolve_split

        split = resolve_split(name, model_bb.num_layers, k, "mlaan")
        table, openers = lam_layers(name, k), shape_changers(model_bb.specs)
        for m in rows:
            end = split.module_layers(m)[-1]
            assert sample_lam_layers(end, model_bb.num_layers, openers) == table[m], (name, k, m)


def test_sampling_rule_invariants():
    openers = [6, 11]  # resnet32
    for end in range(15):
        row = sample_lam_layers(end, 16, openers, depth=4)
        assert row[-1] == 15 and all(end < i for i in row) and row == sorted(set(row))
        assert set(o for o in openers if o > end) <= set(row) and len(row) <= 4
    assert sample_lam_layers(1, 16, openers, depth=2) == [6, 11, 15]  # openers are kept even past the depth
    with pytest.raises(ValueError):
        sample_lam_layers(15, 16, openers)


# ---------------------------------------------------------------------------------------------- gradient reach
class ReachProbe(MLAAN):
    """After each loss's backward: which modules' gradients it changed, and whether its graphs were freed.

    ``keep`` zeroes one of the two local losses' weights inside backward_local, with the span unchanged, so the
    real routing is exercised: "x" keeps only the independent head, "y" only the cascaded LAM loss.
    """

    keep = "both"

    def backward_local(self, k, loss):
        own = owners(self)
        before = {id(p): (p.grad.clone() if p.grad is not None else None) for p in self.parameters()}
        handoff = self.handoff
        if handoff is not None and handoff.x_share is None and self.keep != "both":
            (wx, lx), (wy, ly) = handoff.heads
            self.handoff = handoff._replace(heads=((wx if self.keep == "x" else 0.0, lx),
                                                   (wy if self.keep == "y" else 0.0, ly)))
        h = handoff.h if handoff is not None else None
        super().backward_local(k, loss)
        changed = set()
        for p in self.parameters():
            old = before[id(p)]
            if p.grad is not None and (old is None or not torch.equal(p.grad, old)) and p.grad.abs().sum() > 0:
                changed.add(own[id(p)])
        self.reach.append((k, sorted(changed)))
        if h is not None:
            layer_params = [p for i in self.module_layers(k) for p in self.backbone.layers[i].parameters()]
            try:
                torch.autograd.backward(h, torch.ones_like(h), inputs=layer_params)
                self.freed.append(False)
            except RuntimeError:
                self.freed.append(True)


def probe(keep="both", **kw):
    model = mlaan(ReachProbe, k=5, **kw)
    model.keep, model.reach, model.freed = keep, [], []
    trainer(max_steps=1).fit(model, loader(batches(1)))
    return model


@pytest.mark.parametrize("span", [2, 3])
def test_cascaded_loss_reaches_exactly_span_modules(span):
    model = probe(cascade_span=span)
    assert model.num_modules == 5
    expected = [(k, list(range(max(0, k - span + 1), k + 1))) for k in range(5)]
    assert model.reach == expected
    # module j steps only after the last loss reaching it, loss min(j+span-1, K-1)
    assert model._ready == ([[], [0], [1], [2], [3, 4]] if span == 2 else [[], [], [0], [1], [2, 3, 4]])
    assert model.freed == [True] * 5  # no graph survives a module's backward (no retain leak)
    y_only = probe("y", cascade_span=span)
    assert y_only.reach[:4] == expected[:4]


def test_independent_loss_alone_reaches_only_its_module():
    model = probe("x", cascade_span=3)
    assert model.reach[:4] == [(k, [k]) for k in range(4)]
    assert model.freed == [True] * 5


def test_reference_switches_no_early_loss_and_final_y_only():
    model = probe(cascade_span=3, early_losses=False, final_x_loss=False)
    assert len(model.aux[0]._modules) == 0 and len(model.aux[1]._modules) == 0  # no loss -> no aux net (docs/reference-code.md#unused-aux-nets)
    assert model.reach == [(0, []), (1, []), (2, [0, 1, 2]), (3, [1, 2, 3]), (4, [2, 3, 4])]


# ---------------------------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("update_all", [True, False])
def test_ema_of_first_lam_block_follows_the_closed_form(update_all):
    m, steps = 0.5, 3
    model = mlaan(k=4, ema_momentum=m, update_all_ema=update_all, head="linear")
    K = model.num_modules
    sources = [model.lam_layers[k][0] for k in range(K - 1)]
    e0 = [[p.detach().clone() for p in model.aux[k].lam.ema.parameters()] for k in range(K - 1)]
    seen = []  # source weights at the start of every step: what the EMA reads (the source steps later)

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([[p.detach().clone() for p in pl_module.backbone.layers[i].parameters()] for i in sources])

    trainer(max_steps=steps, callbacks=[Record()]).fit(model, loader(batches(steps)))
    for k in range(K - 1):
        got = list(model.aux[k].lam.ema.parameters())
        if not update_all and k < K - 2:
            assert all(torch.equal(g, e) for g, e in zip(got, e0[k]))  # the CIFAR reference: frozen
            continue
        for j, g in enumerate(got):
            want = m ** steps * e0[k][j] + sum((1 - m) * m ** (steps - 1 - t) * seen[t][k][j] for t in range(steps))
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)
        assert not torch.equal(got[0], e0[k][0])  # it really moved


# ---------------------------------------------------------------------------------------------- equivalence
def run_module(model, j, x):
    for i in model.module_layers(j):
        x = model.backbone.layers[i](x)
    return x


def reference_step(model, x, y, opt):
    """The reference's dual path, written plainly: an x path (module k on its detached input, independent head) and
    a y path (modules k-span+1..k recomputed from a detached input, LAM head); one backward per module, EMA update
    after it, one SGD over all parameters at the end (docs/architecture.md#one-training-step-as-data, docs/methods/mlaan.md)."""
    K, span, wx, wy = model.num_modules, model.cascade_span, model.wx, model.wy
    first = 0 if model.early_losses else span - 1
    opt.zero_grad()
    inputs, h = [], x
    for k in range(K):
        inputs.append(h.detach())
        hx = run_module(model, k, inputs[k])
        if k < first and k < K - 1:
            h = hx
            continue
        s = min(span, k + 1)
        z = inputs[k - s + 1]
        for j in range(k - s + 1, k + 1):
            z = run_module(model, j, z)
        if k < K - 1:
            loss = wx * model.aux[k].mlm(hx, y) + wy * model.aux[k].lam(z, y)
        elif model.final_x_loss:
            loss = wx * F.cross_entropy(model.backbone.head(hx), y) + wy * F.cross_entropy(model.backbone.head(z), y)
        else:
            loss = F.cross_entropy(model.backbone.head(z), y)
        loss.backward()
        if k < K - 1 and (model.update_all_ema or k == K - 2):
            ema_update(model.aux[k].lam.ema, model.backbone.layers[model.lam_layers[k][0]], model.ema_momentum)
        h = hx
    opt.step()


@pytest.mark.parametrize("options", [
    dict(cascade_span=2),
    dict(cascade_span=3, early_losses=False, final_x_loss=False, update_all_ema=False),
])
def test_per_module_stepping_equals_the_reference_dual_path_loop(options):
    """Compares parameters only (EMA copies included): BN running stats differ by design (the reference runs
    span+1 train-mode forwards per module, this engine span) and never enter a training-mode forward.

    In float64: the two orders of summation are then equal to ~1e-12. In float32 they drift apart by ~1e-5 after a
    few steps because the "man" head's BatchNorm1d over 8 samples amplifies rounding noise, which would hide a
    real error of the same size.
    """
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = mlaan(k=5, wx=0.3, wy=0.7, ema_momentum=0.5, **options)
        start = copy.deepcopy(model)
        ref = copy.deepcopy(model)
        opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        data = batches(3)
        for x, y in data:
            reference_step(ref, x, y, opt)
        trainer(max_steps=3).fit(model, loader(data))
    finally:
        torch.set_default_dtype(dtype)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-7, msg=n)
    K = model.num_modules
    updated = range(model.first_loss, K - 1) if model.update_all_ema else [K - 2]
    moving = {"backbone.layers.0.0.weight", *(f"aux.{k}.lam.ema.conv1.weight" for k in updated)}
    for (n, p), (_, p0) in zip(model.named_parameters(), start.named_parameters()):
        if n in moving:
            moving.discard(n)
            assert not torch.equal(p, p0), n  # training and every updated EMA really moved
    assert not moving


# ---------------------------------------------------------------------------------------------- training
def synthetic(n=256, size=8, classes=4, seed=0):
    """Class c = a fixed random template + noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    x = templates[y] + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


class Recorded(MLAAN):
    def final_loss(self, h, batch):
        loss = super().final_loss(h, batch)
        self.final_losses.append(float(loss))
        return loss


@pytest.mark.parametrize("base", ["dgl", pytest.param("infopro", marks=pytest.mark.skipif(
    not HAS_INFOPRO, reason="lla.aux.infopro not written yet"))])
def test_trains_on_a_small_learnable_synthetic_problem_and_its_loss_falls(base):
    extra = {} if base == "dgl" else dict(lambda_schedule="module_index", ixx_1=1.0, ixy_1=1.0, ixx_2=0.5,
                                          ixy_2=1.0, denormalize=lambda x: torch.sigmoid(x))
    torch.manual_seed(0)
    model = Recorded(build_backbone("resnet20", 4), k=4, num_classes=4, image_size=8, max_epochs=2,
                     optim={"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}, base=base, **extra)
    model.final_losses = []
    trainer(max_epochs=2).fit(model, synthetic())
    losses = model.final_losses
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [dict(ema_momentum=1.5), dict(cascade_span=0), dict(base="foo"),
                                 dict(lam_head="mlp"), dict(wx=0.0, wy=0.0), dict(head="nope"),
                                 dict(update_all_ema="yes"), dict(lambda_schedule="x")])
def test_bad_options_raise_config_error(bad):
    with pytest.raises(ConfigError):
        mlaan(**bad)


def test_local_and_final_losses_reach_backward_local_as_a_named_hand_off():
    model = mlaan(k=4)
    x, y = batches(1)[0]
    h = model.forward_module(0, x)
    loss = model.local_loss(0, h, (x, y))
    handoff = model.handoff
    assert (handoff.k, handoff.h is h, handoff.x_share) == (0, True, None)
    assert [w for w, _ in handoff.heads] == [0.001, 0.999]
    torch.testing.assert_close(loss, sum(w * part for w, part in handoff.heads).detach())
    with pytest.raises(RuntimeError, match=r"backward_local\(1\) received module 0's losses"):
        model.backward_local(1, loss)  # a hand-off is only ever consumed by the module that made it
    assert model.handoff is None
    model.final_loss(model.backbone.layers[-1](torch.randn(8, 64, 4, 4)), (x, y))
    assert model.handoff.k == 3 and len(model.handoff.heads) == 1 and model.handoff.x_share == pytest.approx(0.001)


@pytest.mark.parametrize("bad", [dict(base="foo"), dict(lambda_schedule="x"), dict(init_from_target="yes"),
                                 dict(base="infopro", lambda_schedule="module_index"),  # module K-2: both 0
                                 dict(base="infopro", ixx_1=-1.0, ixy_1=-1.0)])  # negative weights
def test_man_and_mlaan_check_base_rule_options_alike(bad):
    """One helper (lla.aux.plugin) checks both methods' base-rule options: the same bad value, the same line."""
    from lla.methods.man import MAN

    bad = dict(bad)
    bool_key = "init_from_target" if "init_from_target" in bad else None
    errors = []
    for cls in (MAN, MLAAN):
        options = dict(bad)
        if bool_key and cls is MLAAN:
            options = {"update_all_ema": options.pop(bool_key)}
        with pytest.raises(ConfigError) as err:
            mlaan(cls, k=4, denormalize=lambda x: x, **options)
        errors.append(str(err.value).replace("update_all_ema", bool_key or "update_all_ema"))
    assert errors[0] == errors[1]
    if "ixx_1" in bad or "module_index" in bad.values():
        assert "method.lambda_schedule" in errors[0] and "negative or both zero" in errors[0]


def test_yaml_lists_every_option():
    conf = yaml.safe_load(open("conf/method/mlaan.yaml"))
    assert conf.pop("_target_") == "lla.methods.mlaan.MLAAN"
    from lla.engine import LocalLearner

    params = {**inspect.signature(LocalLearner.__init__).parameters, **inspect.signature(MLAAN.__init__).parameters}
    options = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}  # the method's and the engine's
    assert set(conf) == options
    assert all(conf[n] == params[n].default for n in conf)
