"""SVHN (docs/recipes.md#cifar-recipe): `train` (73,257) / `test` (26,032), 32x32; val = the test split (docs/recipes.md#test-as-validation).

The references do not use `extra` (531,131 more images); `svhn_extra=true` adds it to the training set.
Augmentation is RandomCrop(32, padding=2) with zero padding and **no flip** (docs/reference-code.md#stl10-classes: digits are not mirror-symmetric).

Files: `<root>/svhn/{train,test,extra}_32x32.mat` (a subfolder, so SVHN's loose files do not litter the shared data
root). torchvision's SVHN md5-checks each file before reading; we replace that with `check()` (the .mat header must
declare X (32,32,3,N) and y (N,1)) plus naming the file if scipy then fails to read it. Labels come out 0..9
(torchvision maps the file's 10 to 0). `verify_md5=true` adds the published-md5 comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset
from torchvision.datasets import SVHN
from torchvision.datasets.utils import download_url

from lla.data.base import LLADataModule
from lla.data.files import check_md5, corrupt, fetch, require_files
from lla.data.on_device import Augment
from lla.data.transforms import pil_transform

FOLDER = "svhn"


class _SVHNFiles(SVHN):
    """torchvision's SVHN reader, trusting `SVHNDataModule.check()` instead of md5s (see module docstring)."""

    def _check_integrity(self) -> bool:
        return True


def _check_header(path: Path) -> None:
    """The .mat header must declare X as (32,32,3,N) and y as (N,1); reading the header does not decode the data."""
    import scipy.io

    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(str(path))}
    except Exception as err:  # scipy raises ValueError/OSError/IndexError/MatReadError on broken headers
        raise corrupt(path, f"unreadable .mat header: {type(err).__name__}") from err
    x, y = shapes.get("X"), shapes.get("y")
    if x is None or y is None or tuple(x[:3]) != (32, 32, 3) or tuple(y) != (x[3], 1):
        raise corrupt(path, f"expected X (32,32,3,N) and y (N,1), found {shapes}")


class SVHNDataModule(LLADataModule):
    """SVHN, 10 classes, RandomCrop(32, padding=2) zero-padded, no flip, 0.5/0.5 normalisation."""

    name = "svhn"
    num_classes = 10
    image_size = 32
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    augment = Augment(pad=2, pad_mode="constant", flip=False)

    def __init__(
        self, root: str | None = None, batch_size: int = 1024, svhn_extra: bool = False, verify_md5: bool = False,
        **kwargs,
    ):  # fmt: skip
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        self.svhn_extra, self.verify_md5 = bool(svhn_extra), bool(verify_md5)

    @property
    def folder(self) -> Path:
        return self.root / FOLDER

    def _splits(self) -> list[str]:
        return ["train", "test"] + (["extra"] if self.svhn_extra else [])

    def check(self) -> None:
        how = (
            "set dataset.download=true to fetch it (train 182 MB, test 64 MB, extra 1.3 GB), or point dataset.root "
            f"(or $LLA_DATA) at the folder whose {FOLDER}/ subfolder holds the .mat files"
        )
        names = [SVHN.split_list[s][1] for s in self._splits()]
        paths = require_files("SVHN", self.root, self.folder, names, how)
        for path in paths:
            _check_header(path)
        if self.verify_md5:
            check_md5(paths, {name: md5 for _, name, md5 in SVHN.split_list.values()})

    def _download(self) -> None:
        for split in self._splits():
            url, filename, md5 = SVHN.split_list[split]
            # torchvision's own fetcher: skips a file whose md5 already matches, checks the md5 after download
            fetch(
                f"SVHN {split}", url, lambda u=url, f=filename, m=md5: download_url(u, str(self.folder), f, m)
            )

    def _load(self, split: str, transform) -> SVHN:
        try:
            return _SVHNFiles(str(self.folder), split=split, transform=transform)
        except Exception as err:  # the header was fine but the body is not (e.g. cut short)
            raise corrupt(self.folder / SVHN.split_list[split][1], f"{type(err).__name__}: {err}") from err

    def _build(self, train: bool) -> Dataset:
        transform = pil_transform(self.image_size, self.mean, self.std, self.augment if train else None)
        if not train:
            return self._load("test", transform)
        parts = [self._load(s, transform) for s in self._splits() if s != "test"]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def _arrays(self, dataset: Dataset, train: bool) -> tuple[Tensor, Tensor]:
        parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        images = torch.from_numpy(np.concatenate([p.data for p in parts]))  # (N,3,32,32), contiguous copy
        labels = torch.from_numpy(np.concatenate([p.labels for p in parts]).astype(np.int64))
        return images, labels
