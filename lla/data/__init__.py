"""LightningDataModules for every dataset lla trains on (docs/recipes.md), plus the GPU-resident loader.

Pick one in Hydra with `dataset=<name>`; each `conf/dataset/<name>.yaml` builds one class below via `_target_`.
"""

from lla.data.base import LLADataModule
from lla.data.cifar import CIFAR10DataModule
from lla.data.digits import DigitsDataModule
from lla.data.imagenet import ImageNetDataModule
from lla.data.on_device import Augment, DeviceLoader, crop_flip
from lla.data.stl10 import STL10DataModule
from lla.data.svhn import SVHNDataModule
from lla.data.synthetic import SyntheticDataModule

__all__ = [
    "Augment",
    "CIFAR10DataModule",
    "DeviceLoader",
    "DigitsDataModule",
    "ImageNetDataModule",
    "LLADataModule",
    "STL10DataModule",
    "SVHNDataModule",
    "SyntheticDataModule",
    "crop_flip",
]
