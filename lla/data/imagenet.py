"""ImageNet (docs/recipes.md#imagenet-recipes) from the standard class-folder layout: `<root>/train/<wnid>/*.JPEG`, same for val/.

ILSVRC ships val/ as 50,000 loose files; it must be sorted into class folders first (e.g. with the widely used
`valprep.sh`). Validation is that val split, as in every reference script. There is no download: the archive needs
an account at image-net.org.

Two loaders (`dataset.loader`):

* `torchvision` (default): PIL decodes in DataLoader workers, which ship **uint8** batches (4x fewer bytes to pin
  and copy than float32); the float conversion and normalisation run on the device after the transfer
  (`on_after_batch_transfer`), giving the same numbers as ToTensor + Normalize on the CPU.
* `dali`: NVIDIA DALI decodes on the GPU (`pip install 'lla[dali]'`), see lla/data/dali.py.

Corrupt JPEGs are found when they are read (checking 1.28M files up front would take longer than an epoch). The
torchvision loader skips such a file: its batch is one image short, and one warning line names the file (once per
worker process that meets it), so a long run survives one bad file but is told which one.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from lla.data.base import LLADataModule
from lla.data.files import corrupt, missing
from lla.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOADERS = ("torchvision", "dali")

# The DataModule's on_after_batch_transfer runs instead of the LightningModule's (Lightning calls one of the two);
# ours calls the model's itself, so Lightning's warning about the override does not apply here.
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in both.*")


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but a broken image becomes an error that names the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # convert() forces the full decode, so truncation surfaces here
    # PIL raises SyntaxError on some bad headers
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise corrupt(path, f"{type(err).__name__}: {err}", fix="replace or delete it") from err


class SkipCorrupt(ImageFolder):
    """ImageFolder that yields None for an image that cannot be decoded, after one warning line naming it.

    `collate_skipping` drops the None, so the batch is one image short and training goes on. Each process warns
    once per file (a DataLoader worker is a process: a file met by two workers is reported twice).
    """

    reported: set[str] = set()

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except ConfigError as err:
            path = self.samples[index][0]
            if path not in SkipCorrupt.reported:
                SkipCorrupt.reported.add(path)
                print(f"warning: skipping corrupt image: {err.problem.split('; ')[0]}", file=sys.stderr,
                      flush=True)
            return None


def collate_skipping(samples: list):
    """default_collate without the None entries of corrupt images."""
    kept = [s for s in samples if s is not None]
    if not kept:  # a whole batch of corrupt files: an empty batch of the right layout would still break a step
        raise ConfigError("dataset.root", f"every image of a batch of {len(samples)} is corrupt (see the warnings)")
    return default_collate(kept)


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))


def train_transform(size: int = 224) -> T.Compose:
    """RandomResizedCrop + HFlip (docs/recipes.md#imagenet-recipes, identical in all four repos), as uint8 CHW: normalised on the device."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])


def val_transform(size: int = 224, resize: int = 256) -> T.Compose:
    """Resize 256 + CenterCrop 224, as uint8 CHW: normalised on the device."""
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.PILToTensor()])


class ImageNetDataModule(LLADataModule):
    """ImageNet-1k (or any class-folder dataset): RandomResizedCrop 224 + HFlip; val Resize 256 + CenterCrop 224.

    `num_classes` is what the model is built with before any file is read; `check()` insists it equals the number
    of class folders in train/ (so an ImageNet-100 subset needs dataset.num_classes=100). `batch_size` is per
    process (MAN's single-GPU recipe: 128). `loader`: `torchvision` (PIL in workers, uint8 batches normalised on
    the device) or `dali` (NVIDIA DALI, decoding on the GPU).
    """

    name = "imagenet"
    image_size = 224
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    supports_on_device = False  # 140 GB of JPEGs

    def __init__(self, root: str | None = None, batch_size: int = 128, num_classes: int = 1000,
                 loader: str = "torchvision", **kwargs):
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        if int(num_classes) < 2:
            raise ConfigError("dataset.num_classes", f"must be at least 2, got {num_classes}", ">= 2")
        self.num_classes = int(num_classes)
        if loader not in LOADERS:
            raise ConfigError("dataset.loader", f"unknown loader {loader!r}", ", ".join(LOADERS))
        if loader == "dali":
            from lla.data.dali import require_dali

            require_dali()
        self.loader = loader

    def check(self) -> None:
        how = "point dataset.root at the folder that holds train/ and val/ (ImageNet is not downloadable automatically)"
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise missing("ImageNet", self.root, f"{split}/<class>/<image> folders", how)
        train, val = class_folders(self.root / "train"), class_folders(self.root / "val")
        if not train:
            raise missing("ImageNet", self.root, "class folders in train/", how)
        if not val:
            raise missing(
                "ImageNet", self.root, "class folders in val/ (sort the val images into class folders)", how
            )
        if train != val:
            only = sorted(set(train) ^ set(val))[:3]
            raise ConfigError(
                "dataset.root", f"train/ and val/ under {self.root} hold different classes, e.g. {only}"
            )
        if len(train) != self.num_classes:
            raise ConfigError(
                "dataset.num_classes",
                f"{self.root / 'train'} holds {len(train)} class folders but num_classes is {self.num_classes}",
                str(len(train)),
            )

    def _download(self) -> None:
        raise ConfigError(
            "dataset.download", "ImageNet needs an image-net.org account; download it by hand", "false"
        )

    def _build(self, train: bool) -> Dataset:
        transform = train_transform(self.image_size) if train else val_transform(self.image_size)
        folder = self.root / ("train" if train else "val")
        try:
            return SkipCorrupt(str(folder), transform=transform, loader=load_rgb)
        except FileNotFoundError as err:  # a class folder without images
            raise ConfigError("dataset.root", f"{folder}: {err}") from err

    def _loader(self, dataset: Dataset | None, train: bool):
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        if self.loader == "dali":
            from lla.data.dali import DaliLoader

            trainer = getattr(self, "trainer", None)
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            return DaliLoader(
                self.root / ("train" if train else "val"), train=train,
                batch_size=self.batch_size if train else self.eval_batch_size, mean=self.mean, std=self.std,
                size=self.image_size, num_workers=max(1, self.num_workers), seed=self.seed,
                device=self._target_device(), rank=rank, world=world,
            )  # fmt: skip
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=collate_skipping,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def device_normalize(self, x: Tensor) -> Tensor:
        """uint8 (N,C,H,W) -> float32 normalised, where x already is; float input (DALI's) is returned as is."""
        if x.dtype != torch.uint8:
            return x
        mean, std = self._stat_tensors(x.new_empty((), dtype=torch.float32))
        return x.float().div_(255).sub_(mean).div_(std)  # the ops of ToTensor + Normalize, in the same order

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise a uint8 batch on the device it was sent to, then run the model's own hook (channels_last)."""
        if isinstance(batch, (tuple, list)) and isinstance(batch[0], Tensor):
            batch = type(batch)([self.device_normalize(batch[0]), *batch[1:]])
        trainer = getattr(self, "trainer", None)
        model = trainer.lightning_module if trainer is not None else None
        if model is not None:  # Lightning calls only the DataModule's hook when both define one
            batch = model.on_after_batch_transfer(batch, dataloader_idx)
        return batch
