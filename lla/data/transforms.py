"""torchvision transform pipelines for PIL-backed datasets (docs/recipes.md), built from an `Augment` spec."""

from __future__ import annotations

from torchvision import transforms as T

from lla.data.on_device import Augment


def pil_transform(size: int, mean, std, augment: Augment | None = None) -> T.Compose:
    """Train (augment given) or test (augment None) pipeline: [RandomCrop(pad) [+ HFlip]] + ToTensor + Normalize."""
    steps = []
    if augment is not None:
        steps.append(T.RandomCrop(size, padding=augment.pad, padding_mode=augment.pad_mode))
        if augment.flip:
            steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
