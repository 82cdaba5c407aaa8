"""CIFAR-10 (docs/recipes.md#cifar-recipe): 50k train / 10k test, 32x32, the test split doubles as validation (docs/recipes.md#test-as-validation).

Files: the python version, `<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`.

Reading goes through torchvision's CIFAR10, with one change: torchvision accepts the files only if their md5s
match the published ones. We replace that test with a structural one, so re-pickled copies and the tiny test
fixtures load and no md5 pass runs over 170 MB on every start. `check()` stays cheap (every file present, every
pickle ends with its STOP mark, which a cut-short file lacks); if torchvision then fails to read the batches, each
file is unpickled on its own to name the bad one. `verify_md5=true` adds the published-md5 comparison;
`download=true` uses stock torchvision (md5-checked archive).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from lla.data.base import LLADataModule
from lla.data.files import check_md5, corrupt, fetch, require_files
from lla.data.on_device import Augment
from lla.data.transforms import pil_transform

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"


class _CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10 reader, trusting `CIFAR10DataModule.check()` instead of md5s (see module docstring)."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:  # the stock one md5-checks batches.meta too
        with open(Path(self.root) / self.base_folder / META_FILE, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _check_batch(path: Path) -> None:
    """Unpickle one batch and check it is {'data': uint8 (n,3072), 'labels': n ints in 0..9} (reads it all)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as err:  # truncated pickles raise EOFError/UnpicklingError/ValueError, garbage anything
        raise corrupt(path, f"cannot unpickle: {type(err).__name__}") from err
    if not isinstance(entry, dict):
        raise corrupt(path, f"holds a {type(entry).__name__}, not a dict")
    data, labels = entry.get("data"), np.asarray(entry.get("labels", ()))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise corrupt(path, "no uint8 'data' array of shape (n, 3072)")
    if len(labels) != len(data) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise corrupt(path, f"expected {len(data)} labels in 0..9, found {len(labels)}")


def _check_ends(path: Path) -> None:
    """A complete pickle ends with the STOP opcode; a file cut short almost never does. Reads one byte."""
    with open(path, "rb") as f:
        f.seek(-1, 2)
        if f.read(1) != pickle.STOP:
            raise corrupt(path, "cut short: no end-of-pickle mark")


class CIFAR10DataModule(LLADataModule):
    """CIFAR-10 with the docs/recipes.md#cifar-recipe recipe: reflect-pad 4 + RandomCrop 32 + HFlip; val = the test split (docs/recipes.md#test-as-validation)."""

    name = "cifar10"
    num_classes = 10
    image_size = 32
    mean = (125.3 / 255, 123.0 / 255, 113.9 / 255)
    std = (63.0 / 255, 62.1 / 255, 66.7 / 255)
    augment = Augment(pad=4, pad_mode="reflect", flip=True)

    def __init__(self, root: str | None = None, batch_size: int = 1024, verify_md5: bool = False, **kwargs):
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        self.verify_md5 = bool(verify_md5)

    @property
    def folder(self) -> Path:
        return self.root / CIFAR10.base_folder

    def check(self) -> None:
        how = (
            "set dataset.download=true to fetch it (170 MB), or point dataset.root (or $LLA_DATA) at the folder "
            f"that holds {CIFAR10.base_folder}/"
        )
        paths = require_files("CIFAR-10", self.root, self.folder, [*TRAIN_FILES, *TEST_FILES, META_FILE], how)
        for path in paths[:-1]:
            _check_ends(path)
        try:  # batches.meta is tiny: read it whole
            with open(paths[-1], "rb") as f:
                names = pickle.load(f, encoding="latin1")["label_names"]
        except Exception as err:
            raise corrupt(paths[-1], f"no label_names: {type(err).__name__}") from err
        if len(names) != self.num_classes:
            raise corrupt(paths[-1], f"{len(names)} label names, expected {self.num_classes}")
        if self.verify_md5:
            check_md5(
                paths,
                {n: m for n, m in CIFAR10.train_list + CIFAR10.test_list} | {META_FILE: CIFAR10.meta["md5"]},
            )

    def _download(self) -> None:
        fetch("CIFAR-10", CIFAR10.url, lambda: CIFAR10(str(self.root), train=True, download=True))

    def _build(self, train: bool) -> Dataset:
        transform = pil_transform(self.image_size, self.mean, self.std, self.augment if train else None)
        try:
            return _CIFAR10Files(str(self.root), train=train, transform=transform)
        except Exception as err:  # a file passed check() but is not a CIFAR batch: find and name it
            for name in TRAIN_FILES if train else TEST_FILES:
                _check_batch(self.folder / name)
            raise corrupt(self.folder, f"{type(err).__name__}: {err}") from err

    def _arrays(self, dataset: Dataset, train: bool) -> tuple[Tensor, Tensor]:
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps NHWC
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)
