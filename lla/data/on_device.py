"""GPU-resident loader (`dataset.on_device=true`): the whole split lives on the accelerator as one tensor.

Small datasets (CIFAR-10 is 150 MB as uint8) fit on any accelerator many times over. Keeping them there and doing
the docs/recipes.md#cifar-recipe crop + flip with batched tensor ops removes the CPU workers, the PIL round trip and the host-to-device copy
from every step, so the GPU never waits for data. Everything also runs on the CPU, which is what the tests use.

Randomness (order, crop offsets, flips) is drawn on the CPU from a generator seeded by (seed, epoch), so an epoch's
batches are the same on every device and every rerun, and a resumed run repeats the epochs it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Augment:
    """A dataset's training augmentation: random crop from a padded image, then an optional horizontal flip.

    One spec drives both the torchvision transforms and the on-device loader, so the two paths cannot drift.
    `pad_mode` is "reflect" (CIFAR-10, docs/recipes.md#cifar-recipe) or "constant" (zero padding: SVHN, STL-10, digits).
    """

    pad: int
    pad_mode: str = "constant"
    flip: bool = True

    def __post_init__(self):
        if self.pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {self.pad_mode!r}")


def _source_index(pos: Tensor, size: int, mode: str) -> tuple[Tensor, Tensor | None]:
    """Map positions in the padded image (offset by -pad already) to source pixels.

    Returns the clamped source index and, for zero padding, a mask of positions that fall inside the image.
    Reflect follows torch/PIL "reflect": -1 -> 1, size -> size-2 (the edge pixel is not repeated).
    """
    if mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)
        return pos, None
    inside = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), inside


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, pad: int, pad_mode: str) -> Tensor:
    """Crop each image of `x` (B,C,H,W) at (`top`, `left`) of its `pad`-padded version, flipping where `flip`.

    Equivalent to ``F.pad(x, [pad]*4, mode)[:, :, top:top+H, left:left+W]`` (+ ``.flip(-1)``) per sample, but the
    padding is never materialised: two gathers with computed indices, for any dtype (uint8 included).
    `top`/`left` are int64 in [0, 2*pad], `flip` is bool, all of shape (B,) and on x's device.
    """
    b, c, h, w = x.shape
    rows = top[:, None] + torch.arange(h, device=x.device) - pad  # (B,H) in source coordinates
    cols = left[:, None] + torch.arange(w, device=x.device) - pad  # (B,W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip after the crop reverses the column order
    rows, row_ok = _source_index(rows, h, pad_mode)
    cols, col_ok = _source_index(cols, w, pad_mode)
    out = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if row_ok is not None:  # zero padding: blank what came from outside the image
        outside = ~(row_ok[:, None, :, None] & col_ok[:, None, None, :])
        out = out.masked_fill(outside, 0)
    return out


class EpochOrder:
    """Which samples, in which order and with which crop/flip, one process sees in one epoch.

    It plays the role of a (Distributed)Sampler: Lightning finds it as `loader.sampler` and calls `set_epoch` at the
    start of every epoch. Without Lightning, each new pass over the loader moves on to the next epoch by itself.
    With `world > 1` the padded permutation is split like DistributedSampler does, so every rank gets the same
    number of batches (unequal counts would hang DDP).
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def generator(self, epoch: int) -> torch.Generator:
        # (seed, epoch) -> one stream; the large odd multiplier keeps seed s epoch e+1 apart from seed s+1 epoch e.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)

    def draw(self, epoch: int, pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This rank's (indices, top, left, flip) for `epoch`, as CPU tensors of equal length."""
        g = self.generator(epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        total = len(self) * self.world
        if total > self.n:  # repeat the head of the order so every rank gets len(self) samples
            order = torch.cat([order, order[: total - self.n]])
        top = torch.randint(0, 2 * pad + 1, (total,), generator=g)
        left = torch.randint(0, 2 * pad + 1, (total,), generator=g)
        flip = torch.rand(total, generator=g) < 0.5
        mine = slice(self.rank, total, self.world)
        return order[mine], top[mine], left[mine], flip[mine]


class DeviceLoader:
    """Iterable of normalised (x, y) batches cut from tensors that already sit on `device`.

    `images` is (N,C,H,W), uint8 in 0..255 or float in [0,1]; `labels` is (N,) int64. Batches are float32,
    normalised with `mean`/`std`, augmented with `augment` (None = none, e.g. evaluation). `len()` is the number
    of batches (the last one may be short, like DataLoader with drop_last=False).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: Augment | None = None,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world: int = 1,
    ):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.device = torch.device(device)
        # one upload per loader; uint8 stays uint8 on the device (4x less memory than float)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.scale = 1 / 255 if images.dtype == torch.uint8 else 1.0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.batch_size, self.augment = batch_size, augment
        self.sampler = EpochOrder(images.shape[0], shuffle, seed, rank, world)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.sampler.epoch
        self.sampler.epoch += 1  # a later pass without set_epoch() is the next epoch, not a replay
        pad = self.augment.pad if self.augment else 0
        order, top, left, flip = (t.to(self.device) for t in self.sampler.draw(epoch, pad))
        if self.augment is not None and not self.augment.flip:
            flip = torch.zeros_like(flip)
        for start in range(0, order.shape[0], self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.augment is not None:
                sl = slice(start, start + self.batch_size)
                x = crop_flip(x, top[sl], left[sl], flip[sl], pad, self.augment.pad_mode)
            x = (x.float() * self.scale - self.mean) / self.std
            yield x, self.labels[idx]
