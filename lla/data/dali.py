"""ImageNet input decoded by NVIDIA DALI (`dataset.loader=dali`, optional extra: `pip install 'lla[dali]'`).

The same augmentation as the torchvision path (lla/data/imagenet.py), with DALI's operators:

* train: random-resized crop (area 0.08-1, aspect 3/4-4/3, 10 attempts, then a center crop: torchvision's rule)
  fused into the JPEG decoder, bilinear antialiased resize to 224x224, horizontal flip with p=0.5, normalise;
* val: decode, resize the shorter side to 256 (bilinear, antialiased), center crop 224, normalise.

Decoding runs on the GPU ("mixed" backend: nvJPEG) when the target device is CUDA, else on DALI's CPU backend
(what the tests use). Batches are float32 NCHW, normalised, on the target device; labels int64.

Files and labels come from the same sorted class-folder scan as torchvision's ImageFolder, so label k means the
same class in both loaders. Each process reads its shard (`shard_id` = global rank, `num_shards` = world size):
the training order is a seeded permutation of the whole split, reshuffled by DALI after every epoch. One process
sees every image exactly once per epoch (the last batch is short). With several, every rank gets the same number
of full batches: a shard's last batch is completed by repeating its last image (DistributedSampler also pads by
repeating), at most batch_size - 1 extra images per rank and epoch.

A corrupt JPEG stops DALI's pipeline (it cannot drop one sample from a batch): the loader turns that into one
line naming the file and suggests `dataset.loader=torchvision`, which skips such files.
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import torch

from lla.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# torchvision.transforms.RandomResizedCrop's defaults
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10


def available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def require_dali() -> None:
    if not available():
        raise ConfigError("dataset.loader", "dali needs NVIDIA DALI, which is not installed "
                          "(pip install 'lla[dali]')", "torchvision, or dali once it is installed")


def scan(folder: Path) -> tuple[list[str], list[int]]:
    """(files, labels) of a class-folder tree, in ImageFolder's order: classes sorted, files sorted per class."""
    classes = sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(path))
                labels.append(label)
    if not files:
        raise ConfigError("dataset.root", f"no images under {folder}")
    return files, labels


def build_pipeline(files: list[str], labels: list[int], train: bool, batch_size: int, size: int,
                   mean: tuple[float, ...], std: tuple[float, ...], num_threads: int, seed: int,
                   device_id: int | None, rank: int, world: int):
    """The DALI pipeline (built, not yet running); `device_id` None = CPU backend."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    # the reader's seed is shared (one global permutation per epoch, split into shards); the augmentation's differs
    # per rank, so ranks do not draw the same sequence of crops and flips
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=(seed * 1_000_003 + rank + 1) % 2**31,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipeline():
        jpegs, label = fn.readers.file(
            files=files, labels=labels, name="Reader", shard_id=rank, num_shards=world,
            random_shuffle=False, shuffle_after_epoch=train, pad_last_batch=True, stick_to_shard=not train,
            seed=seed)
        decoder = "mixed" if gpu else "cpu"
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=list(SCALE),
                random_aspect_ratio=list(RATIO), num_attempts=ATTEMPTS)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=round(size * 256 / 224), interp_type=types.INTERP_LINEAR,
                               antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5,
            mean=[255 * m for m in mean], std=[255 * s for s in std], mirror=mirror)
        if gpu:
            label = label.gpu()
        return images, label

    return pipeline()


class DaliLoader:
    """Iterable of (x, y) batches from a DALI pipeline; `len()` = batches per epoch (equal on every rank)."""

    def __init__(self, folder: Path, train: bool, batch_size: int, mean, std, size: int = 224,
                 num_workers: int = 4, seed: int = 0, device: torch.device | str = "cpu", rank: int = 0,
                 world: int = 1):
        require_dali()
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.device = torch.device(device)
        self.folder = Path(folder)
        files, labels = scan(self.folder)
        if train:  # DALI's shuffle_after_epoch leaves the first epoch in file order: start from a permutation
            order = list(range(len(files)))
            random.Random(seed).shuffle(order)
            files, labels = [files[i] for i in order], [labels[i] for i in order]
        self.files = files
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.pipe = build_pipeline(files, labels, train, batch_size, size, mean, std, num_workers, seed,
                                   device_id, rank, world)
        self.pipe.build()
        # One process: every image once per epoch, the last batch short. Several: every rank the same number of
        # full batches (DDP needs equal counts; a short shard's last batch would even come out empty), the shards
        # padded by repeating their last image, as DistributedSampler pads.
        policy = LastBatchPolicy.PARTIAL if world == 1 else LastBatchPolicy.FILL
        try:  # the iterator runs the pipeline for its first batch already
            self.iterator = DALIGenericIterator(self.pipe, ["x", "y"], reader_name="Reader",
                                                last_batch_policy=policy, auto_reset=True)
        except RuntimeError as err:
            raise corrupt_file_error(err, self.folder) from None

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self):
        try:
            for out in self.iterator:
                x, y = out[0]["x"], out[0]["y"]
                yield x, y.reshape(-1).long()
        except RuntimeError as err:
            raise corrupt_file_error(err, self.folder) from None


def corrupt_file_error(err: Exception, folder: Path) -> Exception:
    """DALI's decode failure as one line naming the file (or, where DALI does not name it, the folder)."""
    text = str(err)
    if "decoders.image" not in text:
        return err
    found = re.search(r"Failed to decode sample #\d+ : (.+?)\s*$", text, re.MULTILINE)
    if found is not None:
        what = f"{found.group(1)} is truncated or corrupt (DALI could not decode it)"
    else:
        reason = text.split("encountered:", 1)[-1].strip().splitlines()[0]
        what = f"an image under {folder} is truncated or corrupt (DALI: {reason}; it does not say which)"
    return ConfigError("dataset.root", f"{what}; replace or delete it, or use dataset.loader=torchvision, which "
                       "names and skips such files")
