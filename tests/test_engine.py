"""The per-module engine: isolation, stepping equivalence, Lightning counters, E2E == plain training."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lla.backbones import build_backbone
from lla.methods.dgl import DGL
from lla.methods.e2e import E2E
from tests.helpers import grad_probe, module_of_param, trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}


def batches(n=4, bs=8, size=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


def loader(n=4, bs=8, size=16, seed=0):
    xs, ys = zip(*batches(n, bs, size, seed=seed))
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=bs, shuffle=False)


def dgl(k=4, backbone="resnet20", size=16, optim=CONST, **kw):
    torch.manual_seed(0)
    return DGL(build_backbone(backbone, 10), k=k, num_classes=10, image_size=size, optim=optim, max_epochs=1, **kw)


GradProbe = grad_probe(DGL)


def test_gradient_isolation_each_loss_reaches_only_its_module():
    torch.manual_seed(0)
    model = GradProbe(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16, optim=CONST, max_epochs=1)
    model.seen = []
    trainer(max_steps=2).fit(model, loader())
    assert model.num_modules == 4
    assert model.seen[:4] == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]


def test_without_detach_gradients_would_leak():
    """Sanity check of the probe itself: feeding the live tensor makes loss k reach module k-1."""

    class Leaky(GradProbe):
        def forward_module(self, k, x):
            return super().forward_module(k, self._prev if k and self._prev is not None else x)

        def local_loss(self, k, h, batch):
            self._prev = h
            return super().local_loss(k, h, batch)

        def backward_local(self, k, loss):
            loss.backward(retain_graph=True)
            owner = module_of_param(self)
            self.seen.append((k, sorted({owner[id(p)] for p in self.parameters() if p.grad is not None})))

    torch.manual_seed(0)
    model = Leaky(build_backbone("resnet20", 10), k=3, num_classes=10, image_size=16, optim=CONST, max_epochs=1)
    model.seen, model._prev = [], None
    x, y = batches(1)[0]
    h = x
    for k in range(model.num_modules):
        h = model.forward_module(k, h)
        loss = model.final_loss(h, (x, y)) if k == model.num_modules - 1 else model.local_loss(k, h, (x, y))
        model.backward_local(k, loss)
    assert model.seen[1][1] == [0, 1]


def reference_step(model, x, y, opt):
    """The reference scripts' iteration (docs/architecture.md#one-training-step-as-data): per-module backward in one pass, one SGD over all params at the end."""
    opt.zero_grad()
    h = x
    for k in range(model.num_modules):
        h = model.forward_module(k, h.detach())
        loss = model.final_loss(h, (x, y)) if k == model.num_modules - 1 else model.local_loss(k, h, (x, y))
        loss.backward()
    opt.step()


def test_per_module_stepping_equals_single_optimizer_reference():
    model = dgl(k=4)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    data = batches(4)
    for x, y in data:
        reference_step(ref, x, y, opt)
    trainer(max_steps=4).fit(model, loader())
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    moved = sum((p - q).abs().sum() for p, q in zip(model.parameters(), dgl(k=4).parameters()))
    assert moved > 0  # training really changed the weights


def test_fused_sgd_is_the_default_and_the_for_loop_rule_up_to_rounding():
    # float64: the fused kernel rounds its multiply-adds in another order (float32 runs part in the last place after
    # a step or two); a wrong rule (no nesterov, no weight decay) would differ by ~1e-3 here.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fused, loop = dgl(k=4), dgl(k=4, optim={**CONST, "fused": False})
        assert all(o.defaults["fused"] for o in fused.configure_optimizers().optimizers)
        assert not any(o.defaults["fused"] for o in loop.configure_optimizers().optimizers)
        data = [(x.double(), y) for x, y in batches(3)]
        for model in (fused, loop):
            trainer(max_steps=3).fit(model, DataLoader(data, batch_size=None))
    finally:
        torch.set_default_dtype(dtype)
    for (n, p), q in zip(fused.named_parameters(), loop.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-10, msg=n)


def fit_fp16(model, scaler, steps, data):
    """precision=16-mixed with a given GradScaler (Lightning itself only allows fp16 AMP on a GPU; CPU autocast and
    GradScaler run the same code paths)."""
    trainer(max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]).fit(model, data)


def test_fp16_mixed_unscales_every_module_step():
    # Loss scales are powers of two, so a correct unscale gives the same weights at any scale that neither
    # overflows nor underflows (to fp16 rounding of tiny gradients); stepping the scaled gradients (the container
    # bypassing the scaler) would move them 16x further.
    runs = []
    for scale in (2.0**8, 2.0**12):
        model = dgl(k=4)
        fit_fp16(model, torch.amp.GradScaler("cpu", init_scale=scale), 3, loader(n=3))
        runs.append(model)
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)
    assert sum((p - p0).abs().sum() for p, p0 in zip(runs[0].parameters(), dgl(k=4).parameters())) > 0


def test_fp16_overflow_skips_the_step_and_the_next_step_is_clean():
    # Step 1 overflows at scale 2**40 in every module: nothing moves, the scale drops to 2**10. Step 2 must then be
    # exactly one clean step (torch's fused SGD would add never-initialised momentum buffers here).
    x, y = batches(1)[0]
    twice = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=len(x), shuffle=False)
    skipped = dgl(k=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    fit_fp16(skipped, scaler, 2, twice)
    assert scaler.get_scale() == 2.0**10
    clean = dgl(k=4)
    fit_fp16(clean, torch.amp.GradScaler("cpu", init_scale=2.0**10), 1, loader(n=1))
    for (n, p), q in zip(skipped.named_parameters(), clean.parameters()):
        assert torch.equal(p, q), n


def test_fp16_module_without_gradients_steps_as_a_no_op():
    opt = dgl(k=4).configure_optimizers()
    opt.use_scaler(torch.amp.GradScaler("cpu"))
    before = [p.detach().clone() for p in opt.optimizers[0].param_groups[0]["params"]]
    opt.step_module(0)  # GradScaler.step alone would assert: no inf checks recorded
    assert all(torch.equal(a, p) for a, p in zip(before, opt.optimizers[0].param_groups[0]["params"]))


def test_fp16_keeps_the_fused_kernel_and_resume_restores_momentum_buffers():
    # The fused kernel stays on under the scaler (it skips an overflowing step on the device). A checkpoint written
    # before a module's first step has no momentum buffers: loading it must create them again (zeros), or the fused
    # kernel's first step after a skipped one would read empty_like memory.
    saved = dgl(k=4).configure_optimizers().state_dict()
    for sd in saved["optimizers"]:
        sd["state"] = {}
    opt = dgl(k=4).configure_optimizers()
    opt.use_scaler(torch.amp.GradScaler("cpu"))
    opt.load_state_dict(saved)
    assert all(g["fused"] is True for g in opt.param_groups)
    assert all(o._step_supports_amp_scaling for o in opt.optimizers)
    for o in opt.optimizers:
        for p in o.param_groups[0]["params"]:
            assert torch.equal(o.state[p]["momentum_buffer"], torch.zeros_like(p))


def test_channels_last_trains_the_same_model_in_nhwc():
    class Seen(DGL):
        def training_step(self, batch, batch_idx):
            self.layouts.append(batch[0].is_contiguous(memory_format=torch.channels_last))
            return super().training_step(batch, batch_idx)

    # float64: the NHWC kernels sum in another order, and DGL's BatchNorm1d over 8 samples amplifies float32
    # rounding to ~1e-3 in three steps; in float64 the two layouts agree to ~1e-12.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        nhwc = Seen(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16, optim=CONST, max_epochs=1)
        nhwc.layouts = []
        nhwc.use_channels_last()
        nchw = dgl(k=4)
        data = [(x.double(), y) for x, y in batches(3)]
        for model in (nhwc, nchw):
            trainer(max_steps=3).fit(model, DataLoader(data, batch_size=None))
    finally:
        torch.set_default_dtype(dtype)
    assert nhwc.layouts == [True] * 3
    conv = nhwc.backbone.layers[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for (n, p), q in zip(nhwc.named_parameters(), nchw.parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-7, msg=n)


def test_e2e_equals_plain_supervised_training():
    torch.manual_seed(0)
    model = E2E(build_backbone("resnet20", 10), k=16, num_classes=10, image_size=16, optim=CONST, max_epochs=1)
    assert model.num_modules == 1 and len(model.aux) == 0
    plain = copy.deepcopy(model.backbone)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for x, y in batches(3):
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    trainer(max_steps=3).fit(model, loader(n=3))
    for (n, p), q in zip(model.backbone.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_global_step_counts_batches_not_module_steps():
    model = dgl(k=4)
    seen = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.global_step)

    t = trainer(max_steps=5, callbacks=[Count()])
    t.fit(model, loader(n=8))
    assert t.global_step == 5
    assert seen == [1, 2, 3, 4, 5]
    t2 = trainer(max_epochs=1, callbacks=[])
    t2.fit(dgl(k=4), loader(n=3))
    assert t2.global_step == 3


def test_lr_schedule_steps_once_per_epoch_for_every_module():
    torch.manual_seed(0)
    model = DGL(build_backbone("resnet20", 10), k=3, num_classes=10, image_size=16, max_epochs=4,
                optim={"lr": 0.8, "schedule": "warmup_cosine", "warmup_epochs": 2, "warmup_start_lr": 0.01})
    lrs = []

    class LR(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append([g["lr"] for g in pl_module.optimizers().optimizer.param_groups])

    trainer(max_epochs=4, callbacks=[LR()]).fit(model, loader(n=2))
    assert all(len(set(row)) == 1 and len(row) == 3 for row in lrs)  # every module, same LR
    from lla.schedules import warmup_cosine_lr
    expected = [warmup_cosine_lr(e, 0.8, 4, 2, 0.01) for e in range(1, 5)]
    assert [row[0] for row in lrs] == pytest.approx(expected)
    assert lrs[0][0] == pytest.approx(0.01)


def test_every_trainable_parameter_belongs_to_exactly_one_module():
    model = dgl(k=8, backbone="resnet32", size=32)
    opt = model.configure_optimizers()
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(opt.optimizers) == model.num_modules == 8


def test_validation_uses_plain_backbone_and_logs_accuracy():
    model = dgl(k=4)
    t = trainer(max_epochs=1, limit_val_batches=None)
    t.fit(model, loader(n=2), loader(n=2, seed=1))
    assert 0.0 <= float(t.callback_metrics["val/acc"]) <= 1.0
    assert "val/acc_best" in t.callback_metrics and "train/loss/m0" in t.callback_metrics
    x, _ = batches(1)[0]
    model.eval()
    torch.testing.assert_close(model(x), model.backbone.head(torch.nn.Sequential(*model.backbone.layers)(x)))


@pytest.mark.parametrize("head", ["official", "auglocal", "man"])
def test_dgl_heads_train(head):
    model = dgl(k=4, head=head)
    t = trainer(max_steps=2)
    t.fit(model, loader(n=2))
    assert t.global_step == 2


def test_ready_schedule_respects_span():
    class Span2(DGL):
        def span(self, k):
            return 2 if k >= 1 else 1

    torch.manual_seed(0)
    m = Span2(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16, optim=CONST, max_epochs=1)
    # module j waits for loss j+1, the last loss that reaches it; the last module steps with the last loss
    assert m._ready == [[], [0], [1], [2, 3]]


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34",
                                  "resnet50", "resnet101", "resnet152", "resnext101_32x8d", "vgg13"])
def test_every_backbone_trains_one_local_step(name):
    """One real DGL step (K=2) per backbone on tiny synthetic inputs: split, aux net and per-module SGD fit together."""
    from lla.backbones import BACKBONES

    assert name in BACKBONES
    size = 16 if name.startswith("resnet") and BACKBONES[name].__module__.endswith("cifar_resnet") else 64
    torch.manual_seed(0)
    model = DGL(build_backbone(name, 10), k=2, num_classes=10, image_size=size, optim=CONST, max_epochs=1)
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=1)
    t.fit(model, loader(n=1, bs=2, size=size))
    assert t.global_step == 1 and model.num_modules == 2
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(changed) > len(changed) // 2
