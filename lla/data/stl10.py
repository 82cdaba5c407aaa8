"""STL-10 (docs/recipes.md#cifar-recipe): the 5,000 labelled train images / 8,000 test, 96x96, val = the test split (docs/recipes.md#test-as-validation).

10 classes. The reference scripts build 100-way heads for STL-10 because of a `'sl10'` typo (docs/reference-code.md#stl10-classes); we do not.

Files: `<root>/stl10_binary/{train,test}_{X,y}.bin`. torchvision's STL10 insists on md5-checking all of them plus
the 2.7 GB `unlabeled_X.bin`, which supervised training never reads. We replace that test with `check()`: file
sizes must be whole images and match the label count, and labels must be 1..10. `verify_md5=true` adds the
published-md5 comparison for the four files we use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import STL10

from lla.data.base import LLADataModule
from lla.data.files import check_md5, corrupt, fetch, require_files
from lla.data.on_device import Augment
from lla.data.transforms import pil_transform

IMAGE_BYTES = 3 * 96 * 96
SPLIT_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}


class _STL10Files(STL10):
    """torchvision's STL10 reader, trusting `STL10DataModule.check()` instead of md5s (see module docstring)."""

    def _check_integrity(self) -> bool:
        return True


def _check_pair(x_path: Path, y_path: Path, num_classes: int) -> None:
    """Whole 96x96x3 images, one label (1..num_classes) per image."""
    size = x_path.stat().st_size
    if size % IMAGE_BYTES:
        raise corrupt(x_path, f"{size} bytes is not a whole number of {IMAGE_BYTES}-byte images")
    labels = np.fromfile(y_path, dtype=np.uint8)
    if len(labels) != size // IMAGE_BYTES:
        short = x_path if size // IMAGE_BYTES < len(labels) else y_path
        raise corrupt(
            short, f"{size // IMAGE_BYTES} images in {x_path.name} but {len(labels)} labels in {y_path.name}"
        )
    if labels.min() < 1 or labels.max() > num_classes:
        raise corrupt(y_path, f"labels must be 1..{num_classes}, found {labels.min()}..{labels.max()}")


class STL10DataModule(LLADataModule):
    """STL-10, 10 classes, RandomCrop(96, padding=4) + HFlip, 0.5/0.5 normalisation; val = the test split."""

    name = "stl10"
    num_classes = 10
    image_size = 96
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    augment = Augment(pad=4, pad_mode="constant", flip=True)

    def __init__(self, root: str | None = None, batch_size: int = 128, verify_md5: bool = False, **kwargs):
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        self.verify_md5 = bool(verify_md5)

    @property
    def folder(self) -> Path:
        return self.root / STL10.base_folder

    def check(self) -> None:
        how = (
            "set dataset.download=true to fetch it (2.6 GB archive), or point dataset.root (or $LLA_DATA) at the "
            f"folder that holds {STL10.base_folder}/"
        )
        names = [n for pair in SPLIT_FILES.values() for n in pair]
        paths = require_files("STL-10", self.root, self.folder, names, how)
        for x_path, y_path in zip(paths[::2], paths[1::2]):
            _check_pair(x_path, y_path, self.num_classes)
        if self.verify_md5:
            check_md5(paths, dict(STL10.train_list + STL10.test_list))

    def _download(self) -> None:
        fetch("STL-10", STL10.url, lambda: STL10(str(self.root), split="test", download=True))

    def _build(self, train: bool) -> Dataset:
        transform = pil_transform(self.image_size, self.mean, self.std, self.augment if train else None)
        return _STL10Files(str(self.root), split="train" if train else "test", transform=transform)

    def _arrays(self, dataset: Dataset, train: bool) -> tuple[Tensor, Tensor]:
        # torchvision stores (N,3,96,96) as a transposed view of the column-major file: copy once, contiguous
        images = torch.from_numpy(np.ascontiguousarray(dataset.data))
        return images, torch.from_numpy(dataset.labels.astype(np.int64))
