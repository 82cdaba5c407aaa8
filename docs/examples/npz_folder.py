"""A dataset stored as two NumPy archives, ``<root>/train.npz`` and ``<root>/test.npz``.

A worked example for docs/guides/add-a-dataset.md. Each archive holds ``images`` (N, H, W, 3) uint8 and ``labels``
(N,) integers. Saved as ``lla/data/npz_folder.py`` (and exported from ``lla/data/__init__.py``) it is a complete lla
dataset; the docs test writes small archives and trains on them through the real engine.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lla.data.base import LLADataModule
from lla.data.on_device import Augment
from lla.data.tensor_set import TensorImageDataset
from lla.errors import ConfigError


class NpzFolderDataModule(LLADataModule):
    """Images and labels from ``train.npz`` / ``test.npz``; the test split doubles as validation, as everywhere."""

    name = "npz_folder"
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    augment = Augment(pad=2, pad_mode="constant", flip=True)  # the train-time crop + flip
    default_workers = 0  # the arrays live in memory: worker processes would only add start-up time

    def __init__(self, root: str | None = None, batch_size: int = 64, num_classes: int = 10,
                 image_size: int = 32, **kwargs):
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        self.num_classes, self.image_size = int(num_classes), int(image_size)
        self._cache: dict[bool, tuple[Tensor, Tensor]] = {}

    def _file(self, train: bool):
        return self.root / ("train.npz" if train else "test.npz")

    def check(self) -> None:
        """Missing or malformed archives stop the run with one line that names the file."""
        for train in (True, False):
            path = self._file(train)
            if not path.is_file():
                raise ConfigError("dataset.root", f"{path} not found", "a folder with train.npz and test.npz")
            with np.load(path) as f:
                if "images" not in f or "labels" not in f:
                    raise ConfigError("dataset.root", f"{path} lacks 'images' or 'labels'", "both arrays")
                shape = f["images"].shape
            if len(shape) != 4 or shape[1:] != (self.image_size, self.image_size, 3):
                raise ConfigError("dataset.image_size", f"{path} holds images of shape {shape[1:]}",
                                  f"(H, W, 3) with H = W = {self.image_size}")

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        if train not in self._cache:
            with np.load(self._file(train)) as f:
                images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, uint8
                labels = torch.from_numpy(f["labels"].astype(np.int64))
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ConfigError("dataset.num_classes", f"labels run from {int(labels.min())} to "
                                  f"{int(labels.max())}", f"0..{self.num_classes - 1}")
            self._cache[train] = (images, labels)
        return self._cache[train]

    def _build(self, train: bool) -> Dataset:
        images, labels = self._load(train)
        return TensorImageDataset(images, labels, self.mean, self.std, self.augment if train else None)

    def _arrays(self, dataset: Dataset, train: bool) -> tuple[Tensor, Tensor]:
        return dataset.images, dataset.labels  # what dataset.on_device=true keeps on the accelerator
