"""The DataModule interface every dataset implements, and the plumbing they share.

Construction is cheap and touches no files, so a whole config can be validated (and rejected with a one-line
ConfigError) before any data loads. Files are checked by `check()` at the start of `setup()`.

Validation data is the **test split**: every reference script (InfoPro, DGL, AugLocal, MAN, MLAAN) evaluates on the
test set each epoch and reports the best epoch (docs/recipes.md#test-as-validation). `val_dataloader()` and `test_dataloader()`
therefore return the same split; we say so rather than hide it.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lla.data.on_device import Augment, DeviceLoader
from lla.errors import ConfigError


def default_root() -> str:
    """`$LLA_DATA`, else ./data — the same default the YAML files spell as ${oc.env:LLA_DATA,./data}."""
    return os.environ.get("LLA_DATA", "./data")


def default_num_workers() -> int:
    """min(8, usable CPUs): the reference scripts use 8 workers; fewer cores than that gain nothing from more."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cpus = os.cpu_count() or 1
    return min(8, cpus)


class LLADataModule(L.LightningDataModule):
    """Base class: batches are `(x, y)`, x float (N,C,H,W) normalised with `mean`/`std`, y int64 (N,).

    `val_dataloader()` is the **test split** (docs/recipes.md#test-as-validation); `test_dataloader()` is the same split.
    `denormalize(x)` gives back the [0,1] image that InfoPro's decoder reconstructs.
    """

    name: str = ""
    num_classes: int
    image_size: int
    in_channels: int = 3
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: Augment | None = None  # the train-time crop/flip, shared by both loader paths
    supports_on_device: bool = True
    default_workers: int | None = None  # None = min(8, CPUs); in-memory datasets use 0

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool | None = None,
        download: bool = False,
        on_device: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.root = Path(root if root is not None else default_root()).expanduser()
        self.batch_size = _positive("dataset.batch_size", batch_size)
        self.eval_batch_size = _positive("dataset.eval_batch_size", eval_batch_size or batch_size)
        if num_workers is None:
            num_workers = self.default_workers if self.default_workers is not None else default_num_workers()
        if num_workers < 0:
            raise ConfigError(
                "dataset.num_workers",
                f"must be >= 0, got {num_workers}",
                "0 (load in the main process) or more",
            )
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = (
            self.num_workers > 0 if persistent_workers is None else bool(persistent_workers)
        )
        self.download = bool(download)
        self.on_device = bool(on_device)
        if self.on_device and not self.supports_on_device:
            raise ConfigError("dataset.on_device", f"{self.name} does not fit in accelerator memory", "false")
        self.seed = int(seed)
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.device: torch.device | str | None = None  # on_device target when there is no Trainer to ask
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    # ---- what subclasses provide ------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ConfigError if the files are missing (how to get them) or broken (which file). Cheap: no image decoding."""

    def _download(self) -> None:
        """Fetch the files (only called when download=true, on one process per node). Default: nothing to fetch."""

    def _build(self, train: bool) -> Dataset:
        """The split as a map-style Dataset yielding (normalised tensor, int label), with train augmentation."""
        raise NotImplementedError

    def _arrays(self, dataset: Dataset, train: bool) -> tuple[Tensor, Tensor]:
        """The split's raw images (N,C,H,W) uint8 or float in [0,1], and labels (N,), for the on-device loader."""
        raise NotImplementedError

    # ---- Lightning hooks ----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            self._download()

    def setup(self, stage: str | None = None) -> None:
        self.check()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build(train=True)
        if self.test_set is None:
            self.test_set = self._build(train=False)

    def train_dataloader(self):
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        """The test split (the papers validate on it, docs/recipes.md#test-as-validation)."""
        return self._loader(self.test_set, train=False)

    def test_dataloader(self):
        return self._loader(self.test_set, train=False)

    # ---- helpers --------------------------------------------------------------------------------------------------
    def denormalize(self, x: Tensor) -> Tensor:
        """x*std+mean: the [0,1] image (N,C,H,W) behind a normalised batch, on x's device. Not clamped: it is the
        exact inverse, so a test image comes back to its pixels (up to float rounding)."""
        mean, std = self._stat_tensors(x)
        return x * std + mean

    def normalize(self, x01: Tensor) -> Tensor:
        """(x01-mean)/std, the inverse of `denormalize`."""
        mean, std = self._stat_tensors(x01)
        return (x01 - mean) / std

    def _stat_tensors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # cached per device/dtype: building them each step would be a host-to-device copy per call
        key = (x.device, x.dtype)
        if key not in self._stats:
            shape = (1, -1, 1, 1)
            self._stats[key] = (
                torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(shape),
                torch.tensor(self.std, device=x.device, dtype=x.dtype).view(shape),
            )
        return self._stats[key]

    def _target_device(self) -> torch.device:
        """Where on-device loaders put the data: `self.device` if set, else the Trainer's device, else the CPU."""
        if self.device is not None:
            return torch.device(self.device)
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, dataset: Dataset | None, train: bool):
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.on_device:
            return self._device_loader(dataset, train, batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            # pinning only helps CUDA copies; without CUDA torch warns and ignores it
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def _device_loader(self, dataset: Dataset, train: bool, batch_size: int) -> DeviceLoader:
        images, labels = self._arrays(dataset, train)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # evaluation: each rank sees the whole split (DDP metrics are then equal, not wrong)
        if not train:
            rank, world = 0, 1
        return DeviceLoader(
            images, labels, batch_size, self.mean, self.std,
            augment=self.augment if train else None, shuffle=train, seed=self.seed,
            device=self._target_device(), rank=rank, world=world,
        )  # fmt: skip

    def __str__(self) -> str:  # Lightning's lists the (not yet built) dataloaders
        return repr(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, batch_size={self.batch_size}, on_device={self.on_device})"


def _positive(key: str, value: int) -> int:
    if int(value) < 1:
        raise ConfigError(key, f"must be a positive integer, got {value}", ">= 1")
    return int(value)
