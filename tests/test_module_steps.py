"""Per-module gradient accumulation and clipping, top-1 val/acc, and no host sync inside a training step.

The accumulation checks train in float64 on models without BatchNorm (BN normalises each batch by its own statistics,
so 2 x 8 samples can never equal 16): accumulating N batches must give the step one N-times-larger batch gives.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lla.backbones import build_backbone
from lla.errors import ConfigError
from lla.methods.dgl import DGL
from lla.methods.mlaan import MLAAN
from lla.optim import ModuleOptimizers, OptimConfig
from tests.helpers import strip_bn, trainer

ROOT = Path(__file__).resolve().parent.parent
CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}
SIZE = 16


def build(method: str = "dgl", k: int = 4, bn: bool = False):
    torch.manual_seed(0)
    cls, extra = {"dgl": (DGL, {}), "mlaan": (MLAAN, {})}[method]  # MLAAN: cascade span 2, EMA copies
    model = cls(build_backbone("resnet20", 10), k=k, num_classes=10, image_size=SIZE, optim=CONST, max_epochs=1,
                denormalize=lambda x: x * 0.5 + 0.5, **extra)
    return model if bn else strip_bn(model)


def data(n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g))


class float64:
    def __enter__(self):
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.before)


# ---------------------------------------------------------------------------------------------- val/acc
def test_val_acc_is_top1_over_samples_and_the_class_mean_has_its_own_name():
    """9 samples of class 0 all right, 1 of class 1 wrong: top-1 = 0.9, mean of per-class accuracies = 0.5."""

    class Fixed(DGL):
        def forward(self, x):  # predicts class 0 for everything
            return torch.zeros(x.shape[0], self.num_classes).index_fill_(1, torch.tensor([0]), 1.0)

    torch.manual_seed(0)
    model = Fixed(build_backbone("resnet20", 10), k=2, num_classes=10, image_size=SIZE, optim=CONST, max_epochs=1)
    y = torch.tensor([0] * 9 + [1])
    val = DataLoader(TensorDataset(torch.randn(10, 3, SIZE, SIZE), y), batch_size=4)
    t = trainer(max_steps=1, limit_val_batches=None)
    t.fit(model, DataLoader(data(2), batch_size=2), val)
    correct, total = 9, 10
    assert float(t.callback_metrics["val/acc"]) == pytest.approx(correct / total)
    assert float(t.callback_metrics["val/acc_class_mean"]) == pytest.approx(0.5)  # (1 + 0) / 2 classes seen
    assert float(t.callback_metrics["val/acc_best"]) == pytest.approx(0.9)
    t.test(model, val, verbose=False)
    assert float(t.callback_metrics["test/acc"]) == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------- accumulation
def fit(model, dataset, batch_size, accumulate=1, clip=None, algorithm="norm", **kw):
    model.configure_module_steps(accumulate, clip, algorithm)
    t = trainer(max_epochs=1, **kw)
    t.fit(model, DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return t


@pytest.mark.parametrize("method", ["dgl", "mlaan"])
def test_accumulating_2x8_equals_one_step_on_16(method):
    with float64():
        ds = data(32, dtype=torch.float64)
        acc, big, plain = build(method), build(method), build(method)
        t_acc = fit(acc, ds, 8, accumulate=2)  # 4 batches -> 2 steps
        t_big = fit(big, ds, 16)                # 2 batches -> 2 steps
        fit(plain, ds, 8)                      # negative control: 4 steps on 8
    assert t_acc.global_step == t_big.global_step == 2  # global_step counts optimizer steps (windows)
    for (n, p), q in zip(acc.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8, msg=n)
    assert max((p - q).abs().max() for p, q in zip(acc.parameters(), plain.parameters())) > 1e-4


def test_last_partial_window_steps_at_epoch_end_on_its_own_mean():
    """5 batches of 4 with N=2: windows {0,1}, {2,3}, {4}: the same as batches of 8, 8 and 4."""
    with float64():
        ds = data(20, dtype=torch.float64)
        acc, ref = build(), build()
        t = fit(acc, ds, 4, accumulate=2)
        ref_t = trainer(max_epochs=1)
        sizes = [8, 8, 4]
        batches = [ds[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3)]
        ref_t.fit(ref, DataLoader(batches, batch_size=None))
    assert t.global_step == 3
    for (n, p), q in zip(acc.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8, msg=n)


def test_accumulation_and_clipping_reach_the_model_from_the_config():
    from lla.build import check_run

    seen = {}

    def build_and_look(cfg):
        from lla.cli import build as real_build

        dm, model = real_build(cfg)
        seen.update(n=model.accumulate_grad_batches, clip=model._clip)
        return dm, model

    check_run(["method=dgl", "k=4", "dataset=synthetic", "backbone=resnet20", "dataset.image_size=16",
               "dataset.num_samples=32", "dataset.num_val=16", "logger=none", "trainer.accumulate_grad_batches=3",
               "trainer.gradient_clip_val=0.5", "trainer.gradient_clip_algorithm=value"], build=build_and_look)
    assert seen == {"n": 3, "clip": (0.5, "value")}


@pytest.mark.parametrize("override,key", [
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.accumulate_grad_batches=1.5", "trainer.accumulate_grad_batches"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("trainer.gradient_clip_val=big", "trainer.gradient_clip_val"),
    ("trainer.gradient_clip_algorithm=max", "trainer.gradient_clip_algorithm"),
])
def test_bad_accumulation_and_clipping_values_are_one_line_errors(override, key):
    from lla.build import check_run

    with pytest.raises(ConfigError) as err:
        check_run(["method=dgl", override])
    assert err.value.key == key and "\n" not in str(err.value) and "allowed: " in str(err.value)


def test_train_runs_with_accumulation_and_clipping(tmp_path):
    """Through lla.cli.train (Lightning itself rejects both flags under manual optimization)."""
    import json

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from lla.cli import CONF_DIR, train

    overrides = ["dataset=synthetic", "backbone=resnet20", "method=dgl", "k=4", "dataset.image_size=16",
                 "dataset.num_samples=48", "dataset.num_val=16", "dataset.batch_size=8", "trainer.max_epochs=1",
                 "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                 "measure.activation_batches=0", "trainer.accumulate_grad_batches=2",
                 "trainer.gradient_clip_val=1.0"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    train(cfg, tmp_path, choices, overrides)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == 3  # 6 batches / 2


# ---------------------------------------------------------------------------------------------- clipping
class NormAtStep(L.Callback):
    """Each module's gradient norm (and largest element) right before its own optimizer steps."""

    def __init__(self):
        self.norms: dict[int, list[float]] = {}
        self.maxabs: dict[int, list[float]] = {}

    def on_train_start(self, trainer, pl_module):
        for j, opt in enumerate(pl_module.optimizers().optimizer.optimizers):
            opt.register_step_pre_hook(self._hook(j))

    def _hook(self, j):
        def hook(opt, args, kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.norms.setdefault(j, []).append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))
            self.maxabs.setdefault(j, []).append(float(max(g.abs().max() for g in grads)))
        return hook


@pytest.mark.parametrize("accumulate", [1, 2])
def test_clipped_module_gradient_norm_is_at_most_the_limit(accumulate):
    limit = 0.05
    ds = data(32)
    clipped, free = NormAtStep(), NormAtStep()
    fit(build(bn=True), ds, 8, accumulate, callbacks=[free])
    fit(build(bn=True), ds, 8, accumulate, clip=limit, callbacks=[clipped])
    assert set(clipped.norms) == set(range(4)) and all(len(v) == 4 // accumulate for v in clipped.norms.values())
    assert all(n <= limit * (1 + 1e-5) for v in clipped.norms.values() for n in v)
    assert min(n for v in free.norms.values() for n in v) > limit  # without clipping every module is above it
    # per module: each is clipped to the limit on its own (a global norm over all modules would leave them smaller)
    assert all(n == pytest.approx(limit, rel=1e-4) for v in clipped.norms.values() for n in v)


def test_clip_by_value_bounds_every_element():
    limit = 2.0**-10  # exact in float32
    probe, free = NormAtStep(), NormAtStep()
    fit(build(bn=True), data(16), 8, 1, callbacks=[free])
    fit(build(bn=True), data(16), 8, 1, clip=limit, algorithm="value", callbacks=[probe])
    assert max(m for v in probe.maxabs.values() for m in v) <= limit
    assert min(m for v in free.maxabs.values() for m in v) > limit


def test_clipping_under_fp16_acts_on_unscaled_gradients():
    """Loss scale 2**12: clipping the scaled gradients would leave a norm of limit/4096 after the unscale."""
    limit = 0.05
    probe = NormAtStep()
    model = build(bn=True)
    model.configure_module_steps(1, limit, "norm")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer(max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=[probe]).fit(
        model, DataLoader(data(16), batch_size=8))
    # the fused kernel unscales inside the step: the hook sees unscaled (clip_ -> unscale_ first) gradients
    assert all(n == pytest.approx(limit, rel=1e-3) for v in probe.norms.values() for n in v)


# ---------------------------------------------------------------------------------------------- momentum buffers
def test_zero_momentum_buffers_give_torchs_first_step_in_float64():
    with float64():
        for fused in (True, False):
            torch.manual_seed(0)
            ref = nn.Linear(5, 3)
            ours = nn.Linear(5, 3)
            ours.load_state_dict(ref.state_dict())
            opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                      fused=fused)
            opt = ModuleOptimizers([list(ours.parameters())], OptimConfig(schedule="constant", warmup_epochs=0,
                                                                        fused=fused), 1)
            assert all("momentum_buffer" in opt.optimizers[0].state[p] for p in ours.parameters())
            x = torch.randn(7, 5)
            for _ in range(3):
                for net in (ref, ours):
                    net.zero_grad()
                    net(x).pow(2).sum().backward()
                opt_ref.step()
                opt.step_module(0)
                for p, q in zip(ours.parameters(), ref.parameters()):
                    assert torch.equal(p, q), fused


# ---------------------------------------------------------------------------------------------- host syncs
class Reads(L.Callback):
    """Counts host reads (``.item()``, ``.tolist()``, ``.cpu()``) per training batch: from this batch's start (this
    callback runs first) to the next one's, so the step, every callback and Lightning's per-batch work count."""

    def __init__(self, monkeypatch):
        self.per_batch: dict[int, int] = {}
        self.current: int | None = None
        self.batches = 0
        for name in ("item", "tolist", "cpu"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(real))

    def _counting(self, real):
        def method(t, *args, **kwargs):
            if self.current is not None:
                self.per_batch[self.current] = self.per_batch.get(self.current, 0) + 1
            return real(t, *args, **kwargs)
        return method

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.current = self.batches
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.current = None


def cli_callbacks(tmp_path, every):
    """The callbacks lla.cli.train uses, reading every ``every`` steps."""
    from lla.callbacks import ActivationMemory, LossProgressBar, StepTimer
    from lla.checkpointing import reliability_callbacks

    safety, _, _ = reliability_callbacks(tmp_path, every_n_steps=0, nan_check_every=every, method="dgl")
    return [StepTimer(warmup=1, read_every=every), ActivationMemory(batches=2), *safety,
            LossProgressBar(refresh_rate=every)]


@pytest.mark.parametrize("precision,accumulate", [("32-true", 1), ("16-mixed", 1), ("32-true", 2)])
def test_at_most_one_host_read_per_progress_every_steps(tmp_path, monkeypatch, precision, accumulate):
    every, steps = 4, 12 * accumulate  # steps: batches
    reads = Reads(monkeypatch)
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if precision == "16-mixed" else []
    model = build("dgl", bn=True)
    model.configure_module_steps(accumulate)
    t = trainer(max_epochs=1, enable_progress_bar=True, enable_checkpointing=True,
                callbacks=[reads, *cli_callbacks(tmp_path, every)],
                plugins=plugins)
    with open(os.devnull, "w") as null, pytest.MonkeyPatch.context() as m:
        m.setattr("sys.stderr", null)  # the bar itself
        t.fit(model, DataLoader(data(steps * 4), batch_size=4))
    assert reads.batches == steps
    reading = sorted(reads.per_batch)
    assert len(reading) <= math.ceil(steps / every), reads.per_batch
    assert reading == [every - 1 + i * every for i in range(steps // every)]  # the bar refreshes there: it does read


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_cuda_step_never_waits_for_the_device_between_reads(tmp_path, precision):
    """On CUDA, torch reports every synchronising call (sync debug mode): only the batches where the bar, the NaN
    check and the timer read may have one."""
    import warnings

    every, steps = 4, 12
    per_batch: dict[int, int] = {}

    class SyncWatch(L.Callback):
        idx = -1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.idx = batch_idx

    watch = SyncWatch()

    def record(message, *args, **kwargs):
        if "synchroniz" in str(message) and watch.idx >= 0:
            per_batch[watch.idx] = per_batch.get(watch.idx, 0) + 1

    model = build("dgl", bn=True)
    t = L.Trainer(accelerator="cuda", devices=1, precision=precision, max_steps=steps, logger=False,
                  enable_checkpointing=True, enable_model_summary=False, enable_progress_bar=False,
                  num_sanity_val_steps=0, limit_val_batches=0, callbacks=[watch, *cli_callbacks(tmp_path, every)])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            t.fit(model, DataLoader(data(steps * 4), batch_size=4, pin_memory=True))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(per_batch) <= math.ceil(steps / every), per_batch


def test_runtime_callbacks_do_not_import_the_tools():
    import subprocess
    import sys

    code = "import sys, lla.callbacks; print(sorted(m for m in sys.modules if m.startswith('lla.bench')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
