"""ImageNet input: uint8 batches normalised on the device, corrupt JPEGs skipped and named, the DALI loader.

The DALI tests run on DALI's CPU backend and skip where `lla[dali]` is not installed (`make test` never needs it).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lla.backbones import build_backbone
from lla.data import ImageNetDataModule
from lla.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from lla.errors import ConfigError
from lla.methods.dgl import DGL
from tests.datagen import truncate, write_imagefolder
from tests.helpers import trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}


def make(root, **kw):
    dm = ImageNetDataModule(root=str(root), batch_size=kw.pop("batch_size", 4), num_workers=0, **kw)
    dm.setup("fit")
    return dm


def old_transform(train: bool) -> T.Compose:
    """The float32 pipeline the loader used before: ToTensor + Normalize on the CPU, in the worker."""
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(256), T.CenterCrop(224), *norm])


def test_uint8_batches_normalised_after_transfer_equal_the_float_path(tmp_path):
    write_imagefolder(tmp_path, classes=2, per_class=3, size=(300, 260))
    dm = make(tmp_path, num_classes=2)
    for train, dataset in ((True, dm.train_set), (False, dm.test_set)):
        for i in range(len(dataset)):
            torch.manual_seed(100 + i)  # the same crop and flip for both pipelines
            raw, label = dataset[i]
            torch.manual_seed(100 + i)
            ref = old_transform(train)(load_rgb(dataset.samples[i][0]))
            assert raw.dtype == torch.uint8 and raw.shape == (3, 224, 224) and label == dataset.samples[i][1]
            x = dm.on_after_batch_transfer([raw[None], torch.tensor([label])], 0)[0]
            assert x.dtype == torch.float32
            torch.testing.assert_close(x[0], ref, atol=1e-6, rtol=0)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.dtype == torch.uint8  # what the workers ship and pin: a quarter of float32's bytes
    x01 = dm.denormalize(dm.device_normalize(xv))  # InfoPro's reconstruction target is still the [0, 1] image
    torch.testing.assert_close(x01, xv.float() / 255, atol=1e-6, rtol=0)


class BatchProbe(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x = batch[0]
        self.seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last), float(x.mean())))


@pytest.mark.parametrize("channels_last", [False, True])
def test_trainer_receives_normalised_batches_and_the_models_hook_still_runs(tmp_path, channels_last):
    """Lightning calls only the DataModule's on_after_batch_transfer when both define one: ours must run the
    model's (channels_last conversion) after normalising."""
    write_imagefolder(tmp_path, classes=2, per_class=2, size=(240, 240))
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=4, num_workers=0, num_classes=2)
    torch.manual_seed(0)
    model = DGL(build_backbone("resnet18", 2), k=2, num_classes=2, image_size=224, optim=CONST, max_epochs=1)
    if channels_last:
        model.use_channels_last()
    probe = BatchProbe()
    trainer(max_steps=1, callbacks=[probe]).fit(model, datamodule=dm)
    (dtype, is_cl, mean), = probe.seen
    assert dtype == torch.float32 and is_cl == channels_last
    assert -3 < mean < 3  # normalised, not 0..255


def test_corrupt_jpeg_is_skipped_with_one_line_naming_it(tmp_path, capfd):
    classes = write_imagefolder(tmp_path, classes=2, per_class=3)
    bad = truncate(tmp_path / "val" / classes[1] / "img_1.JPEG", 0.3)
    dm = make(tmp_path, num_classes=2)
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]  # every other image arrived
    list(dm.val_dataloader())  # a second epoch: not reported again
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert str(bad) in lines[0] and lines[0].startswith("warning: skipping corrupt image")


def test_bad_loader_value_is_one_config_error():
    with pytest.raises(ConfigError) as err:
        ImageNetDataModule(loader="nvjpeg")
    assert err.value.key == "dataset.loader" and "torchvision, dali" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_loader_value_on_the_command_line_is_one_line_and_exit_2():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "run.py", "dataset=imagenet", "dataset.loader=nvjpeg"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: dataset.loader: unknown loader 'nvjpeg'; allowed: torchvision, dali"


def test_dali_missing_is_one_config_error(monkeypatch):
    import lla.data.dali as dali

    monkeypatch.setattr(dali, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"dataset.loader: dali needs NVIDIA DALI.*lla\[dali\]"):
        ImageNetDataModule(loader="dali")


# ---------------------------------------------------------------------------------------------------------- DALI
def write_colors(root: Path, classes: int = 3, per_class: int = 3, size=(96, 80)) -> dict[tuple, tuple[int, int]]:
    """Solid-colour JPEGs, one colour per image: a decoded sample names its source. -> colour -> (label, index)."""
    colors = {}
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                color = (40 + 60 * c, 40 + 50 * i, 200)
                Image.new("RGB", size, color).save(folder / f"img_{i}.JPEG", quality=95)
                colors[color] = (c, i)
    return colors


def identify(x: torch.Tensor, colors: dict) -> list[tuple[int, int]]:
    """The (label, index) of each normalised solid-colour image of the batch."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((x * std + mean) * 255).mean((2, 3))
    keys = torch.tensor(list(colors), dtype=torch.float32)
    out = []
    for pixel in rgb:
        d = (keys - pixel).abs().max(1).values
        assert d.min() < 6, f"{pixel} is none of the source colours"
        out.append(colors[tuple(int(v) for v in keys[d.argmin()])])
    return out


def test_dali_reads_every_image_once_with_imagefolders_labels(tmp_path):
    pytest.importorskip("nvidia.dali")
    colors = write_colors(tmp_path)
    dm = make(tmp_path, num_classes=3, loader="dali")
    for loader, n_batches in ((dm.train_dataloader(), 3), (dm.val_dataloader(), 3)):
        assert len(loader) == n_batches
        for _epoch in range(2):  # the second epoch is complete too (a new order for training)
            seen = []
            for x, y in loader:
                assert x.dtype == torch.float32 and x.shape[1:] == (3, 224, 224) and y.dtype == torch.int64
                ids = identify(x, colors)
                assert y.tolist() == [label for label, _ in ids]  # label k is ImageFolder's class k
                seen += ids
            assert sorted(seen) == sorted(colors.values())


def test_dali_shards_follow_rank_and_world(tmp_path):
    pytest.importorskip("nvidia.dali")
    from lla.data.dali import DaliLoader

    colors = write_colors(tmp_path, classes=3, per_class=3)  # 9 images
    for train in (True, False):
        folder = tmp_path / ("train" if train else "val")
        shards = [DaliLoader(folder, train, 2, IMAGENET_MEAN, IMAGENET_STD, rank=r, world=2, num_workers=1)
                  for r in range(2)]
        assert len(shards[0]) == len(shards[1])  # equal batch counts: DDP would hang otherwise
        for _epoch in range(2):  # training reshuffles after each epoch: the same permutation on every rank
            seen = [{i for x, _ in shard for i in identify(x, colors)} for shard in shards]
            assert not seen[0] & seen[1]  # disjoint ...
            assert seen[0] | seen[1] == set(colors.values())  # ... and together the whole split


def test_dali_val_equals_torchvision_val_and_train_crops_and_flips(tmp_path):
    pytest.importorskip("nvidia.dali")
    # smooth images: resamplers of different libraries agree on them to a few grey levels
    yy, xx = np.mgrid[0:200, 0:300]
    for split in ("train", "val"):
        (tmp_path / split / "n00000000").mkdir(parents=True)
        (tmp_path / split / "n00000001").mkdir(parents=True)
        for c in range(2):
            img = np.stack([xx * 255 / 299, yy * 255 / 199, np.full_like(xx, 100 + 50 * c)], -1).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / split / f"n{c:08d}" / "img.JPEG", quality=95)
    tv = make(tmp_path, num_classes=2)
    dali = make(tmp_path, num_classes=2, loader="dali")
    (xt, yt), = [(tv.device_normalize(x), y) for x, y in tv.val_dataloader()]
    (xd, yd), = list(dali.val_dataloader())
    assert torch.equal(yt, yd)
    diff = (tv.denormalize(xt) - tv.denormalize(xd)).abs() * 255
    assert diff.mean() < 2 and diff.max() < 24, (diff.mean(), diff.max())
    # train: red rises left to right unless flipped; a crop spans less of the image than the whole width
    flips, spans = [], []
    for _ in range(20):
        for x, _ in dali.train_dataloader():
            red = tv.denormalize(x)[:, 0].mean(1)  # (N, W) red profile
            flips += (red[:, -8:].mean(1) < red[:, :8].mean(1)).tolist()
            spans += (red.max(1).values - red.min(1).values).tolist()
    assert 0.25 < sum(flips) / len(flips) < 0.75  # both orientations, about half each
    assert min(spans) < 0.6 < max(spans)  # random scales: narrow crops and wide ones


def test_dali_corrupt_jpeg_is_one_line(tmp_path):
    pytest.importorskip("nvidia.dali")
    classes = write_imagefolder(tmp_path, classes=2, per_class=2)
    bad = truncate(tmp_path / "val" / classes[1] / "img_0.JPEG", 0.3)
    dm = make(tmp_path, num_classes=2, loader="dali")
    with pytest.raises(ConfigError) as err:
        list(dm.val_dataloader())
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("dataset.root: ")
    assert str(bad) in msg or str(bad.parent.parent) in msg


def test_dali_trains_through_lightning(tmp_path):
    pytest.importorskip("nvidia.dali")
    write_imagefolder(tmp_path, classes=2, per_class=2, size=(240, 240))
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, num_workers=1, num_classes=2, loader="dali")
    torch.manual_seed(0)
    model = DGL(build_backbone("resnet18", 2), k=2, num_classes=2, image_size=224, optim=CONST, max_epochs=1)
    before = [p.detach().clone() for p in model.parameters()]
    probe = BatchProbe()
    trainer(max_epochs=1, callbacks=[probe], limit_val_batches=1.0).fit(model, datamodule=dm)
    assert len(probe.seen) == 2 and all(dtype == torch.float32 for dtype, _, _ in probe.seen)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loader_speed_reports_both_imagenet_paths():
    from lla.data import dali
    from lla.data.loader_speed import measure_imagenet

    rows = measure_imagenet(n_images=8, batch_size=4, epochs=1, size=(120, 100))
    names = [name for name, _ in rows]
    assert any("torchvision" in n for n in names) and all(rate > 0 for _, rate in rows)
    assert any("DALI" in n for n in names) == dali.available()
