"""Callbacks that measure what a researcher compares: step time, throughput and activation memory."""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from lla.memory import SavedTensorMeter


class StepTimer(L.Callback):
    """Median time of a training step after ``warmup`` steps, plus images/s; also peak CUDA memory.

    On CUDA each step is timed with a pair of CUDA events, so the host never waits for the device inside a step:
    the events of ``read_every`` steps are read together (one sync per ``read_every`` steps, and one at each epoch
    end); an event pair measures the step on the device's timeline, launch included. Elsewhere it reads the host
    clock. Logged per epoch (that epoch's steps; CUDA peak since the epoch began); the properties cover the whole run.
    """

    def __init__(self, warmup: int = 2, read_every: int = 10):
        self.warmup = warmup
        self.read_every = max(1, int(read_every))
        self.times: list[float] = []
        self.images = 0
        self._t0 = 0.0
        self._start: torch.cuda.Event | None = None
        self._unread: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # CUDA steps not read yet
        self._seen = 0
        self._epoch_first = 0  # index into self.times of this epoch's first timed step
        self._epoch_images = 0
        self.peak_cuda_mb: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._read()
        self._epoch_first = len(self.times)
        self._epoch_images = self.images
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seen += 1
        timed = self._seen > self.warmup
        if self._start is not None:
            if timed:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._unread.append((self._start, end, int(batch[0].shape[0])))
            self._start = None
            if len(self._unread) >= self.read_every:
                self._read()
        elif timed:
            self.times.append(time.perf_counter() - self._t0)
            self.images += int(batch[0].shape[0])

    def _read(self) -> None:
        """Turn the recorded CUDA events into step times: one wait, for the last of them."""
        if not self._unread:
            return
        self._unread[-1][1].synchronize()
        for start, end, images in self._unread:
            self.times.append(start.elapsed_time(end) / 1000.0)
            self.images += images
        self._unread.clear()

    def on_train_epoch_end(self, trainer, pl_module):
        self._read()
        epoch = self.times[self._epoch_first:]
        if epoch:
            pl_module.log("perf/step_time_s", statistics.median(epoch), on_epoch=True)
            pl_module.log("perf/images_per_s", (self.images - self._epoch_images) / sum(epoch), on_epoch=True)
        if pl_module.device.type == "cuda":
            mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            self.peak_cuda_mb = max(self.peak_cuda_mb or 0.0, mb)
            pl_module.log("perf/cuda_max_allocated_mb", mb, on_epoch=True)

    def on_train_end(self, trainer, pl_module):
        self._read()

    def on_exception(self, trainer, pl_module, exception):
        self._read()

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

    def on_train_epoch_end(self, trainer, pl_module):
        if self.peak_bytes:  # measured in the first epoch; logged every epoch so each W&B epoch row has it
            pl_module.log("perf/peak_activation_mb", self.peak_mb, on_epoch=True)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


class LossProgressBar(TQDMProgressBar):
    """The progress bar, showing ``train/loss`` read once per refresh (``refresh_rate`` steps).

    The engine logs ``train/loss`` without ``prog_bar``: Lightning turns progress-bar metrics into Python floats after
    every batch, a host sync per step. Here the logged tensor becomes a float only when the bar redraws."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            metrics["train/loss"] = f"{loss.item():.3g}"
        return metrics
