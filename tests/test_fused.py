"""backbone.fused_bn_relu (lla.backbones.fused): same values and gradients, one stored map less per block; the
standalone BN -> ReLU op (used by method.aux_checkpoint=selective before a global pool or an upsample) likewise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lla.backbones import build_backbone
from lla.backbones.cifar_resnet import CifarBasicBlock
from lla.backbones.fused import bn_relu, bn_relu_conv, set_fused_bn_relu
from lla.backbones.imagenet_resnet import BasicBlock, Bottleneck
from lla.bench.memory import SavedTensorMeter
from lla.errors import ConfigError


def pair(block: nn.Module):
    """(plain, fused) copies of one block with non-trivial BN affine parameters, in float64."""
    torch.manual_seed(0)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    plain = block.double().train()
    fused = copy.deepcopy(plain)
    set_fused_bn_relu(fused, True)
    return plain, fused


BLOCKS = {
    "cifar-basic": lambda: CifarBasicBlock(8, 8),
    "cifar-basic-stride2": lambda: CifarBasicBlock(8, 16, stride=2),
    "imagenet-basic": lambda: BasicBlock(8, 8),
    "bottleneck": lambda: Bottleneck(16, 32, stride=2),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_fused_block_equals_plain_block(name):
    plain, fused = pair(BLOCKS[name]())
    x = torch.randn(4, plain.conv1.in_channels, 8, 8, dtype=torch.float64)
    grads = []
    for block in (plain, fused):
        xi = x.clone().requires_grad_()
        out = block(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    assert torch.allclose(o1, o2, atol=1e-12)
    assert torch.allclose(gx1, gx2, atol=1e-10)
    for n in gp1:
        assert torch.allclose(gp1[n], gp2[n], atol=1e-10), n
    for (n, b1), b2 in zip(plain.named_buffers(), fused.buffers()):  # running statistics moved identically
        assert torch.allclose(b1, b2, atol=1e-14), n


def test_cumulative_average_bn_matches():
    plain, fused = pair(CifarBasicBlock(4, 4))
    for block in (plain, fused):
        block.bn1.momentum = None
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        plain(x).sum().backward()
        fused(x).sum().backward()
    assert torch.allclose(plain.bn1.running_mean, fused.bn1.running_mean, atol=1e-14)
    assert int(fused.bn1.num_batches_tracked) == 3


def test_fused_block_stores_one_map_less():
    """CIFAR BasicBlock: x, BN1 input, ReLU1 output, BN2 input, block output = 5 maps; fused: ReLU1's is gone."""
    torch.manual_seed(0)
    n, c, s = 8, 16, 16
    map_bytes = n * c * s * s * 4
    stored = {}
    for fused in (False, True):
        block = CifarBasicBlock(c, c)
        set_fused_bn_relu(block, fused)
        x = torch.randn(n, c, s, s, requires_grad=True)
        with SavedTensorMeter(exclude=[*block.parameters(), *block.buffers()]) as meter:
            out = block(x)
            stored[fused] = meter.live_bytes
            out.sum().backward()
    assert 5 * map_bytes <= stored[False] < 5 * map_bytes + 1024
    assert 4 * map_bytes <= stored[True] < 4 * map_bytes + 1024


def test_fused_bn_relu_alone_equals_plain_and_stores_only_the_bn_input():
    """relu(bn(x)) before a global average pool: plain stores BN's input and ReLU's output, fused only BN's input;
    values, gradients and running statistics are BatchNorm's and ReLU's own (float64)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).double()
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.3, 0.3)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    results = {}
    for fused in (False, True):
        layer = copy.deepcopy(bn)
        xi = x.clone().requires_grad_()
        with SavedTensorMeter(exclude=[*layer.parameters(), *layer.buffers()]) as meter:
            out = bn_relu(xi, layer, fused)
            stored = meter.live_bytes
            (out.mean((2, 3)) * w).sum().backward()
        assert ("BNReLU" in out.grad_fn.name()) == fused
        results[fused] = (out.detach(), xi.grad, layer.weight.grad, layer.bias.grad, layer.running_var, stored)
    for a, b in zip(results[False][:5], results[True][:5]):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-14)
    map_bytes = x.numel() * 8
    assert results[False][5] - results[True][5] == map_bytes  # the ReLU output (BN's batch statistics: both)
    assert map_bytes <= results[True][5] < map_bytes + 256


def test_falls_back_where_not_exact():
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bn_relu_conv(x, bn, conv, True).grad_fn.name() != "_BNReLUConvBackward"
    bn.eval()
    assert bn_relu_conv(x, bn, conv, True).grad_fn.name() != "_BNReLUConvBackward"
    bn.train()
    assert "BNReLUConv" in bn_relu_conv(x, bn, conv, True).grad_fn.name()
    sync = nn.SyncBatchNorm(4)
    assert "BNReLUConv" not in bn_relu_conv(x, sync, conv, True).grad_fn.name()
    assert "BNReLU" not in bn_relu(x, sync, True).grad_fn.name()
    bn.eval()
    assert "BNReLU" not in bn_relu(x, bn, True).grad_fn.name()


def test_backbone_option_reaches_every_block_and_copies():
    net = build_backbone("resnet20", 10, fused_bn_relu=True)
    blocks = [m for m in net.modules() if isinstance(m, CifarBasicBlock)]
    assert blocks and all(b.fused_bn_relu for b in blocks)
    assert net.make_block(16, 32, 2).fused_bn_relu  # AugLocal's aux blocks
    assert copy.deepcopy(blocks[0]).fused_bn_relu  # MAN's / MLAAN's copies
    assert not build_backbone("resnet20", 10).layers[1].fused_bn_relu
    assert build_backbone("resnet18", 10, fused_bn_relu=True).layers[1].fused_bn_relu
    with pytest.raises(ConfigError, match="fused_bn_relu"):
        build_backbone("resnet20", 10, fused_bn_relu="yes")
