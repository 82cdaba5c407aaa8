"""``backbone.fused_bn_relu``: BN -> ReLU -> conv that keeps BN's input but not ReLU's output (issue 7).

Autograd stores both the BN input (for BN's backward) and the ReLU output (for ReLU's mask and the conv's weight
gradient) of every ``bn1 -> relu -> conv2`` inside a residual block. The ReLU output is a cheap elementwise function
of the BN input and the batch statistics BN already keeps, so this op stores only the BN input and rebuilds the ReLU
output in backward: one activation map less per block (a CIFAR BasicBlock stores 4 maps instead of 5) for one
extra elementwise pass, no extra convolution. Forward values and running statistics are BatchNorm's own.

The op runs only where it is exact and simple: a plain ``nn.BatchNorm2d`` in training mode with affine parameters
and running statistics, a zero-padded ``nn.Conv2d``, fp32/fp64 outside autocast. Anything else (eval mode,
SyncBatchNorm, bf16 autocast, no graph being built) takes the ordinary modules, so the switch is always safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lla.errors import ConfigError


def _bn_fusable(x: Tensor, bn: nn.Module) -> bool:
    return (torch.is_grad_enabled() and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
            and bn.track_running_stats and bn.running_mean is not None
            and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type))


def _fusable(x: Tensor, bn: nn.Module, conv: nn.Module) -> bool:
    return (_bn_fusable(x, bn) and type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def bn_relu_conv(x: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, fused: bool) -> Tensor:
    """``conv(relu(bn(x)))``; with ``fused`` (and where exact) without storing the ReLU output."""
    if fused and _fusable(x, bn, conv):
        return _BNReLUConv.apply(x, bn.weight, bn.bias, conv.weight, conv.bias, bn, conv)
    return conv(F.relu(bn(x), inplace=True))


def bn_relu(x: Tensor, bn: nn.BatchNorm2d, fused: bool) -> Tensor:
    """``relu(bn(x))``; with ``fused`` (and where exact) storing BN's input but not the ReLU output.

    Worth it only where the consumer does not store its input either (global average pooling, bilinear upsampling):
    a conv after it would store the ReLU output anyway, which is what :func:`bn_relu_conv` avoids."""
    if fused and _bn_fusable(x, bn):
        return _BNReLU.apply(x, bn.weight, bn.bias, bn)
    return F.relu(bn(x), inplace=True)


def set_fused_bn_relu(module: nn.Module, enabled: bool) -> bool:
    """Switch the fused op on every block under ``module`` that has one (class attribute ``fused_bn_relu``)."""
    if not isinstance(enabled, bool):
        raise ConfigError("backbone.fused_bn_relu", f"must be a boolean, got {enabled!r}", "true, false")
    for m in module.modules():
        if "fused_bn_relu" in vars(type(m)):
            m.fused_bn_relu = enabled
    return enabled


def _channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _batch_norm(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, bn: nn.BatchNorm2d):
    """Training-mode BatchNorm with BatchNorm's own update rule: momentum, or a cumulative average when momentum is
    None. Returns (output, batch mean, batch inverse std)."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return torch.native_batch_norm(x, bn_weight, bn_bias, bn.running_mean, bn.running_var, True, factor, bn.eps)


def _relu_of_bn(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, save_mean: Tensor, save_invstd: Tensor) -> Tensor:
    """Rebuild relu(bn(x)) from the batch statistics BN saved anyway (one elementwise pass)."""
    scale = save_invstd * bn_weight
    return torch.addcmul(_channel(bn_bias - save_mean * scale, x), x, _channel(scale, x)).relu_()


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, bn: nn.BatchNorm2d):
        y, save_mean, save_invstd = _batch_norm(x, bn_weight, bn_bias, bn)
        ctx.save_for_backward(x, bn_weight, bn_bias, save_mean, save_invstd)
        ctx.eps = bn.eps
        return y.relu_()

    @staticmethod
    def backward(ctx, grad_out):
        x, bn_weight, bn_bias, save_mean, save_invstd = ctx.saved_tensors
        r = _relu_of_bn(x, bn_weight, bn_bias, save_mean, save_invstd)
        grad_y = torch.ops.aten.threshold_backward(grad_out, r, 0)  # ReLU's own backward (masked_fill: 4x slower on CPU)
        del r
        grad_x, grad_bw, grad_bb = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, bn_weight, None, None, save_mean, save_invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_bw, grad_bb, None


class _BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, conv_weight, conv_bias, bn: nn.BatchNorm2d, conv: nn.Conv2d):
        y, save_mean, save_invstd = _batch_norm(x, bn_weight, bn_bias, bn)
        out = F.conv2d(y.relu_(), conv_weight, conv_bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.save_for_backward(x, bn_weight, bn_bias, conv_weight, save_mean, save_invstd)
        ctx.eps, ctx.has_bias = bn.eps, conv_bias is not None
        ctx.conv = (conv.stride, conv.padding, conv.dilation, conv.groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bn_weight, bn_bias, conv_weight, save_mean, save_invstd = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        r = _relu_of_bn(x, bn_weight, bn_bias, save_mean, save_invstd)
        need_x, need_w, need_b = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[1:3]), \
            ctx.needs_input_grad[3], ctx.has_bias and ctx.needs_input_grad[4]
        grad_r, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
            grad_out, r, conv_weight, [conv_weight.shape[0]] if ctx.has_bias else None, list(stride),
            list(padding), list(dilation), False, [0] * len(stride), groups, [need_x, need_w, need_b])
        grad_x = grad_bw = grad_bb = None
        if need_x:
            grad_y = torch.ops.aten.threshold_backward(grad_r, r, 0)  # ReLU's own backward (masked_fill: 4x slower)
            del r
            grad_x, grad_bw, grad_bb = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, bn_weight, None, None, save_mean, save_invstd, True, ctx.eps,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_bw, grad_bb, grad_cw, grad_cb, None, None
