"""A map-style dataset over in-memory image tensors (digits, synthetic), augmented with the on-device crop/flip."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lla.data.on_device import Augment, crop_flip


class TensorImageDataset(Dataset):
    """`images` (N,C,H,W) float in [0,1] (or uint8), `labels` (N,) int64; items are (normalised x, int y).

    Augmentation uses the same `crop_flip` as the on-device loader, drawing from torch's global RNG (which the
    DataLoader seeds per worker), so both paths apply the identical transform family.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean, std, augment: Augment | None = None):
        self.images, self.labels, self.augment = images, labels.long(), augment
        self.scale = 1 / 255 if images.dtype == torch.uint8 else 1.0
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i]
        if self.augment is not None:
            a = self.augment
            top, left = torch.randint(0, 2 * a.pad + 1, (2, 1))
            flip = torch.rand(1) < 0.5 if a.flip else torch.zeros(1, dtype=torch.bool)
            x = crop_flip(x[None], top, left, flip, a.pad, a.pad_mode)[0]
        return (x.float() * self.scale - self.mean) / self.std, int(self.labels[i])
