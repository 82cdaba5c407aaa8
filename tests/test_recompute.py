"""method.aux_checkpoint (lla.recompute): same training, fewer stored activations, BN statistics moved once; the
selective form (what ``true`` means) stores conv outputs and runs no convolution twice, the full form recomputes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lla.aux.dgl import dgl_head
from lla.aux.infopro import cifar_decoder, cifar_head
from lla.backbones import build_backbone
from lla.bench.memory import TrainingMemoryMeter
from lla.bench.runner import BenchConfig, run_config
from lla.errors import ConfigError
from lla.memory import SavedTensorMeter
from lla.methods.auglocal import AugLocal
from lla.methods.dgl import DGL
from lla.methods.infopro import InfoPro
from lla.methods.man import MAN
from lla.methods.mlaan import MLAAN
from lla.recompute import Chain, checkpoint_mode, run_segment, selective_steps, set_recompute, split_segments
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


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("name", list(METHODS))
def test_aux_checkpoint_trains_exactly_like_storing(name, mode):
    """Weights, EMA copies and BN running statistics after 3 steps equal the stored-activation run (float64)."""
    stored, recomputed = fit(make(name, False)), fit(make(name, mode))
    assert recomputed.aux_checkpoint == mode and recomputed.describe()["aux_checkpoint"] == mode
    a, b = stored.state_dict(), recomputed.state_dict()
    assert a.keys() == b.keys()
    start = make(name, False).state_dict()
    assert any(not torch.equal(start[key], a[key]) for key in a)  # training moved something
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-12, atol=1e-12), key


def test_aux_checkpoint_values():
    assert [checkpoint_mode(v) for v in (False, "false", True, "true", "selective", "full")] == \
        [False, False, "selective", "selective", "selective", "full"]
    assert make("dgl", True).aux_checkpoint == "selective"  # true: the cheap form (docs/memory.md)
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="aux_checkpoint.*allowed: false, true, selective, full"):
            make("dgl", bad)


def aux_backward_flops(name, mode):
    """FLOPs per op in the backward of module 0's aux loss alone (forward outside the count): a forward conv
    recomputed in backward shows up as ``convolution``."""
    model = make(name, mode).train()
    h = torch.randn(8, 16, 16, 16, dtype=torch.float64, requires_grad=True)
    y, x01 = torch.randint(0, 10, (8,)), torch.rand(8, 3, 16, 16, dtype=torch.float64)
    aux = getattr(model.aux[0], "lam", model.aux[0])  # MLAAN: its cascaded LAM path
    loss = torch.nn.functional.cross_entropy(aux(h), y) if isinstance(aux, Chain) else aux(h, y, x01)  # AugLocal
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("name", ["infopro", "man-infopro", "mlaan-dgl", "auglocal"])
def test_selective_recomputes_no_convolution_full_does(name):
    """The point of selective: its backward does the plain backward's conv/matmul work and no more (the saved conv
    outputs are reused; only ReLU outputs are rebuilt, elementwise), where the full recompute runs every aux conv a
    second time."""
    plain, selective, full = (aux_backward_flops(name, mode) for mode in (False, "selective", "full"))
    assert "convolution" not in plain and "convolution" not in selective
    assert selective == plain
    assert full["convolution"] > 0 and full["convolution_backward"] == plain["convolution_backward"]


def test_selective_chain_stores_bn_inputs_but_no_relu_outputs():
    """Exact saved bytes: selective = plain minus each fused BN -> ReLU output; the conv outputs stay stored."""
    torch.manual_seed(0)
    chains = [cifar_decoder(16, 16), cifar_head("2c2f", 16, 16, 10)]
    steps = [selective_steps(list(c)) for c in chains]
    assert [[len(s) for s in st] for st in steps] == [[1, 1, 3], [1, 3, 2, 1, 1, 1, 1, 1]]  # BN-ReLU-conv, BN-ReLU-GAP
    x = torch.randn(8, 16, 16, 16, requires_grad=True)

    def saved(mode):
        for chain in chains:
            set_recompute(chain, mode)
        params = [t for c in chains for t in (*c.parameters(), *c.buffers())]  # weights, not activations
        with SavedTensorMeter(exclude=params) as meter:
            outs = [c(x) for c in chains]
            live = meter.live_bytes
            sum(o.sum() for o in outs).backward()
        return live, meter.live_bytes

    plain, _ = saved(False)
    selective, after = saved("selective")
    # decoder: ReLU output 8x12x16x16; head: first ReLU output 8x32x8x8 (before conv2), second (before GAP) too
    fused_relu_outputs = 4 * 8 * (12 * 16 * 16 + 32 * 8 * 8 + 32 * 8 * 8)
    assert plain - selective == fused_relu_outputs
    assert after == 0


def test_selective_switches_aux_blocks_to_fused_bn_relu_only():
    model = make("man-infopro", "selective")
    assert all(b.fused_bn_relu for a in model.aux for b in a.modules() if hasattr(type(b), "fused_bn_relu"))
    assert not any(b.fused_bn_relu for b in model.backbone.modules() if hasattr(type(b), "fused_bn_relu"))


@pytest.mark.parametrize("method,options,k,selective,full", [
    ("man", (("base", "infopro"), *SMALL_K.items()), 4, 0.9, 0.75),  # two block copies per aux net: the big win
    ("mlaan", (), 4, 0.8, 0.7),                                      # LAM blocks
    ("auglocal", (("depth", 2),), 10, 0.93, 0.9),                    # sampled blocks, 8 single-layer modules
    ("infopro", (), 4, 0.93, 0.95),                                  # decoder + head; the module itself dominates
])
def test_aux_checkpoint_lowers_the_measured_peak(method, options, k, selective, full):
    """Measured by lla-bench's meter (saved-tensor hooks, recomputed tensors counted while they live). Measured ratios
    at this size: man 0.88 / 0.68, mlaan 0.79 / 0.67, auglocal 0.92 / 0.86, infopro 0.92 / 0.93 (selective / full;
    InfoPro's full recompute briefly holds a whole recomputed segment, so selective ends lower)."""
    rows = {mode: run_config(BenchConfig(method, "resnet20", k, 8, 16, options + (("aux_checkpoint", mode),)),
                             steps=1, warmup=0, device="cpu") for mode in (False, "selective", "full")}
    assert rows["selective"]["options"]["aux_checkpoint"] == "selective"
    plain = rows[False]["peak_activation_bytes"]
    assert rows["selective"]["peak_activation_bytes"] < selective * plain
    assert rows["full"]["peak_activation_bytes"] < full * plain
    assert all(r["carried_activation_bytes"] == 0 for r in rows.values())
