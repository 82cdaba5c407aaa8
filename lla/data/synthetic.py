"""Random but learnable images for tests: fixed class templates plus noise, deterministic from `seed`.

Templates are smooth (4x4 random colours upsampled) so that both their colour and their layout carry the class: a
tiny conv net with global pooling separates them within a few dozen steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lla.data.base import LLADataModule
from lla.data.on_device import Augment
from lla.data.tensor_set import TensorImageDataset
from lla.errors import ConfigError


def make_synthetic(
    num_classes: int, num_samples: int, num_val: int, image_size: int, noise: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val): images in [0,1], (N,3,S,S) float32, labels balanced then shuffled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = templates[y] + noise * torch.randn(n, 3, image_size, image_size, generator=g)
        return x.clamp_(0, 1), y

    x_train, y_train = draw(num_samples)
    x_val, y_val = draw(num_val)
    return x_train, y_train, x_val, y_val


class SyntheticDataModule(LLADataModule):
    """Synthetic class-template data (no files, no download). Validation = a separate draw from the same templates."""

    name = "synthetic"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    default_workers = 0

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        num_classes: int = 10,
        num_samples: int = 512,
        num_val: int = 256,
        image_size: int = 32,
        noise: float = 0.2,
        augment: bool = False,
        **kwargs,
    ):
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        for key, value, low in (("num_classes", num_classes, 2), ("num_samples", num_samples, 1),
                                ("num_val", num_val, 1), ("image_size", image_size, 8)):  # fmt: skip
            if int(value) < low:
                raise ConfigError(f"dataset.{key}", f"must be at least {low}, got {value}", f">= {low}")
        self.num_classes, self.num_samples, self.num_val = int(num_classes), int(num_samples), int(num_val)
        self.image_size, self.noise = int(image_size), float(noise)
        # optional, to exercise the crop/flip path in tests; off by default so learning stays easy
        self.augment = Augment(pad=2, pad_mode="constant", flip=True) if augment else None
        self._data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _build(self, train: bool) -> Dataset:
        if self._data is None:
            self._data = make_synthetic(
                self.num_classes, self.num_samples, self.num_val, self.image_size, self.noise, self.seed
            )
        x_train, y_train, x_val, y_val = self._data
        x, y = (x_train, y_train) if train else (x_val, y_val)
        return TensorImageDataset(x, y, self.mean, self.std, self.augment if train else None)

    def _arrays(self, dataset: Dataset, train: bool) -> tuple[Tensor, Tensor]:
        return dataset.images, dataset.labels
