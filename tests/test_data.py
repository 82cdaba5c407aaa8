"""lla.data: every DataModule through its real loading code on tiny files written in the real formats."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lla.data import (
    Augment,
    CIFAR10DataModule,
    DeviceLoader,
    DigitsDataModule,
    ImageNetDataModule,
    LLADataModule,
    STL10DataModule,
    SVHNDataModule,
    SyntheticDataModule,
    crop_flip,
)
from lla.data.on_device import EpochOrder
from lla.errors import ConfigError
from tests.datagen import truncate, write_cifar10, write_imagefolder, write_stl10, write_svhn

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def ready(dm: LLADataModule) -> LLADataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def to_uint8(dm: LLADataModule, x: torch.Tensor) -> torch.Tensor:
    """The pixels behind a normalised batch; exact when no resampling happened."""
    return (dm.denormalize(x) * 255).round().to(torch.uint8)


def candidates(raw: torch.Tensor, aug: Augment) -> torch.Tensor:
    """Every crop (and flip) `aug` can make of each raw image: (N, 2*(2p+1)^2, C, H, W), built the obvious way."""
    h, w = raw.shape[-2:]
    p = aug.pad
    padded = F.pad(raw.float(), [p] * 4, mode=aug.pad_mode).to(torch.uint8)
    crops = [padded[:, :, t : t + h, s : s + w] for t in range(2 * p + 1) for s in range(2 * p + 1)]
    crops += [crop.flip(-1) for crop in crops]
    return torch.stack(crops, 1)


def match_epoch(
    dm: LLADataModule, loader, raw: np.ndarray, labels: np.ndarray
) -> list[tuple[int, int, bool]]:
    """Trace every augmented image of one epoch back to (source index, crop position, flipped).

    Fails unless each one is exactly one crop/flip of a training image with the right label.
    """
    raw = torch.from_numpy(raw)
    aug = dm.augment
    cands = candidates(raw, aug).flatten(2)  # (N, K, C*H*W)
    per_image = cands.shape[1]
    probe = torch.randperm(cands.shape[-1], generator=torch.Generator().manual_seed(0))[:48]
    keys = cands[..., probe]  # compare 48 pixels first, the whole image only for those that agree
    found = []
    for x, y in loader:
        for img, label in zip(to_uint8(dm, x).flatten(1), y.tolist()):
            hits = [
                (i, k)
                for i, k in (keys == img[probe]).all(-1).nonzero().tolist()
                if torch.equal(cands[i, k], img)
            ]
            assert len(hits) == 1, f"augmented image matches {len(hits)} crops of the raw data"
            index, k = hits[0]
            assert label == labels[index]
            found.append((index, k % (per_image // 2), k >= per_image // 2))
    return found


# ---------------------------------------------------------------- construction and configs


def test_construction_touches_no_files_and_validates_arguments(tmp_path):
    for cls in (CIFAR10DataModule, STL10DataModule, SVHNDataModule, ImageNetDataModule):
        cls(root=str(tmp_path / "nothing here"))  # no error before setup()
    with pytest.raises(ConfigError, match="dataset.batch_size"):
        CIFAR10DataModule(batch_size=0)
    with pytest.raises(ConfigError, match="dataset.num_workers"):
        SVHNDataModule(num_workers=-1)
    with pytest.raises(ConfigError, match="dataset.on_device"):
        ImageNetDataModule(on_device=True)
    dm = CIFAR10DataModule(batch_size=64)
    assert dm.eval_batch_size == 64 and dm.pin_memory and dm.persistent_workers == (dm.num_workers > 0)
    assert DigitsDataModule().num_workers == 0 and not DigitsDataModule().persistent_workers


def constructor_params(cls) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if issubclass(klass, LLADataModule):
            names |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs")}
    return names


RECIPES = {  # docs/recipes.md and the project's issue 5
    "cifar10": dict(
        cls=CIFAR10DataModule, batch=1024, lr=0.8, epochs=160, schedule="warmup_cosine", warmup=10
    ),
    "svhn": dict(cls=SVHNDataModule, batch=1024, lr=0.8, epochs=160, schedule="warmup_cosine", warmup=10),
    "stl10": dict(cls=STL10DataModule, batch=128, lr=0.1, epochs=160, schedule="warmup_cosine", warmup=10),
    "imagenet": dict(cls=ImageNetDataModule, batch=128, lr=0.05, epochs=90, schedule="cosine", warmup=0),
    "digits": dict(cls=DigitsDataModule, batch=64, lr=0.1, epochs=15, schedule="warmup_cosine", warmup=3),
    "synthetic": dict(cls=SyntheticDataModule, batch=32, lr=0.05, epochs=2, schedule="cosine", warmup=0),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_config_lists_every_argument_and_sets_the_recipe(name, monkeypatch, tmp_path):
    monkeypatch.setenv("LLA_DATA", str(tmp_path))
    text = (CONF / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    want = RECIPES[name]
    assert set(cfg.dataset) - {"_target_"} == constructor_params(want["cls"])
    dm = instantiate(cfg.dataset)
    assert type(dm) is want["cls"] and dm.batch_size == want["batch"] and not dm.download and not dm.on_device
    assert str(dm.root).startswith(str(tmp_path))
    assert (cfg.optim.lr, cfg.trainer.max_epochs) == (want["lr"], want["epochs"])
    assert (cfg.optim.schedule, cfg.optim.warmup_epochs) == (want["schedule"], want["warmup"])


def test_dataset_facts():
    assert (CIFAR10DataModule.image_size, STL10DataModule.image_size, ImageNetDataModule.image_size) == (
        32,
        96,
        224,
    )
    assert STL10DataModule.num_classes == 10  # not the references' 100 (docs/reference-code.md#stl10-classes)
    assert ImageNetDataModule().num_classes == 1000
    assert CIFAR10DataModule.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert CIFAR10DataModule.augment == Augment(4, "reflect", True)
    assert SVHNDataModule.augment == Augment(2, "constant", False)
    assert STL10DataModule.augment == Augment(4, "constant", True)


# ---------------------------------------------------------------- digits and synthetic


def test_digits_split_is_fixed_stratified_and_normalised_with_its_train_stats():
    a, b = ready(DigitsDataModule()), ready(DigitsDataModule(seed=5))
    assert (len(a.train_set), len(a.test_set)) == (1437, 360)
    assert torch.equal(a.test_set.images, b.test_set.images) and torch.equal(
        a.train_set.labels, b.train_set.labels
    )
    all_counts = torch.bincount(torch.cat([a.train_set.labels, a.test_set.labels]), minlength=10).float()
    test_counts = torch.bincount(a.test_set.labels, minlength=10).float()
    assert (test_counts - 0.2 * all_counts).abs().max() <= 1  # stratified
    x = a.train_set.images
    assert x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert x.mean().item() == pytest.approx(a.mean[0], abs=1e-4)
    assert x.std().item() == pytest.approx(a.std[0], abs=1e-4)
    xt, yt = next(iter(a.test_dataloader()))
    assert torch.allclose(a.denormalize(xt), a.test_set.images[: len(xt)], atol=1e-6)
    assert torch.equal(yt, a.test_set.labels[: len(yt)])


def test_digits_image_size_resizes_and_round_trips():
    dm = ready(DigitsDataModule(image_size=16))
    assert dm.image_size == 16 and dm.train_set.images.shape[1:] == (3, 16, 16)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape[-2:] == (16, 16)
    assert torch.allclose(dm.denormalize(x), dm.test_set.images[: len(x)], atol=1e-6)
    # the same digits as at 32x32, only resized
    assert torch.equal(dm.test_set.labels, ready(DigitsDataModule()).test_set.labels)
    with pytest.raises(ConfigError, match="dataset.image_size"):
        DigitsDataModule(image_size=4)


def test_digits_train_crops_change_between_epochs():
    dm = ready(DigitsDataModule())
    assert dm.augment.flip is False  # a mirrored digit is another symbol
    torch.manual_seed(0)
    first = torch.stack([dm.train_set[i][0] for i in range(32)])
    second = torch.stack([dm.train_set[i][0] for i in range(32)])
    assert not torch.equal(first, second)
    # a shifted digit is still the digit: most of the ink survives the 2-pixel shift
    assert (dm.denormalize(first).sum((1, 2, 3)) / dm.train_set.images[:32].sum((1, 2, 3))).min() > 0.8


def test_synthetic_is_deterministic_per_seed():
    a, b, c = (
        ready(SyntheticDataModule(seed=s, num_samples=64, num_val=32, image_size=16)) for s in (1, 1, 2)
    )
    assert torch.equal(a.train_set.images, b.train_set.images) and not torch.equal(
        a.train_set.images, c.train_set.images
    )
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and y.dtype == torch.int64 and len(a.test_set) == 32
    assert torch.bincount(a.train_set.labels).tolist() == [7] * 4 + [6] * 6  # balanced


# ---------------------------------------------------------------- torchvision-backed datasets, real formats


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, dict(
        cifar=write_cifar10(root, n_train=30, n_test=12),
        svhn=write_svhn(root, {"train": 20, "test": 12, "extra": 10}),
        stl=write_stl10(root, n_train=8, n_test=6),
    )


def make(cls, root, **kw):
    return ready(cls(root=str(root), batch_size=8, num_workers=0, **kw))


@pytest.mark.parametrize("on_device", [False, True], ids=["dataloader", "on_device"])
def test_cifar10_round_trip_and_augmentation(data_root, on_device):
    root, raw = data_root
    x_train, y_train, x_test, y_test = raw["cifar"]
    dm = make(CIFAR10DataModule, root, on_device=on_device)
    xs, ys = zip(*dm.test_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (12, 3, 32, 32)
    assert torch.equal(to_uint8(dm, x), torch.from_numpy(x_test)) and y.tolist() == y_test.tolist()
    assert torch.allclose(dm.denormalize(x) * 255, torch.from_numpy(x_test).float(), atol=1e-3)
    loader = dm.train_dataloader()
    assert len(loader) == 4  # ceil(30 / 8), last batch short
    epoch1 = match_epoch(dm, loader, x_train, y_train)
    epoch2 = match_epoch(dm, loader, x_train, y_train)
    assert sorted(i for i, _, _ in epoch1) == list(range(30))  # every image once per epoch
    assert dict((i, (k, f)) for i, k, f in epoch1) != dict((i, (k, f)) for i, k, f in epoch2)
    flips = [f for _, _, f in epoch1 + epoch2]
    assert any(flips) and not all(flips)


@pytest.mark.parametrize("on_device", [False, True], ids=["dataloader", "on_device"])
def test_svhn_maps_10_to_0_never_flips_and_adds_extra(data_root, on_device):
    root, raw = data_root
    dm = make(SVHNDataModule, root, on_device=on_device, svhn_extra=True)
    xt, yt = zip(*dm.val_dataloader())
    test_x, test_y = raw["svhn"]["test"]
    assert torch.equal(to_uint8(dm, torch.cat(xt)), torch.from_numpy(test_x))
    assert torch.cat(yt).tolist() == test_y.tolist() and 0 in test_y and torch.cat(yt).max() == 9
    train = np.concatenate([raw["svhn"]["train"][0], raw["svhn"]["extra"][0]])
    labels = np.concatenate([raw["svhn"]["train"][1], raw["svhn"]["extra"][1]])
    loader = dm.train_dataloader()
    seen = match_epoch(dm, loader, train, labels) + match_epoch(dm, loader, train, labels)
    assert sorted(i for i, _, _ in seen) == sorted(list(range(30)) * 2)
    assert not any(f for _, _, f in seen)  # zero-padded crops only (docs/recipes.md#cifar-recipe, docs/reference-code.md#stl10-classes)
    assert len({k for _, k, _ in seen}) > 3  # but the crops do move
    assert len(make(SVHNDataModule, root).train_set) == 20  # extra only when asked for


@pytest.mark.parametrize("on_device", [False, True], ids=["dataloader", "on_device"])
def test_stl10_reads_column_major_files_with_10_classes(data_root, on_device):
    root, raw = data_root
    x_train, y_train, x_test, y_test = raw["stl"]
    dm = make(STL10DataModule, root, on_device=on_device)
    assert dm.num_classes == 10 and not (root / "stl10_binary" / "unlabeled_X.bin").exists()
    x, y = zip(*dm.test_dataloader())
    assert torch.equal(to_uint8(dm, torch.cat(x)), torch.from_numpy(x_test))  # orientation right
    assert torch.cat(y).tolist() == y_test.tolist()  # file labels 1..10 -> 0..9
    seen = match_epoch(dm, dm.train_dataloader(), x_train, y_train)
    assert sorted(i for i, _, _ in seen) == list(range(8))


def test_imagenet_folder_tree(tmp_path):
    classes = write_imagefolder(tmp_path, classes=3, per_class=2, size=(60, 80))
    dm = make(ImageNetDataModule, tmp_path, num_classes=3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 224, 224) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    xv, _ = next(iter(dm.val_dataloader()))
    x01 = dm.denormalize(xv)
    assert xv.shape == (6, 3, 224, 224) and x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
    assert dm.test_set.classes == classes
    with pytest.raises(ConfigError, match="dataset.num_classes.*3 class folders"):
        make(ImageNetDataModule, tmp_path)  # the 1000 default does not match the 3 folders
    (tmp_path / "val" / classes[0]).rename(tmp_path / "val" / "n99999999")
    with pytest.raises(ConfigError, match="different classes"):
        make(ImageNetDataModule, tmp_path, num_classes=3)


# ---------------------------------------------------------------- bad data: one line that says what to do


@pytest.mark.parametrize(
    "cls, needle",
    [
        (CIFAR10DataModule, "cifar-10-batches-py"),
        (STL10DataModule, "stl10_binary"),
        (SVHNDataModule, "svhn"),
        (ImageNetDataModule, "train/"),
    ],
)
def test_missing_data_is_one_line_that_says_how_to_get_it(tmp_path, cls, needle):
    dm = cls(root=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        dm.setup("fit")  # setup() runs check() first
    msg = str(err.value)
    assert err.value.key == "dataset.root" and "\n" not in msg
    assert needle in msg and str(tmp_path) in msg
    assert ("dataset.download=true" in msg) == (cls is not ImageNetDataModule)


def test_missing_single_file_is_named(tmp_path):
    write_cifar10(tmp_path, n_train=10, n_test=5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match="data_batch_4"):
        CIFAR10DataModule(root=str(tmp_path)).check()


@pytest.mark.parametrize(
    "dataset, file, keep",
    [
        ("cifar10", "cifar-10-batches-py/data_batch_3", 0.5),
        ("cifar10", "cifar-10-batches-py/batches.meta", 0.5),
        ("stl10", "stl10_binary/train_X.bin", -100),
        ("stl10", "stl10_binary/test_y.bin", -1),
        ("svhn", "svhn/train_32x32.mat", 0.5),
        ("svhn", "svhn/test_32x32.mat", -10),  # header intact: found when scipy reads the body
    ],
)
def test_truncated_file_is_named(tmp_path, dataset, file, keep):
    cls, write = {
        "cifar10": (CIFAR10DataModule, lambda: write_cifar10(tmp_path, n_train=10, n_test=5)),
        "stl10": (STL10DataModule, lambda: write_stl10(tmp_path, n_train=3, n_test=2)),
        "svhn": (SVHNDataModule, lambda: write_svhn(tmp_path, {"train": 10, "test": 5})),
    }[dataset]
    write()
    truncate(tmp_path / file, keep)
    with pytest.raises(ConfigError) as err:
        make(cls, tmp_path)
    assert str(tmp_path / file) in str(err.value) and "truncated or corrupt" in str(err.value)
    assert "\n" not in str(err.value)


def test_batch_with_wrong_structure_is_named(tmp_path):
    import pickle

    write_cifar10(tmp_path, n_train=10, n_test=5)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}, protocol=2)
    )  # complete, but no labels
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0)
    dm.check()  # cheap check: the file is whole
    with pytest.raises(ConfigError, match=f"{bad}.*labels"):
        dm.setup("fit")


def test_verify_md5_compares_with_the_published_checksums(tmp_path):
    write_cifar10(tmp_path, n_train=10, n_test=5)
    CIFAR10DataModule(root=str(tmp_path)).check()  # structure is fine
    with pytest.raises(ConfigError, match="data_batch_1.*md5"):
        CIFAR10DataModule(root=str(tmp_path), verify_md5=True).check()  # but these are not the real files


def test_failed_download_is_one_line_that_says_what_to_do():
    from urllib.error import URLError

    from lla.data.files import fetch

    def offline():
        raise URLError("no route to host")

    with pytest.raises(ConfigError) as err:
        fetch("CIFAR-10", "https://example.invalid/c.tgz", offline)
    assert err.value.key == "dataset.download" and "point dataset.root" in str(err.value)
    for cls in (DigitsDataModule, SyntheticDataModule):
        cls(download=True).prepare_data()  # nothing to fetch, and no error for asking


def test_corrupt_image_is_named_when_read(tmp_path):
    from lla.data.imagenet import load_rgb

    classes = write_imagefolder(tmp_path, classes=2, per_class=1)
    bad = truncate(tmp_path / "val" / classes[1] / "img_0.JPEG", 0.3)
    with pytest.raises(ConfigError, match=str(bad)):
        load_rgb(str(bad))  # the loader skips it with a warning naming it: tests/test_imagenet_input.py


# ---------------------------------------------------------------- the on-device loader


@pytest.mark.parametrize("mode", ["constant", "reflect"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_equals_pad_slice_flip(mode, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 9, 7), generator=g).to(dtype)
    pad = 3
    top, left = torch.randint(0, 2 * pad + 1, (2, 16), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    out = crop_flip(x, top, left, flip, pad, mode)
    padded = F.pad(x.float(), [pad] * 4, mode=mode).to(dtype)
    for i in range(16):
        want = padded[i, :, top[i] : top[i] + 9, left[i] : left[i] + 7]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want)
    assert out.dtype == dtype


def test_epoch_order_shards_like_distributed_sampler():
    ranks = [EpochOrder(10, shuffle=True, seed=3, rank=r, world=3) for r in range(3)]
    parts = [o.draw(epoch=2, pad=1)[0] for o in ranks]
    assert [len(p) for p in parts] == [4, 4, 4]  # padded to equal length, or DDP hangs
    assert set(torch.cat(parts).tolist()) == set(range(10))
    assert torch.equal(ranks[0].draw(2, 1)[0], parts[0]) and not torch.equal(ranks[0].draw(3, 1)[0], parts[0])


def device_loader(seed: int, **kw) -> DeviceLoader:
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 4, 4).contiguous()
    return DeviceLoader(
        images, torch.arange(20), 6, (0.0,) * 3, (1 / 255,) * 3, shuffle=True, seed=seed, **kw
    )


def test_device_loader_epochs_are_permutations_and_deterministic():
    a, b, c = device_loader(0), device_loader(0), device_loader(1)
    assert len(a) == 4
    epochs = [torch.cat([y for _, y in a]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(20))
    assert not torch.equal(epochs[0], epochs[1])  # a new pass is a new epoch
    assert torch.equal(torch.cat([y for _, y in b]), epochs[0])  # same seed, same epoch 0
    assert not torch.equal(torch.cat([y for _, y in c]), epochs[0])
    a.sampler.set_epoch(1)  # what Lightning calls at each epoch start
    batches = list(a)
    assert torch.equal(torch.cat([y for _, y in batches]), epochs[1])
    for x, y in batches:  # images carry their index in every pixel: normalisation and gather are exact
        assert x.dtype == torch.float32 and torch.equal(x[:, :, 0, 0], y[:, None].float().expand(-1, 3))


def test_device_loader_applies_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 3, 8, 8), generator=g, dtype=torch.uint8)
    aug = Augment(pad=2, pad_mode="reflect", flip=True)
    loader = DeviceLoader(images, torch.arange(200), 64, (0.0,) * 3, (1 / 255,) * 3, augment=aug, seed=1)
    cands = candidates(images, aug).flatten(2)  # 25 positions, then the same 25 flipped; 12 = centre
    moved, flipped = set(), set()
    for x, y in loader:
        for img, i in zip(x.round().to(torch.uint8).flatten(1), y.tolist()):
            (k,) = (cands[i] == img).all(-1).nonzero()[:, 0].tolist()
            moved.add(k % 25 != 12)
            flipped.add(k >= 25)
    assert moved == {True, False} and flipped == {True, False}


class _Recorder(L.LightningModule):
    """Records the labels of every training batch, per epoch, and where they arrived."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 10)
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, _):
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).append(y.clone())
        assert x.device == self.device
        return F.cross_entropy(self.layer(x.mean((2, 3))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_device_loader_under_a_lightning_trainer():
    dm = SyntheticDataModule(num_samples=40, num_val=16, batch_size=8, on_device=True, augment=True, seed=4)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    orders = [torch.cat(model.seen[e]) for e in (0, 1)]
    assert all(sorted(o.tolist()) == sorted(dm.train_set.labels.tolist()) for o in orders)
    replay = dm.train_dataloader()  # a fresh loader for epoch 1 gives what the Trainer saw in epoch 1
    replay.sampler.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in replay]), orders[1])
    assert not torch.equal(orders[0], orders[1])


def test_loader_speed_script_runs():
    from lla.data.loader_speed import measure

    rows = measure(n_images=64, batch_size=32, epochs=1)
    assert [name.split(",")[0].split(" (")[0] for name, _ in rows][-1] == "on-device loader"
    assert all(rate > 0 for _, rate in rows)
