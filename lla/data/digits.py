"""scikit-learn's 8x8 digits as upscaled RGB images (16x16 in conf/dataset/digits.yaml, 32x32 when built directly).

1,797 images, so a full run takes seconds on a CPU: the dataset for smoke tests and the quick start.
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


def load_digits_split(test_size: float = 0.2, random_state: int = 0, size: int = 32) -> tuple[Tensor, Tensor, Tensor,
                                                                                          Tensor]:
    """(x_train, y_train, x_test, y_test): 8x8 digits scaled to [0,1], resized to size x size (bilinear), 3 channels.

    The split is stratified and fixed (sklearn train_test_split, random_state=0): 1,437 train / 360 test.
    """
    from sklearn.datasets import load_digits  # sklearn is slow to import; only pay for it when digits is used
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0)[:, None]  # pixel values are 0..16
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_size,
        random_state=random_state,
        stratify=digits.target,
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return images[train_idx].contiguous(), labels[train_idx], images[test_idx].contiguous(), labels[test_idx]


class DigitsDataModule(LLADataModule):
    """sklearn digits, 10 classes, 32x32x3 (``image_size`` changes the side). Validation is the held-out test split
    (docs/recipes.md#test-as-validation).

    Train augmentation: random crop with zero padding 2, no flip (a mirrored 3 is not a 3). The normalisation
    statistics are the 32x32 ones at every size: bilinear resizing barely moves them, and de-normalising (InfoPro's
    target) inverts exactly whatever was applied.
    """

    name = "digits"
    num_classes = 10
    image_size = 32
    # per-pixel mean/std of the resized train split (all channels are equal); tests recompute them
    mean = (0.30538, 0.30538, 0.30538)
    std = (0.32365, 0.32365, 0.32365)
    augment = Augment(pad=2, pad_mode="constant", flip=False)
    default_workers = 0  # in memory already: worker processes would only add start-up time

    def __init__(self, root: str | None = None, batch_size: int = 64, image_size: int = 32, **kwargs):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ConfigError("dataset.image_size", f"got {image_size!r}", "an integer >= 8 (the digits are 8x8)")
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        self.image_size = image_size
        self._data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _split(self, train: bool) -> tuple[Tensor, Tensor]:
        if self._data is None:
            self._data = load_digits_split(size=self.image_size)
        x_train, y_train, x_test, y_test = self._data
        return (x_train, y_train) if train else (x_test, y_test)

    def _build(self, train: bool) -> Dataset:
        x, y = self._split(train)
        return TensorImageDataset(x, y, self.mean, self.std, self.augment if train else None)

    def _arrays(self, dataset: Dataset, train: bool) -> tuple[Tensor, Tensor]:
        return dataset.images, dataset.labels
