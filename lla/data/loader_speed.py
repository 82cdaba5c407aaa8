"""Images/s of the on-device loader vs the torchvision DataLoader path, on CIFAR-format data made on the spot.

    python -m lla.data.loader_speed            # 2,000 noise images, batch 256, best of 5 epochs

Both paths do the same work per image: §6.1 crop + flip, normalisation, and delivery on the device the model
would use (CUDA when there is one, else CPU). The DataLoader path is timed with 0 workers and with the default
worker count; its first epoch (worker start-up) is not timed.

Measured on the 2-core development VM (no GPU), so "on-device" here means CPU tensors:

    quiet machine      DataLoader 0 workers  2,006 img/s | 2 workers  3,747 img/s | on-device 73,662 img/s
    shared (load 3-11) DataLoader 0 workers  430-1,330   | 2 workers  400-1,050   | on-device 1,265-15,410

The on-device path was the fastest in every run (2x to 20x). Its CPU figure suffers most from other processes
competing for the two cores (torch's intra-op threads wait on each other); on a GPU it runs as a few kernels per
batch and never waits for CPU workers.
"""

from __future__ import annotations

import tempfile
import time

import torch

from lla.data.base import default_num_workers
from lla.data.cifar import CIFAR10DataModule
from lla.data.fake import write_cifar10


def images_per_second(dm: CIFAR10DataModule, device: torch.device, epochs: int) -> float:
    """Best epoch of `epochs` timed ones, after one untimed epoch; every batch ends up on `device`.

    Best-of, like timeit: on a shared machine the slow epochs measure the neighbours, not the loader.
    """
    loader = dm.train_dataloader()

    def one_epoch() -> float:
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            seen += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the timer must include queued copies and kernels
        return seen / (time.perf_counter() - start)

    one_epoch()
    return max(one_epoch() for _ in range(epochs))


def measure(n_images: int = 2000, batch_size: int = 256, epochs: int = 5) -> list[tuple[str, float]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        write_cifar10(root, n_train=n_images, n_test=10)
        for workers in sorted({0, default_num_workers()}):
            dm = CIFAR10DataModule(root=root, batch_size=batch_size, num_workers=workers)
            dm.setup("fit")
            rows.append(
                (
                    f"torchvision DataLoader, {workers} workers -> {device.type}",
                    images_per_second(dm, device, epochs),
                )
            )
        dm = CIFAR10DataModule(root=root, batch_size=batch_size, on_device=True)
        dm.device = device  # no Trainer here to ask
        dm.setup("fit")
        rows.append((f"on-device loader ({device.type})", images_per_second(dm, device, epochs)))
    return rows


def main() -> None:
    rows = measure()
    width = max(len(name) for name, _ in rows)
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>12,.0f} images/s")


if __name__ == "__main__":
    main()
