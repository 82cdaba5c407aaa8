"""Callbacks that measure what a researcher compares: step time, throughput and activation memory."""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch

from lla.bench.memory import SavedTensorMeter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Median wall time of a training step after ``warmup`` steps, plus images/s; also peak CUDA memory.

    Synchronises the device around each step (only when it is CUDA), so it measures the step, not the launch.
    """

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.times: list[float] = []
        self.images = 0
        self._t0 = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync(pl_module.device)
        self._seen += 1
        if self._seen > self.warmup:
            self.times.append(time.perf_counter() - self._t0)
            self.images += int(batch[0].shape[0])

    def on_train_epoch_end(self, trainer, pl_module):
        if self.times:
            pl_module.log("perf/step_time_s", self.step_time_s, on_epoch=True)
            pl_module.log("perf/images_per_s", self.images_per_s, on_epoch=True)
        if pl_module.device.type == "cuda":
            pl_module.log("perf/cuda_max_allocated_mb", torch.cuda.max_memory_allocated(pl_module.device) / 2**20,
                          on_epoch=True)

    @property
    def step_time_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def images_per_s(self) -> float | None:
        return self.images / sum(self.times) if self.times else None


class ActivationMemory(L.Callback):
    """Peak bytes saved for backward during the first ``batches`` training steps (device-independent)."""

    def __init__(self, batches: int = 2):
        self.batches = batches
        self.peak_bytes = 0
        self._meter: SavedTensorMeter | None = None
        self._done = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._done < self.batches:
            exclude = list(pl_module.parameters()) + list(pl_module.buffers())
            self._meter = SavedTensorMeter(exclude=exclude).__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self.peak_bytes = max(self.peak_bytes, self._meter.peak_bytes)
            self._meter = None
            self._done += 1

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
