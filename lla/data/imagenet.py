"""ImageNet (METHODS.md §6.2) from the standard class-folder layout: `<root>/train/<wnid>/*.JPEG`, same for val/.

ILSVRC ships val/ as 50,000 loose files; it must be sorted into class folders first (e.g. with the widely used
`valprep.sh`). Validation is that val split, as in every reference script. There is no download: the archive needs
an account at image-net.org.

Corrupt JPEGs are found when they are read (checking 1.28M files up front would take longer than an epoch); the
error then names the file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from lla.data.base import LLADataModule
from lla.data.files import corrupt, missing
from lla.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but a broken image becomes an error that names the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # convert() forces the full decode, so truncation surfaces here
    # PIL raises SyntaxError on some bad headers
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise corrupt(path, f"{type(err).__name__}: {err}", fix="replace or delete it") from err


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))


class ImageNetDataModule(LLADataModule):
    """ImageNet-1k (or any class-folder dataset): RandomResizedCrop 224 + HFlip; val Resize 256 + CenterCrop 224.

    `num_classes` is what the model is built with before any file is read; `check()` insists it equals the number
    of class folders in train/ (so an ImageNet-100 subset needs dataset.num_classes=100). `batch_size` is per
    process (MAN's single-GPU recipe: 128).
    """

    name = "imagenet"
    image_size = 224
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    supports_on_device = False  # 140 GB of JPEGs

    def __init__(self, root: str | None = None, batch_size: int = 128, num_classes: int = 1000, **kwargs):
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        if int(num_classes) < 2:
            raise ConfigError("dataset.num_classes", f"must be at least 2, got {num_classes}", ">= 2")
        self.num_classes = int(num_classes)

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
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if train:  # §6.2, identical in all four repos
            transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *normalize])
        else:
            transform = T.Compose([T.Resize(256), T.CenterCrop(224), *normalize])
        folder = self.root / ("train" if train else "val")
        try:
            return ImageFolder(str(folder), transform=transform, loader=load_rgb)
        except FileNotFoundError as err:  # a class folder without images
            raise ConfigError("dataset.root", f"{folder}: {err}") from err
