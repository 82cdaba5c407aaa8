"""method.aux_checkpoint (lla.recompute): same training, fewer stored activations, BN statistics moved once."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lla.aux.dgl import dgl_head
from lla.aux.infopro import cifar_decoder
from lla.backbones import build_backbone
from lla.bench.memory import TrainingMemoryMeter
from lla.bench.runner import BenchConfig, run_config
from lla.errors import ConfigError
from lla.methods.auglocal import AugLocal
from lla.methods.dgl import DGL
from lla.methods.infopro import InfoPro
from lla.methods.man import MAN
from lla.methods.mlaan import MLAAN
from lla.recompute import Chain, run_segment, split_segments
from tests.helpers import trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}
SMALL_K = {"lambda_schedule": "module_index", "ixx_2": 1.0, "ixy_2": 1.0}  # MAN's stage schedule needs K >= 8

METHODS = {
    "dgl": (DGL, {}),
    "infopro": (InfoPro, {}),
    "auglocal": (AugLocal, {"depth": 2}),
    "man-infopro": (MAN, {"base": "infopro", **SMALL_K}),
    "man-dgl": (MAN, {"base": "dgl"}),
    "mlaan-dgl": (MLAAN, {"base": "dgl"}),
    "mlaan-infopro": (MLAAN, {"base": "infopro", "cascade_span": 3, **SMALL_K}),
}


def to01(x):
    return (x * 0.25 + 0.5).clamp(0, 1)


def make(name, aux_checkpoint):
    cls, kw = METHODS[name]
    torch.manual_seed(0)
    model = cls(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=16, optim=CONST, max_epochs=1,
                denormalize=to01, aux_checkpoint=aux_checkpoint, **kw)
    return model.double()


def fit(model, steps=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * 8, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (steps * 8,), generator=g)
    trainer(max_steps=steps).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    return model


def test_chain_segments_end_after_activations_and_keep_blocks_whole():
    head = dgl_head("official", 16, 16, 10)
    segments = split_segments(list(head))
    # pool+conv+bn+relu, conv+bn+relu x2, pool+flatten+linear+bn+relu, linear+bn+relu x2, the last linear
    assert [len(s) for s in segments] == [4, 3, 3, 5, 3, 3, 1]
    assert all(isinstance(s[-1], nn.ReLU) for s in segments[:-1])
    block = build_backbone("resnet20", 10).layers[3]
    pool, flat, fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
    assert split_segments([pool, block, flat, fc]) == [(pool,), (block,), (flat, fc)]


def test_chain_state_dict_keys_equal_sequential():
    torch.manual_seed(0)
    chain = cifar_decoder(16, 16)
    assert isinstance(chain, Chain)
    plain = nn.Sequential(*list(chain))
    assert list(chain.state_dict()) == list(plain.state_dict())


def test_run_segment_stores_only_its_input_and_restores_bn_stats():
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    params = list(seg.parameters())
    with TrainingMemoryMeter(exclude=params) as plain_meter:
        seg(x).sum().backward()
    g_plain = [p.grad.clone() for p in params]
    stats_after_one = seg[1].running_mean.clone()
    for p in params:
        p.grad = None
    seg[1].reset_running_stats()
    with TrainingMemoryMeter(exclude=params) as meter:
        out = run_segment(list(seg), x, True)
        stored = meter.live_bytes
        out.sum().backward()
    assert stored == x.numel() * 4  # only the input: conv/BN/ReLU tensors are recomputed in backward
    maps = 3 * x.numel() * 4  # stored: x, the BN input and the ReLU output (+ BN's per-channel mean and invstd)
    assert maps <= plain_meter.peak_bytes < maps + 100
    assert meter.peak_bytes >= plain_meter.peak_bytes  # the recompute is counted while it lives (honest peak)
    assert all(torch.allclose(p.grad, g) for p, g in zip(params, g_plain))
    assert torch.equal(seg[1].running_mean, stats_after_one) and int(seg[1].num_batches_tracked) == 1


@pytest.mark.parametrize("name", list(METHODS))
def test_aux_checkpoint_trains_exactly_like_storing(name):
    """Weights, EMA copies and BN running statistics after 3 steps equal the stored-activation run (float64)."""
    stored, recomputed = fit(make(name, False)), fit(make(name, True))
    assert recomputed.aux_checkpoint and recomputed.describe()["aux_checkpoint"]
    a, b = stored.state_dict(), recomputed.state_dict()
    assert a.keys() == b.keys()
    start = make(name, False).state_dict()
    assert any(not torch.equal(start[key], a[key]) for key in a)  # training moved something
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-9, atol=1e-11), key


def test_aux_checkpoint_must_be_boolean():
    with pytest.raises(ConfigError, match="aux_checkpoint"):
        make("dgl", "yes")


@pytest.mark.parametrize("method,options,k,limit", [
    ("man", (("base", "infopro"), *SMALL_K.items()), 4, 0.75),  # two block copies per aux net: the big win
    ("mlaan", (), 4, 0.75),                                     # LAM blocks
    ("auglocal", (("depth", 2),), 10, 0.9),                     # sampled blocks, 8 single-layer modules
    ("infopro", (), 4, 0.95),                                   # decoder + head; the module itself dominates
])
def test_aux_checkpoint_lowers_the_measured_peak(method, options, k, limit):
    stored, recomputed = [run_config(BenchConfig(method, "resnet20", k, 8, 16, options + extra), steps=1, warmup=0,
                                     device="cpu") for extra in ((), (("aux_checkpoint", True),))]
    assert recomputed["options"]["aux_checkpoint"] is True
    assert recomputed["peak_activation_bytes"] < limit * stored["peak_activation_bytes"]
    assert recomputed["carried_activation_bytes"] == 0
