"""The documentation builds, and the guides' worked examples (docs/examples/) still work with the real code.

Each example is loaded from its file, placed where its guide says it goes (a module path, a YAML in a copy of conf/),
composed by Hydra like `python run.py ...` composes, instantiated with the same checked instantiation as the entry
point, and trained for a few steps through the engine. A guide that drifts from the code fails here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

import lla.backbones
import lla.data
import lla.splits
from lla.build import build  # what the entry point builds: checked keys, datamodule, backbone, method
from lla.errors import ConfigError
from tests.helpers import grad_probe, trainer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


def load_example(name: str, module_path: str, monkeypatch):
    """Import docs/examples/<name>.py as ``module_path`` (where the guide tells the reader to save it)."""
    spec = importlib.util.spec_from_file_location(module_path, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_path, module)
    spec.loader.exec_module(module)
    return module


def compose_with(tmp_path: Path, extra: dict[str, str], overrides: list[str]):
    """Compose the real conf/ plus the example YAMLs (``{"method/x.yaml": "docs/examples/x.yaml"}``)."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf, ignore=shutil.ignore_patterns("experiment"))
    for dest, src in extra.items():
        shutil.copy(ROOT / src, conf / dest)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=["logger=none", "trainer=cpu", *overrides])


def snapshot(model) -> dict[int, list[torch.Tensor]]:
    return {k: [p.detach().clone() for p in model.module_parameters(k)] for k in range(model.num_modules)}


def changed_modules(model, before) -> list[int]:
    return [k for k in range(model.num_modules)
            if any(not torch.equal(a, p) for a, p in zip(before[k], model.module_parameters(k)))]


SMALL_DATA = ["dataset=synthetic", "dataset.num_samples=64", "dataset.num_val=32", "dataset.image_size=16",
              "dataset.batch_size=16"]


# ------------------------------------------------------------------------------------------------ add a method
def test_add_a_method_example_trains_through_the_engine(tmp_path, monkeypatch):
    example = load_example("smoothed_greedy", "lla.methods.smoothed_greedy", monkeypatch)
    cfg = compose_with(tmp_path, {"method/smoothed_greedy.yaml": "docs/examples/smoothed_greedy.yaml"},
                       ["method=smoothed_greedy", "method.smoothing=0.2", "backbone=resnet20", "k=4", *SMALL_DATA])
    dm, model = build(cfg)
    assert type(model) is example.SmoothedGreedy
    assert model.num_modules == 4 and len(model.aux) == 3  # one aux net per local module, none for the last
    assert model.describe()["smoothing"] == 0.2  # the command-line option reached the constructor
    before = snapshot(model)
    trainer(max_steps=3, limit_val_batches=1).fit(model, datamodule=dm)
    assert changed_modules(model, before) == [0, 1, 2, 3]  # every module (with its aux net) has its optimizer
    assert all(not torch.equal(a, p) for a, p in zip(before[0][-2:], list(model.aux[0].parameters())[-2:]))

    with pytest.raises(ConfigError, match="method.smoothing"):  # the option check the guide shows
        build(compose_with(tmp_path / "bad", {"method/smoothed_greedy.yaml": "docs/examples/smoothed_greedy.yaml"},
                           ["method=smoothed_greedy", "method.smoothing=1.5", "backbone=resnet20", "k=4",
                            *SMALL_DATA]))


def test_add_a_method_example_keeps_gradient_isolation(monkeypatch):
    """The guide says isolation comes from the engine: each local loss reaches only its own module."""
    example = load_example("smoothed_greedy", "lla.methods.smoothed_greedy", monkeypatch)
    probe = grad_probe(example.SmoothedGreedy)
    torch.manual_seed(0)
    model = probe(lla.backbones.build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16,
                  optim={"lr": 0.05, "schedule": "constant", "warmup_epochs": 0})
    model.seen = []
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    trainer(max_steps=1).fit(model, DataLoader(data, batch_size=8))
    assert model.seen == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]


def test_add_a_method_split_family_table(tmp_path, monkeypatch):
    """The guide's K-label table block, added to a copy of the tables, registers the family and gives the splits it
    documents: the block is the only change besides the class (no list of families to edit)."""
    example = load_example("smoothed_greedy", "lla.methods.smoothed_greedy", monkeypatch)
    plain, tables = tmp_path / "plain", tmp_path / "tables"  # the tables as they are, and with the guide's block
    shutil.copytree(lla.splits.TABLE_DIR, plain)
    shutil.copytree(lla.splits.TABLE_DIR, tables)
    data = yaml.safe_load((tables / "resnet20.yaml").read_text())
    data["families"] = {**(data.get("families") or {}),
                        **yaml.safe_load((EXAMPLES / "resnet20_family.yaml").read_text())}
    (tables / "resnet20.yaml").write_text(yaml.safe_dump(data))

    class OwnTable(example.SmoothedGreedy):
        split_family = "smoothed_greedy"

    def make(k):
        return OwnTable(lla.backbones.build_backbone("resnet20", 10), k=k, num_classes=10, image_size=16)

    monkeypatch.setattr(lla.splits, "TABLE_DIR", plain)
    with pytest.raises(ConfigError, match="unknown split family 'smoothed_greedy'"):
        make(4)  # without its table block the family does not exist
    monkeypatch.setattr(lla.splits, "TABLE_DIR", tables)
    assert "smoothed_greedy" in lla.splits.families()
    for k in (4, 5):  # the table key and its alias
        model = make(k)
        assert model.split.boundaries == (3, 6, 8) and model.num_modules == 4
        assert model.split.k_label == k and model.split.source == "table:smoothed_greedy:4"
    assert make(3).split.source == "balanced"  # a K without a table entry


# ------------------------------------------------------------------------------------------------ add a dataset
def write_npz(folder: Path, n: int, size: int, seed: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = (rng.integers(0, 60, (n, size, size, 3)) + 60 * labels[:, None, None, None]).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / ("train.npz" if seed == 0 else "test.npz"), images=images, labels=labels)
    return images, labels


def test_add_a_dataset_example_trains_through_the_engine(tmp_path, monkeypatch):
    example = load_example("npz_folder", "lla.data.npz_folder", monkeypatch)
    monkeypatch.setattr(lla.data, "NpzFolderDataModule", example.NpzFolderDataModule, raising=False)
    root = tmp_path / "data"
    write_npz(root, 48, 16, seed=0)
    test_images, test_labels = write_npz(root, 24, 16, seed=1)
    overrides = ["dataset=npz_folder", f"dataset.root={root}", "dataset.image_size=16", "dataset.num_classes=4",
                 "dataset.batch_size=16", "method=dgl", "backbone=resnet20", "k=2"]
    cfg = compose_with(tmp_path, {"dataset/npz_folder.yaml": "docs/examples/npz_folder.yaml"}, overrides)
    assert cfg.trainer.max_epochs == 30 and cfg.optim.warmup_epochs == 5  # the dataset's recipe came with it
    dm, model = build(cfg)
    assert type(dm) is example.NpzFolderDataModule and model.num_classes == 4

    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 16, 16) and y.dtype == torch.int64
    # normalised as declared: de-normalising gives back the stored pixels (the test split is not augmented)
    expected = torch.from_numpy(test_images[:16]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(dm.denormalize(x), expected)
    assert torch.equal(y, torch.from_numpy(test_labels[:16]))

    before = snapshot(model)
    fit = trainer(max_steps=3, limit_val_batches=1)
    fit.fit(model, datamodule=dm)
    assert changed_modules(model, before) == [0, 1]
    assert "val/acc" in fit.callback_metrics

    missing = compose_with(tmp_path / "missing", {"dataset/npz_folder.yaml": "docs/examples/npz_folder.yaml"},
                           [*overrides, f"dataset.root={tmp_path / 'nowhere'}"])
    dm, _ = build(missing)
    with pytest.raises(ConfigError, match="dataset.root: .*train.npz not found"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------ add a backbone
@pytest.mark.parametrize("image_size", [16, 15])
def test_add_a_backbone_example_metadata_matches_its_forward(image_size, monkeypatch):
    example = load_example("plain_cnn", "lla.backbones.plain_cnn", monkeypatch)
    monkeypatch.setitem(lla.backbones.BACKBONES, "plaincnn7", example.plaincnn7)
    net = lla.backbones.build_backbone("plaincnn7", 10).eval()
    assert net.num_layers == 7 and net.stage_sizes == [2, 2, 2]
    h = torch.randn(2, 3, image_size, image_size)
    for i, layer in enumerate(net.layers):
        h = layer(h)
        assert h.shape[1:] == (net.specs[i].out_channels, net.spatial_size(i, image_size),
                               net.spatial_size(i, image_size)), f"layer {i}"
        fresh = net.make_block(net.specs[i].in_channels, net.specs[i].out_channels, net.specs[i].stride)
        assert fresh.state_dict().keys() == layer.state_dict().keys()


def test_add_a_backbone_example_trains_through_the_engine(tmp_path, monkeypatch):
    example = load_example("plain_cnn", "lla.backbones.plain_cnn", monkeypatch)
    monkeypatch.setitem(lla.backbones.BACKBONES, "plaincnn7", example.plaincnn7)
    # MAN with fresh copies exercises make_block; DGL+MAN sizes its heads from the specs.
    cfg = compose_with(tmp_path, {"backbone/plaincnn7.yaml": "docs/examples/plaincnn7.yaml"},
                       ["backbone=plaincnn7", "method=man", "method.base=dgl", "method.init_from_target=false",
                        "k=3", *SMALL_DATA])
    dm, model = build(cfg)
    assert model.backbone.name == "plaincnn7"
    assert model.split.boundaries == (1, 3) and model.split.source == "balanced"  # no table: balanced split
    before = snapshot(model)
    trainer(max_steps=3, limit_val_batches=1).fit(model, datamodule=dm)
    assert changed_modules(model, before) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ the site
POINTER = re.compile(r"docs/[\w/.-]+?\.md(?:#[\w-]+)?")
SKIP_DIRS = {".git", ".venv", "site", "outputs", "multirun", "data", "wandb", "lightning_logs", "__pycache__"}


def page_anchors(page: Path) -> set[str]:
    """Explicit ``{#id}`` anchors and mkdocs' default heading slugs of one docs page."""
    ids = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#+\s+(.*?)\s*(?:\{#([\w-]+)\})?\s*$", line)
        if m:
            ids.add(m[2] or re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", m[1].lower()).strip()))
    return ids


def test_docs_pointers_in_code_and_configs_resolve():
    """Every ``docs/<page>.md#<anchor>`` that code, tests, configs or the README cite names a page and an anchor that
    exist, so a renamed heading cannot leave a dangling citation behind."""
    checked, broken = 0, []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if set(rel.parts) & SKIP_DIRS or any(part.endswith(".egg-info") for part in rel.parts) or not path.is_file() or path.suffix not in {".py", ".yaml", ".md", ".toml", ""}:
            continue
        if rel.parts[0] == "docs" and path.suffix == ".md":
            continue  # the pages themselves: mkdocs --strict checks their links
        for pointer in POINTER.findall(path.read_text(encoding="utf-8", errors="replace")):
            page, _, anchor = pointer.partition("#")
            checked += 1
            if not (ROOT / page).is_file():
                broken.append(f"{rel}: {pointer} (no such page)")
            elif anchor and anchor not in page_anchors(ROOT / page):
                broken.append(f"{rel}: {pointer} (no such anchor)")
    assert checked > 0
    assert not broken, "\n".join(broken)


def test_mkdocs_build_strict(tmp_path):
    """Every page in the nav exists, every link and anchor resolves, every snippet file exists, the API pages
    render: `mkdocs build --strict` turns each of these into a failure."""
    pytest.importorskip("mkdocs", reason="docs tools are in the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("material", reason="mkdocs-material is in the dev extra")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings[python] is in the dev extra")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "methods" / "man" / "index.html").is_file()
    assert "SmoothedGreedy" in (tmp_path / "site" / "guides" / "add-a-method" / "index.html").read_text()
