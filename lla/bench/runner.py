"""Run one benchmark configuration: real training steps of the engine, timed, then one step measured.

The model is built exactly as ``lla-train`` builds it (the Hydra config composed from ``conf/``, then
:func:`lla.build.build`) and trained by a Lightning Trainer, so every figure is the engine's own ``training_step``:

* steps ``0..warmup-1``: warm-up (allocator, optimizer state, autotuning), not measured;
* the next ``steps`` steps: timed WITHOUT hooks (median wall time; CUDA peaks reset before each step). On CUDA
  each step is bracketed by two CUDA events and the host waits once, after the last timed step: nothing inside
  or between the timed steps synchronises, so the figures include no artificial stalls;
* one last step: saved-tensor and gradient hooks on (:class:`TrainingMemoryMeter`), split into one segment per
  local loss by wrapping ``forward_module``/``backward_local`` on the instance for that step only.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lla.bench import accounting as acc
from lla.bench.memory import TrainingMemoryMeter
from lla.errors import ConfigError

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class MethodUnavailable(Exception):
    """The method's config or class is not in this checkout (yet): the row is skipped with a note."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark row: what to build and how to feed it."""

    method: str
    backbone: str
    k: int
    batch_size: int
    image_size: int
    options: tuple[tuple[str, Any], ...] = ()  # method options, e.g. (("base", "infopro"),); dotted: any key
    precision: str = "32-true"
    channels_last: bool = False
    num_classes: int | None = None  # None: 1000 for ImageNet backbones, 10 otherwise

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.method}({opts})" if opts else self.method

    def describe(self) -> str:
        extra = "".join([f" {self.precision}" if self.precision != "32-true" else "",
                         " channels_last" if self.channels_last else ""])
        return f"{self.backbone} K={self.k} {self.label} b{self.batch_size} {self.image_size}px{extra}"


@dataclass
class Probe:
    """What one Trainer run measured (filled by :class:`_BenchCallback`)."""

    times: list[float] = field(default_factory=list)
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None
    meter: TrainingMemoryMeter | None = None
    optimizer_bytes: int = 0
    param_bytes: int = 0


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def compose_overrides(cfg: BenchConfig, num_classes: int) -> list[str]:
    """The ``lla-train`` overrides that build this row's model (synthetic data: no files, any image size)."""
    out = [f"method={cfg.method}", f"backbone={cfg.backbone}", f"k={cfg.k}", "dataset=synthetic", "logger=none",
           f"dataset.image_size={cfg.image_size}", f"dataset.num_classes={num_classes}",
           f"dataset.batch_size={cfg.batch_size}", f"trainer.precision={cfg.precision}"]
    # A dotted option is a full config path (``backbone.fused_bn_relu``); a bare one is a method option.
    out += [f"{k if '.' in k else 'method.' + k}={_override_value(v)}" for k, v in cfg.options]
    return out


def default_num_classes(backbone: str) -> int:
    """10 for the CIFAR ResNets, 1000 for the ImageNet nets (ResNets, ResNeXt, VGG-13)."""
    from lla.backbones import BACKBONES

    if backbone not in BACKBONES:
        raise ConfigError("backbone", f"unknown backbone {backbone!r}", ", ".join(sorted(BACKBONES)))
    return 10 if BACKBONES[backbone].__module__.endswith("cifar_resnet") else 1000


def build_model(cfg: BenchConfig):
    """(model, datamodule) exactly as the training CLI builds them; MethodUnavailable if the method is absent."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from lla.build import CONF_DIR, build

    if not (Path(CONF_DIR) / "method" / f"{cfg.method}.yaml").is_file():
        raise MethodUnavailable(f"no conf/method/{cfg.method}.yaml in this checkout")
    num_classes = cfg.num_classes or default_num_classes(cfg.backbone)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            conf = compose(config_name="config", overrides=compose_overrides(cfg, num_classes))
    except MissingConfigException as err:
        raise ConfigError("backbone", str(err).splitlines()[0], "a file in conf/backbone") from None
    try:
        dm, model = build(conf, {"method": cfg.method, "backbone": cfg.backbone})
    except ConfigError as err:
        if err.key.endswith("_target_"):  # the YAML exists but its class does not (yet)
            raise MethodUnavailable(str(err)) from None
        raise
    return model, dm


def make_batch(dm, batch_size: int, image_size: int, num_classes: int, device: torch.device, seed: int = 0):
    """A normalised random batch whose de-normalised image lies in [0, 1] (InfoPro's BCE target)."""
    g = torch.Generator().manual_seed(seed)
    x01 = torch.rand(batch_size, 3, image_size, image_size, generator=g)
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    x = ((x01 - mean) / std).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    return x, y


class _Repeat(torch.utils.data.Dataset):
    """The same pre-built batch ``n`` times (already on the device, memory format kept: no collation)."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.batch


def _callback_class():
    import lightning as L

    class _BenchCallback(L.Callback):
        """Times steps [warmup, warmup+steps) without hooks, then meters step warmup+steps."""

        def __init__(self, probe: Probe, warmup: int, steps: int, explain: bool = False):
            self.probe, self.warmup, self.steps, self.explain = probe, warmup, steps, explain
            self._t0 = 0.0
            self._events: list[list[torch.cuda.Event]] = []  # CUDA: (start, end) per timed step, read once

        def _timed(self, i: int) -> bool:
            return self.warmup <= i < self.warmup + self.steps

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            dev = pl_module.device
            if self._timed(batch_idx):
                if dev.type == "cuda":  # an event in the stream: nothing waits for the device here
                    torch.cuda.reset_peak_memory_stats(dev)  # host-side allocator counters, no sync
                    self._events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
                    self._events[-1][0].record()
                else:
                    self._t0 = time.perf_counter()
            elif batch_idx == self.warmup + self.steps:
                self._start_meter(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            dev = pl_module.device
            if self._timed(batch_idx):
                if dev.type == "cuda":
                    self._events[-1][1].record()
                    alloc, res = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
                    self.probe.cuda_allocated = max(self.probe.cuda_allocated or 0, alloc)
                    self.probe.cuda_reserved = max(self.probe.cuda_reserved or 0, res)
                    if batch_idx == self.warmup + self.steps - 1:  # after the last timed step, outside any step
                        self._events[-1][1].synchronize()
                        self.probe.times = [a.elapsed_time(b) / 1000 for a, b in self._events]
                else:
                    self.probe.times.append(time.perf_counter() - self._t0)
            elif batch_idx == self.warmup + self.steps:
                self._stop_meter(trainer, pl_module)

        def _start_meter(self, model) -> None:
            weights = [*model.parameters(), *model.buffers()]
            meter = TrainingMemoryMeter(exclude=weights, params=model.parameters(), record_peak=self.explain)
            forward_module, backward_local = model.forward_module, model.backward_local

            def metered_forward(k, x):
                if not meter.in_segment:  # a method may run earlier modules again inside one segment
                    meter.begin_segment(k)
                return forward_module(k, x)

            def metered_backward(k, loss):
                backward_local(k, loss)
                meter.end_segment()

            # Instance attributes shadow the methods for this one step; the engine itself is untouched.
            object.__setattr__(model, "forward_module", metered_forward)
            object.__setattr__(model, "backward_local", metered_backward)
            self.probe.meter = meter.__enter__()

        def _stop_meter(self, trainer, model) -> None:
            self.probe.meter.__exit__(None, None, None)
            object.__delattr__(model, "forward_module")
            object.__delattr__(model, "backward_local")
            self.probe.param_bytes = acc.parameter_bytes(model)
            self.probe.optimizer_bytes = acc.optimizer_state_bytes(trainer.optimizers[0])

    return _BenchCallback


def _quiet() -> None:
    from lla.build import quiet_lightning

    quiet_lightning()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*max_epochs.*")
    warnings.filterwarnings("ignore", message=".*Precision.*")
    warnings.filterwarnings("ignore", message=".*bf16.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.getLogger("hydra.utils").setLevel(logging.CRITICAL)  # lla.config probes get_class before get_method


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError("device", f"unknown device {device!r}", "auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA is not available on this machine", "auto, cpu")
    return torch.device(device)


def check_config(cfg: BenchConfig, device: torch.device) -> None:
    if cfg.precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown precision {cfg.precision!r}", ", ".join(PRECISIONS))
    if cfg.precision == "16-mixed" and device.type != "cuda":  # Lightning would quietly run bf16 instead
        raise ConfigError("precision", "16-mixed (fp16 AMP) needs a CUDA device", "32-true, bf16-mixed")
    for key, value in (("batch_size", cfg.batch_size), ("image_size", cfg.image_size), ("k", cfg.k)):
        if int(value) < 1:
            raise ConfigError(key, f"must be a positive integer, got {value}", ">= 1")


def run_config(cfg: BenchConfig, steps: int = 3, warmup: int = 1, device: str | torch.device = "auto",
               seed: int = 0, explain: bool = False) -> dict[str, Any]:
    """Train ``warmup + steps + 1`` real steps of ``cfg`` and return its measured row (no E2E ratios yet).

    ``explain``: also return, under ``"_explain"``, what was alive at the activation peak (see :func:`explain`).
    """
    import lightning as L
    from torch.utils.data import DataLoader

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    check_config(cfg, dev)
    if steps < 1 or warmup < 0:
        raise ConfigError("steps", f"need >= 1 timed step and >= 0 warm-up steps, got {steps} and {warmup}",
                          "steps >= 1, warmup >= 0")
    _quiet()
    L.seed_everything(seed, verbose=False)
    model, dm = build_model(cfg)
    if cfg.channels_last:  # the training option's own path: NHWC weights, batches converted on transfer
        model.use_channels_last()
    batch = make_batch(dm, cfg.batch_size, cfg.image_size, model.num_classes, dev, seed)
    total = warmup + steps + 1
    loader = DataLoader(_Repeat(batch, total), batch_size=None, shuffle=False)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cuda" if dev.type == "cuda" else "cpu", devices=1, precision=cfg.precision,
        max_steps=total, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, benchmark=dev.type == "cuda",
        callbacks=[_callback_class()(probe, warmup, steps, explain)])
    try:
        trainer.fit(model, train_dataloaders=loader)
    finally:  # a method that crashes mid-step must not leave global saved-tensor hooks behind for the next row
        meter = probe.meter
        if meter is not None and meter.active:
            meter.__exit__(None, None, None)
        for name in ("forward_module", "backward_local"):
            if name in vars(model):
                object.__delattr__(model, name)
    if probe.meter is None or len(probe.times) < steps:
        raise RuntimeError(f"{cfg.describe()}: the Trainer stopped after {trainer.global_step} of {total} steps")
    row = measured_row(cfg, model, probe, dev, warmup)
    if explain:
        row["_explain"] = summarize_peak(probe.meter.peak_composition)
    return row


def summarize_peak(composition: list[tuple[int, tuple[int, ...], str]], top: int = 12) -> list[str]:
    """The saved tensors alive at the activation peak, grouped by (shape, dtype), largest first."""
    groups: dict[tuple, list[int]] = {}
    for nbytes, shape, dtype in composition:
        g = groups.setdefault((shape, dtype), [0, 0])
        g[0] += 1
        g[1] += nbytes
    items = sorted(groups.items(), key=lambda kv: -kv[1][1])
    lines = [f"{n:4d} x {dtype:9s} {str(list(shape)):24s} {b / 2**20:8.2f} MiB" for (shape, dtype), (n, b) in items[:top]]
    rest = sum(b for _, (_, b) in items[top:])
    if rest:
        lines.append(f"     ... {len(items) - top} more shapes, {rest / 2**20:.2f} MiB")
    return lines


def measured_row(cfg: BenchConfig, model, probe: Probe, dev: torch.device, warmup: int) -> dict[str, Any]:
    """The row's own figures (schema: lla.bench.report.ROW_KEYS); ratios are filled in across rows later."""
    meter = probe.meter
    segs = meter.segments
    module_grads = acc.module_grad_bytes(model)
    spans = [model.span(k) for k in range(model.num_modules)]
    largest_act = max((s.activation_bytes for s in segs), default=meter.peak_bytes)
    step = statistics.median(probe.times)
    describe = model.describe()
    return {
        "method": cfg.method,
        "base": getattr(model, "base", None) if isinstance(getattr(model, "base", None), str) else None,
        "options": dict(cfg.options),
        "backbone": cfg.backbone,
        "k": cfg.k,
        "modules": model.num_modules,
        "boundaries": list(describe.get("boundaries", [])),
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "num_classes": model.num_classes,
        "precision": cfg.precision,
        "channels_last": cfg.channels_last,
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "param_bytes": probe.param_bytes,
        "optimizer_state_bytes": probe.optimizer_bytes,
        "peak_activation_bytes": meter.peak_bytes,
        "peak_grad_bytes": meter.peak_grad_bytes,
        "largest_span_grad_bytes": acc.largest_span_grad_bytes(module_grads, spans),
        "peak_total_bytes": acc.peak_total_bytes(probe.param_bytes, probe.optimizer_bytes, meter.peak_total_bytes),
        "largest_module_activation_bytes": largest_act,
        "lower_bound_bytes": acc.lower_bound_bytes(probe.param_bytes, probe.optimizer_bytes, largest_act),
        "carried_activation_bytes": max((s.carried_activation_bytes for s in segs), default=0),
        "carried_grad_bytes": max((s.carried_grad_bytes for s in segs), default=0),
        "segments": len(segs),
        "cuda_max_allocated_bytes": probe.cuda_allocated,
        "cuda_max_reserved_bytes": probe.cuda_reserved,
        "step_time_s": step,
        "images_per_s": cfg.batch_size / step if step > 0 else None,
        "timed_steps": len(probe.times),
        "warmup_steps": warmup,
    }
