"""method.mode=paper|reference: every switch the reference mode claims is set, paper keeps the defaults, an
explicit switch wins over the mode, and a bad mode is one ConfigError line (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from torch import nn

from lla.cli import CONF_DIR, build
from lla.errors import ConfigError
from lla.methods.modes import configuration, mode_table

ROOT = Path(__file__).resolve().parent.parent
ATTR = {"head": "head_kind"}  # switch -> attribute of the model, where the names differ

# (method, overrides of one configuration, the configuration key, the defaults before method.mode existed)
CASES = [
    ("man", ["dataset=cifar10", "backbone=resnet32", "k=16"], "cifar",
     {"init_from_target": True, "lambda_schedule": "stage_index", "learnable_scale": False}),
    ("man", ["dataset=imagenet", "backbone=resnet101", "k=2"], "imagenet",
     {"init_from_target": True, "lambda_schedule": "stage_index", "learnable_scale": False}),
    ("mlaan", ["dataset=cifar10", "backbone=resnet32", "k=8"], "cifar/dgl",
     {"cascade_span": 2, "update_all_ema": True, "early_losses": True, "final_x_loss": True,
      "lam_init_from_primary": True, "head": "man"}),
    ("mlaan", ["dataset=cifar10", "backbone=resnet32", "k=8", "method.base=infopro"], "cifar/infopro",
     {"cascade_span": 2, "update_all_ema": True, "early_losses": True, "final_x_loss": True,
      "lam_init_from_primary": True, "head": "1c2f"}),
    ("mlaan", ["dataset=imagenet", "backbone=resnet34", "k=16"], "imagenet/dgl",
     {"cascade_span": 2, "update_all_ema": True, "early_losses": True, "final_x_loss": True,
      "lam_init_from_primary": True, "head": "man"}),
    ("e2e", ["dataset=cifar10"], "cifar", {}),
    ("dgl", ["dataset=cifar10", "k=4"], "cifar", {}),
    ("infopro", ["dataset=cifar10", "k=4"], "cifar", {}),
    ("auglocal", ["dataset=cifar10", "k=16"], "cifar", {}),
]
IDS = [f"{m}-{c}" for m, _, c, _ in CASES]


def built(method, overrides, monkeypatch):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={method}", *overrides])
    monkeypatch.setattr(get_class(cfg.method._target_), "build_aux", lambda self, k: nn.Identity())
    with torch.device("meta"):
        return build(cfg)[1]


def value(model, switch):
    return getattr(model, ATTR.get(switch, switch))


@pytest.mark.parametrize("method,overrides,config,before", CASES, ids=IDS)
def test_reference_mode_sets_every_switch_it_claims(method, overrides, config, before, monkeypatch):
    model = built(method, [*overrides, "method.mode=reference"], monkeypatch)
    module = __import__(type(model).__module__, fromlist=["REFERENCE_MODE"])
    claimed = mode_table(module.REFERENCE_MODE, configuration(model.backbone, getattr(model, "base", None)))
    assert model.mode == "reference"
    if method in ("man", "mlaan"):
        assert claimed and set(claimed) <= set(before)  # the table for this configuration is not empty
    for switch, want in claimed.items():
        assert value(model, switch) == want, switch
    for switch in set(before) - set(claimed):  # what the official script's behaviour is not known for
        assert value(model, switch) == before[switch], switch


@pytest.mark.parametrize("method,overrides,config,before", CASES, ids=IDS)
def test_paper_mode_keeps_the_defaults(method, overrides, config, before, monkeypatch):
    for mode in ([], ["method.mode=paper"]):
        model = built(method, [*overrides, *mode], monkeypatch)
        assert model.mode == "paper"
        assert {s: value(model, s) for s in before} == before


def test_the_reference_tables_are_the_official_scripts(monkeypatch):
    man = built("man", ["dataset=cifar10", "backbone=resnet32", "k=16", "method.mode=reference"], monkeypatch)
    assert man.init_from_target is False  # the copies are re-drawn by the init loop
    cifar = built("mlaan", ["dataset=cifar10", "backbone=resnet32", "k=8", "method.mode=reference"], monkeypatch)
    assert (cifar.update_all_ema, cifar.early_losses, cifar.final_x_loss, cifar.head_kind) == \
        (False, False, False, "linear")  # resnetMLAAN.py
    assert cifar.first_loss == 1  # module 0 gets no loss of its own
    imagenet = built("mlaan", ["dataset=imagenet", "backbone=resnet34", "k=16", "method.mode=reference"], monkeypatch)
    assert (imagenet.cascade_span, imagenet.update_all_ema, imagenet.lam_init_from_primary, imagenet.first_loss) == \
        (3, True, False, 2)  # ImageNet resnet34.py


def test_an_explicit_switch_wins_over_the_mode(monkeypatch):
    run = ["dataset=cifar10", "backbone=resnet32", "k=8"]
    model = built("mlaan", [*run, "method.mode=reference", "method.update_all_ema=true", "method.head=man"],
                  monkeypatch)
    assert (model.update_all_ema, model.head_kind, model.early_losses) == (True, "man", False)
    model = built("mlaan", [*run, "method.early_losses=false"], monkeypatch)  # paper mode, one reference switch
    assert (model.early_losses, model.update_all_ema) == (False, True)
    man = built("man", [*run, "method.mode=reference", "method.init_from_target=true"], monkeypatch)
    assert man.init_from_target is True


@pytest.mark.parametrize("method", ["e2e", "dgl", "infopro", "auglocal", "man", "mlaan"])
def test_a_bad_mode_is_a_config_error(method, monkeypatch):
    with pytest.raises(ConfigError, match="method.mode"):
        built(method, ["dataset=cifar10", "k=4", "method.mode=official"], monkeypatch)


def test_a_bad_mode_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "run.py", "method=man", "method.mode=official", "logger=none"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: method.mode: unknown mode 'official'; allowed: paper, reference"], proc.stderr
