"""MAN (docs/methods/man.md): EMA closed form and timing, gradient routing, init, BN stats, lambdas, K labels, training."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lla.methods.man as man_module
from lla.backbones import build_backbone
from lla.errors import ConfigError
from lla.methods.man import MAN
from lla.splits import resolve_split
from tests.helpers import modules_with_grads, trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}
HAS_INFOPRO = importlib.util.find_spec("lla.aux.infopro") is not None
needs_infopro = pytest.mark.skipif(not HAS_INFOPRO, reason="lla/aux/infopro.py not written yet")


def to01(x):
    return (x * 0.25 + 0.5).clamp(0, 1)


def make(k=4, backbone="resnet20", size=16, base="dgl", cls=MAN, **kw):
    torch.manual_seed(0)
    return cls(build_backbone(backbone, 10), k=k, num_classes=10, image_size=size, optim=CONST, max_epochs=1,
               base=base, denormalize=to01, **kw)


def loader(n=4, bs=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * bs, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n * bs,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


def b_next(model, k):
    return model.backbone.layers[model.next_block_index(k)]


def params(module):
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------------------------- EMA update


class Recorder(MAN):
    """Snapshots every B_next at batch start; checks, at each EMA update, that module k+1 has not stepped yet."""

    def on_train_batch_start(self, batch, batch_idx):
        self.snaps.append([params(b_next(self, k)) for k in range(self.num_modules - 1)])

    def after_backward(self, k):
        if k < self.num_modules - 1:
            now = params(b_next(self, k))
            self.unstepped.append(all(torch.equal(a, b) for a, b in zip(now, self.snaps[-1][k])))
        super().after_backward(k)


def recorder(**kw):
    model = make(cls=Recorder, **kw)
    model.snaps, model.unstepped = [], []
    return model


def test_ema_equals_closed_form_of_pre_step_weights():
    """EMA_n = m^n e_0 + sum_i (1-m) m^(n-i) theta_i, theta_i = B_next at the *start* of batch i (docs/architecture.md#one-training-step-as-data, docs/methods/man.md#ema-copies)."""
    m, n = 0.9, 5
    model = recorder(ema_momentum=m, init_from_target=False)
    e0 = [params(model.aux[k].ema) for k in range(model.num_modules - 1)]
    trainer(max_steps=n).fit(model, loader(n=n))
    assert len(model.snaps) == n and len(model.unstepped) == n * (model.num_modules - 1)
    assert all(model.unstepped)  # the engine ran every EMA update before module k+1 stepped
    for k in range(model.num_modules - 1):
        expected = [m**n * p.double() for p in e0[k]]
        for i, snap in enumerate(model.snaps, start=1):
            expected = [e + (1 - m) * m ** (n - i) * t.double() for e, t in zip(expected, snap[k])]
        for got, want in zip(model.aux[k].ema.parameters(), expected):
            torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
        # Sensitivity: using the post-step weights (snapshot i+1) would give a measurably different EMA.
        post = [s[k] for s in model.snaps[1:]] + [params(b_next(model, k))]
        wrong = [m**n * p.double() for p in e0[k]]
        for i, snap in enumerate(post, start=1):
            wrong = [e + (1 - m) * m ** (n - i) * t.double() for e, t in zip(wrong, snap)]
        conv_w = next(model.aux[k].ema.parameters()).double()
        assert (conv_w - wrong[0]).abs().max() > 1e-5


def test_ema_converges_geometrically_to_a_constant_target():
    m, n = 0.8, 4
    model = make(ema_momentum=m, init_from_target=False)
    target = b_next(model, 0)
    for p in target.parameters():  # freeze B_next of module 0 (module 1 keeps its other layer)
        p.requires_grad_(False)
    theta, e0 = params(target), params(model.aux[0].ema)
    assert any(not torch.equal(a, b) for a, b in zip(theta, e0))
    trainer(max_steps=n).fit(model, loader(n=n))
    for got, t, e in zip(model.aux[0].ema.parameters(), theta, e0):
        torch.testing.assert_close(got, m**n * e + (1 - m**n) * t, atol=1e-6, rtol=1e-5)


def test_momentum_zero_copies_target_and_one_never_moves():
    zero = recorder(ema_momentum=0.0, init_from_target=False)
    trainer(max_steps=1).fit(zero, loader(n=1))
    for k in range(zero.num_modules - 1):
        for got, want in zip(zero.aux[k].ema.parameters(), zero.snaps[0][k]):
            assert torch.equal(got, want)
    one = make(ema_momentum=1.0, init_from_target=False)
    e0, lb0 = [params(a.ema) for a in one.aux], params(one.aux[0].lb)
    trainer(max_steps=3).fit(one, loader(n=3))
    for a, before in zip(one.aux, e0):
        assert all(torch.equal(p, q) for p, q in zip(a.ema.parameters(), before))
    assert any(not torch.equal(p, q) for p, q in zip(one.aux[0].lb.parameters(), lb0))  # training did run


def test_bn_running_stats_of_ema_are_not_averaged():
    model = make(ema_momentum=0.5, init_from_target=False)
    ema, target = model.aux[1].ema, b_next(model, 1)
    for mod in target.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.fill_(7.0)
            mod.running_var.fill_(3.0)
    buffers = {n: b.clone() for n, b in ema.named_buffers()}
    before = params(ema)
    model.after_backward(1)
    for n, b in ema.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for got, e, t in zip(ema.parameters(), before, target.parameters()):
        torch.testing.assert_close(got, 0.5 * e + 0.5 * t.detach())
    model.after_backward(model.num_modules - 1)  # the last module has no EMA copy: a no-op, not an error


# ---------------------------------------------------------------------------------------------- gradients


class GradProbe(MAN):
    """After each local backward (before anything steps): which modules hold grads, and EMA/LB grad status."""

    def backward_local(self, k, loss):
        super().backward_local(k, loss)
        mods = modules_with_grads(self)
        ema_grad = any(p.grad is not None for a in self.aux for p in a.ema.parameters())
        lb_grad = k < len(self.aux) and all(p.grad is not None for p in self.aux[k].lb.parameters())
        self.seen.append((k, mods, ema_grad, lb_grad))


@pytest.mark.parametrize("scale", [False, True])
def test_gradients_reach_lb_and_module_k_never_ema_or_module_k_plus_1(scale):
    model = make(cls=GradProbe, learnable_scale=scale)
    model.seen = []
    trainer(max_steps=2).fit(model, loader(n=2))
    K = model.num_modules
    expected = [(k, [k], False, k < K - 1) for k in range(K)]
    assert model.seen == expected * 2
    # Module k's gradient really flows through EMA_k's activations (not only through LB_k).
    x = torch.randn(4, 3, 16, 16)
    h = model.forward_module(0, x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.aux[0].ema(h).square().sum(), h)
    assert g.abs().sum() > 0
    assert all(p.grad is None for p in model.aux[0].ema.parameters())


def test_optimizers_hold_lb_and_rule_but_not_ema():
    model = make(learnable_scale=True)
    opt = model.configure_optimizers()
    for k, aux in enumerate(model.aux):
        group = {id(p) for p in opt.optimizers[k].param_groups[0]["params"]}
        assert all(id(p) in group for p in aux.lb.parameters())
        assert all(id(p) in group for p in aux.rule.parameters())
        assert id(aux.scale) in group
        assert not any(id(p) in group for p in aux.ema.parameters())
        assert all(not p.requires_grad for p in aux.ema.parameters())


def test_aux_does_not_save_a_copy_of_h():
    """LB and EMA read the same h: every saved tensor equal to h must be h's own storage (no clone)."""
    model = make()
    x, y = next(iter(loader(n=1)))
    h = model.forward_module(1, model.forward_module(0, x).detach())
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.local_loss(1, h, (x, y))
    same = [t for t in saved if t.shape == h.shape and torch.equal(t, h)]
    assert same and all(t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr() for t in same)


# ---------------------------------------------------------------------------------------------- structure


def test_init_from_target_copies_b_next_and_false_draws_fresh_weights():
    copied = make(init_from_target=True)
    fresh = make(init_from_target=False)
    for k in range(copied.num_modules - 1):
        target = b_next(copied, k).state_dict()
        for part in (copied.aux[k].lb, copied.aux[k].ema):
            assert part.state_dict().keys() == target.keys()
            assert all(torch.equal(v, target[n]) for n, v in part.state_dict().items())
        target = b_next(fresh, k).state_dict()
        lb, ema = fresh.aux[k].lb.state_dict(), fresh.aux[k].ema.state_dict()
        assert {n: v.shape for n, v in lb.items()} == {n: v.shape for n, v in target.items()}
        assert not torch.equal(lb["conv1.weight"], target["conv1.weight"])
        assert not torch.equal(ema["conv1.weight"], target["conv1.weight"])
        assert not torch.equal(lb["conv1.weight"], ema["conv1.weight"])  # drawn independently, as the reference


def test_rule_is_sized_for_b_next_output():
    calls = []
    real = man_module.make_rule

    def spy(base, **kw):
        calls.append(kw)
        return real(base, **kw)

    man_module.make_rule = spy
    try:
        model = make(k=4)  # resnet20 balanced: modules end after 1, 3, 6 -> B_next = layers 2, 4, 7
    finally:
        man_module.make_rule = real
    assert [model.next_block_index(k) for k in range(3)] == [2, 4, 7]
    assert [(c["channels"], c["spatial"]) for c in calls] == [(16, 16), (32, 8), (64, 4)]
    assert calls[0]["options"] == {"head": "man", "feature_dim": 128}


def test_learnable_scale_mixes_lb_and_ema():
    model = make(learnable_scale=True).eval()
    assert len(model.aux) == model.num_modules - 1
    assert all(float(a.scale) == 1.0 for a in model.aux)
    h = torch.randn(2, 16, 16, 16)
    aux = model.aux[0]
    with torch.no_grad():
        aux.scale.fill_(0.25)
        torch.testing.assert_close(aux.augment(h), 0.25 * aux.lb(h) + 1.75 * aux.ema(h))
    assert make().aux[0].scale is None


def test_k_labels_follow_man_tables():
    assert make(k=16, backbone="resnet32", size=32).num_modules == 15
    assert make(k=8, backbone="resnet32", size=32).num_modules == 8
    assert resolve_split("resnet110", 55, 55, MAN.split_family).num_modules == 54


@pytest.mark.parametrize("bad", [
    {"ema_momentum": 1.5}, {"ema_momentum": -0.1}, {"base": "linear"}, {"lambda_schedule": "layer"},
    {"init_from_target": "yes"}, {"head": "nope"},
])
def test_bad_options_raise_config_error(bad):
    with pytest.raises(ConfigError):
        make(**bad)


# ---------------------------------------------------------------------------------------------- InfoPro base


def flat(pairs):
    return [float(v) for pair in pairs for v in pair]


def spy_options(**kw):
    seen = []
    real = man_module.make_rule

    def spy(base, **args):
        seen.append(args)
        return real(base, **args)

    man_module.make_rule = spy
    try:
        model = make(base="infopro", **kw)
    finally:
        man_module.make_rule = real
    return model, seen


@needs_infopro
def test_stage_index_and_module_index_lambdas_reach_the_rule():
    # resnet32 K=8: modules end after 1,3,5,7,9,11,13 -> B_next stages 1,1,2,2,2,3,3; r = stage/6 (docs/methods/man.md#lambda-schedule)
    model, seen = spy_options(k=8, backbone="resnet32", size=32)
    stages = [model.backbone.specs[model.next_block_index(k)].stage for k in range(7)]
    assert stages == [1, 1, 2, 2, 2, 3, 3]
    want = [(5 * (1 - s / 6), 0.5 * (1 - s / 6)) for s in stages]
    got = [(o["options"]["lam1"], o["options"]["lam2"]) for o in seen]
    assert flat(got) == pytest.approx(flat(want)) and flat(model.lambdas) == pytest.approx(flat(want))
    for aux, (l1, l2) in zip(model.aux, want):
        if hasattr(aux.rule, "lam1"):
            assert (float(aux.rule.lam1), float(aux.rule.lam2)) == pytest.approx((l1, l2))
    assert {o["options"]["head"] for o in seen} == {"2c2f"} and seen[0]["options"]["variant"] == "cifar"

    model, seen = spy_options(k=8, backbone="resnet32", size=32, lambda_schedule="module_index", ixx_2=1.0, ixy_2=2.0)
    want = [(5 * (1 - k / 6) + k / 6, 0.5 * (1 - k / 6) + 2 * k / 6) for k in range(7)]
    assert flat((o["options"]["lam1"], o["options"]["lam2"]) for o in seen) == pytest.approx(flat(want))


@needs_infopro
def test_stage_index_uses_the_nominal_k_and_rejects_negative_weights():
    model, seen = spy_options(k=16, backbone="resnet32", size=32)  # 15 modules, but K-2 = 14 as in the reference
    assert model.num_modules == 15
    lo = [model.backbone.specs[model.next_block_index(k)].stage for k in range(14)]
    assert flat(model.lambdas) == pytest.approx(flat((5 * (1 - s / 14), 0.5 * (1 - s / 14)) for s in lo))
    with pytest.raises(ConfigError, match="negative or both zero"):
        make(base="infopro", k=4, backbone="resnet32", size=32)  # r = 2/2 and 3/2 (docs/methods/man.md#lambda-schedule)
    with pytest.raises(ConfigError, match="module 6"):  # README ixx_2 = ixy_2 = 0 leave module K-2 untrained
        make(base="infopro", k=8, backbone="resnet32", size=32, lambda_schedule="module_index")


@needs_infopro
def test_imagenet_picks_the_imagenet_variant_sized_for_b_next():
    torch.manual_seed(0)
    model = MAN(build_backbone("resnet101", 1000), k=2, num_classes=1000, image_size=224, optim=CONST,
                base="infopro", denormalize=to01)
    assert model.num_modules == 2 and model.next_block_index(0) == 5  # split after layer2[0] -> B_next layer2[1]
    assert flat(model.lambdas) == pytest.approx([5.0, 0.75])  # the reference's hard-coded 5*BCE + 0.75*CE


# ---------------------------------------------------------------------------------------------- training


class LossLog(MAN):
    def final_loss(self, h, batch):
        loss = super().final_loss(h, batch)
        self.final_losses.append(loss.detach())
        return loss


def synthetic(n=256, size=16, classes=10, noise_seed=1):
    """Class c = a fixed random template (always seed 0) + small noise (``noise_seed``: fresh samples)."""
    templates = torch.randn(classes, 3, size, size, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(noise_seed)
    y = torch.arange(n) % classes
    x = templates[y] + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


@pytest.mark.parametrize("base", ["dgl", pytest.param("infopro", marks=needs_infopro)])
def test_trains_on_a_small_learnable_synthetic_problem_and_its_loss_falls(base):
    # K=4 is below stage_index's sane range (docs/methods/man.md#lambda-schedule), so InfoPro uses the module-index schedule here.
    extra = {"lambda_schedule": "module_index", "ixx_2": 1.0, "ixy_2": 1.0} if base == "infopro" else {}
    model = make(cls=LossLog, base=base, ema_momentum=0.9, **extra)
    model.final_losses = []
    trainer(max_steps=40).fit(model, synthetic())
    losses = torch.stack(model.final_losses)
    assert len(losses) == 40 and torch.isfinite(losses).all()
    assert losses[-5:].mean() < 0.7 * losses[:5].mean()
    x, y = next(iter(synthetic(noise_seed=2)))  # held-out samples of the same classes
    model.eval()
    assert F.cross_entropy(model(x), y) < losses[:5].mean()


def test_yaml_lists_every_option_with_the_code_default():
    import inspect
    from pathlib import Path

    import yaml

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/method/man.yaml").read_text())
    assert conf.pop("_target_") == "lla.methods.man.MAN"
    from lla.engine import LocalLearner

    sig = {n: p.default for cls in (MAN, LocalLearner) for n, p in inspect.signature(cls.__init__).parameters.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY}  # the method's options and the engine's (aux_checkpoint)
    assert conf == sig
