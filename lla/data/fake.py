"""Write tiny datasets in the exact on-disk formats torchvision reads, for tests and offline trials.

Each writer returns the raw images (N,3,H,W) uint8 and labels 0..C-1 it wrote, so callers can compare what the
loaders give back with what is on disk. Images are uniform noise: every crop offset then gives a different image.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def write_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0):
    """`<root>/cifar-10-batches-py/`: five train batches (n_train split across them), test_batch, batches.meta.

    Same layout as the real python pickles: dict with 'data' (n, 3072) uint8 in channel planes (R, G, B, each row
    major) and 'labels' (list of int); batches.meta has 'label_names'. Pickle protocol 2, as the originals.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = _images(rng, n_train, 32)
    x_test, y_test = _images(rng, n_test, 32)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        _pickle(folder / f"data_batch_{i}", x_train[idx], y_train[idx], f"training batch {i} of 5")
    _pickle(folder / "test_batch", x_test, y_test, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {"num_cases_per_batch": 10000, "label_names": CIFAR_CLASSES, "num_vis": 3072}, f, protocol=2
        )
    return x_train, y_train, x_test, y_test


def _pickle(path: Path, x: np.ndarray, y: np.ndarray, label: str) -> None:
    entry = {
        "batch_label": label,
        "labels": [int(v) for v in y],
        "data": x.reshape(len(x), 3072),
        "filenames": [f"img_{i}.png" for i in range(len(x))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_svhn(root: str | Path, splits: dict[str, int] | None = None, seed: int = 0):
    """`<root>/svhn/<split>_32x32.mat` with X (32,32,3,N) uint8 and y (N,1) uint8 where digit 0 is stored as 10.

    Returns {split: (images (N,3,32,32), labels 0..9)}. Every digit occurs, 0 included, so the 10->0 mapping is tested.
    """
    import scipy.io

    rng = np.random.default_rng(seed)
    folder = Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (splits or {"train": 30, "test": 20}).items():
        x, _ = _images(rng, n, 32)
        y = np.arange(n) % 10
        rng.shuffle(y)
        file_y = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": file_y})
        out[split] = (x, y.astype(np.int64))
    return out


def write_stl10(root: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0):
    """`<root>/stl10_binary/{train,test}_{X,y}.bin`: images column-major (each channel plane stored transposed),
    labels uint8 1..10, plus class_names.txt. No unlabeled_X.bin: supervised training must not need it."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images(rng, n, 96)
        # (N,C,W,H) written in C order = each channel plane column-major, as in the real files
        x.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        (y + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        out += [x, y]
    (folder / "class_names.txt").write_text("\n".join(CIFAR_CLASSES) + "\n")
    return tuple(out)


def write_imagefolder(
    root: str | Path, classes: int = 3, per_class: int = 2, size: tuple[int, int] = (60, 80), seed: int = 0
) -> list[str]:
    """`<root>/{train,val}/n0000000k/img_i.JPEG` JPEGs of `size` (width, height); returns the class names."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"n{k:08d}" for k in range(classes)]
    for split in ("train", "val"):
        for name in names:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)
    return names
