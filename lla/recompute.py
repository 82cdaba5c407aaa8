"""``method.aux_checkpoint``: store fewer aux-net activations, rebuild them in backward (docs/memory.md).

A local module's peak is its own activations plus its aux net's, both alive between forward and backward. Two ways
to shrink the aux net's share, picked by ``method.aux_checkpoint``:

* ``selective`` (what ``true`` means): keep what is dear to recompute (every conv's and linear's output, i.e. each
  BatchNorm's input) and rebuild what is cheap: each ``BN -> ReLU`` output is rebuilt in backward from the BN input and
  the batch statistics BN keeps anyway, where the op after it would otherwise store it (a conv, a global pool, an
  upsample; :mod:`lla.backbones.fused`). Residual blocks in aux nets (AugLocal's sampled blocks, MAN's and MLAAN's
  copies) run their ``bn1 -> relu -> conv2`` the same way. One extra elementwise pass per fused op; no convolution
  runs twice.
* ``full``: an aux net stores only the input of each *segment* (one conv-BN-ReLU run, one residual block); the
  rest, convolutions included, is recomputed, one segment at a time, while backward walks through it. The smallest
  peak (MAN's two block copies and MLAAN's LAM blocks shrink most), for one more aux forward per step.

Why the reentrant form of :func:`torch.utils.checkpoint.checkpoint`: its recompute runs under whatever saved-tensor
hooks are active, so ``lla-bench`` (:mod:`lla.bench.memory`) counts the recomputed tensors while they live instead
of hiding them; the reported peak is the honest one. Why the BN freeze: a recomputed BatchNorm would update its
running statistics a second time, so the recompute restores them; training with and without recompute gives the
same weights and the same running statistics (tests/test_recompute.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lla.backbones.fused import bn_relu, bn_relu_conv, set_fused_bn_relu
from lla.compat import BatchNorm, DropoutNd
from lla.errors import ConfigError

#: a segment ends after one of these (conv-BN-ReLU is one segment)
SEGMENT_ENDS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)
_BN = BatchNorm
#: method.aux_checkpoint values; ``true`` is :data:`BEST`, ``false`` stores everything
MODES = ("false", "true", "selective", "full")
BEST = "selective"


def checkpoint_mode(value) -> str | bool:
    """``False``, ``"selective"`` or ``"full"`` for a ``method.aux_checkpoint`` value (booleans keep their old meaning:
    ``false`` off, ``true`` the recommended form, :data:`BEST`)."""
    if isinstance(value, bool):
        return BEST if value else False
    if value == "false":
        return False
    if value == "true":
        return BEST
    if value in ("selective", "full"):
        return value
    raise ConfigError("method.aux_checkpoint", f"must be one of {', '.join(MODES)}, got {value!r}", ", ".join(MODES))


@contextmanager
def frozen_running_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run a recompute without moving any BatchNorm running statistics a second time.

    The recompute updates scratch copies; the originals are put back untouched afterwards. (Copying the old values
    back in place would bump the version of tensors the recomputed graph saved, and its backward would refuse.)"""
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [(bn, [getattr(bn, n) for n in names]) for m in modules for bn in m.modules()
             if isinstance(bn, _BN) and bn.training and bn.track_running_stats and bn.running_mean is not None]
    for bn, buffers in saved:
        for name, t in zip(names, buffers):
            setattr(bn, name, t.clone())
    try:
        yield
    finally:
        for bn, buffers in saved:
            for name, t in zip(names, buffers):
                setattr(bn, name, t)


class _Segment:
    """Callable over one tensor: the modules in order; a second (grad-enabled) call is the recompute."""

    __slots__ = ("modules",)

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = tuple(modules)

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # inside backward: the forward already updated BN statistics
            with frozen_running_stats(self.modules):
                return self._run(x)
        return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        for m in self.modules:
            x = m(x)
        return x


def run_segment(modules: nn.Module | Sequence[nn.Module], x: Tensor, enabled: bool | str) -> Tensor:
    """``modules(x)``, stored as only ``x`` when ``enabled`` (``True`` or ``"full"``) and a graph is being built;
    ``"selective"`` or ``False`` run it plainly (a block's own fused op is the selective form).

    Only feature maps are worth it: a segment on a flat (N, F) input (the MLP after global pooling) stores a few KB
    and would pay the recompute's fixed cost for nothing, so it runs plainly."""
    seq = (modules,) if isinstance(modules, nn.Module) else tuple(modules)
    if not (enabled in (True, "full") and torch.is_grad_enabled() and x.requires_grad and x.dim() >= 4):
        for m in seq:
            x = m(x)
        return x
    random = any(isinstance(sub, DropoutNd) and sub.p > 0 for m in seq for sub in m.modules())
    return checkpoint(_Segment(seq), x, use_reentrant=True, preserve_rng_state=random)


def split_segments(children: Sequence[nn.Module]) -> list[tuple[nn.Module, ...]]:
    """Group a chain's children: a run of ops ends after an activation; a composite child (a block) is alone."""
    out: list[tuple[nn.Module, ...]] = []
    run: list[nn.Module] = []
    for child in children:
        if next(child.children(), None) is not None:  # a block: its own segment
            if run:
                out.append(tuple(run))
                run = []
            out.append((child,))
            continue
        run.append(child)
        if isinstance(child, SEGMENT_ENDS):
            out.append(tuple(run))
            run = []
    if run:
        out.append(tuple(run))
    return out


def _global_pool(m: nn.Module) -> bool:
    size = m.output_size if isinstance(m, nn.AdaptiveAvgPool2d) else None
    return size == 1 or size in ((1, 1), [1, 1])


def selective_steps(children: Sequence[nn.Module]) -> list[tuple[nn.Module, ...]]:
    """A chain's children as steps: ``(bn, relu, conv)`` for each ``BN2d -> ReLU -> Conv2d`` (run fused: stores the BN
    input, not the ReLU output), ``(bn, relu)`` for a ``BN2d -> ReLU`` before an op that stores nothing of its input
    (a global average pool, an upsample; fused on its own), ``(module,)`` for everything else. Modules, not closures,
    so a deep copy of the chain steps its own modules."""
    out: list[tuple[nn.Module, ...]] = []
    i, n = 0, len(children)
    while i < n:
        bn, act = children[i], children[i + 1] if i + 1 < n else None
        after = children[i + 2] if i + 2 < n else None
        if type(bn) is nn.BatchNorm2d and type(act) is nn.ReLU:
            if type(after) is nn.Conv2d:
                out.append((bn, act, after))
                i += 3
                continue
            if _global_pool(after) or isinstance(after, nn.Upsample):
                out.append((bn, act))
                i += 2
                continue
        out.append((bn,))
        i += 1
    return out


def run_step(step: tuple[nn.Module, ...], x: Tensor) -> Tensor:
    """One :func:`selective_steps` step."""
    if len(step) == 3:
        return bn_relu_conv(x, step[0], step[2], True)
    if len(step) == 2:
        return bn_relu(x, step[0], True)
    return step[0](x)


class Chain(nn.Sequential):
    """``nn.Sequential`` for aux nets (same state-dict keys) that stores less when asked (``recompute``)."""

    recompute: bool | str = False  # False, "selective" or "full" (True: "full", the old meaning)
    _segments: list[tuple[nn.Module, ...]] | None = None
    _steps: list[tuple[nn.Module, ...]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.recompute and torch.is_grad_enabled()):
            return super().forward(x)
        if self.recompute == "selective":
            if self._steps is None:
                self._steps = selective_steps(list(self))
            for step in self._steps:
                x = run_step(step, x)
            return x
        if self._segments is None:  # the chain never changes after it is built: split it once
            self._segments = split_segments(list(self))
        for segment in self._segments:
            x = run_segment(segment, x, True)
        return x


def set_recompute(module: nn.Module, mode: bool | str) -> int:
    """Set the recompute mode (a ``method.aux_checkpoint`` value) on every aux part that has one (``recompute``
    attribute); ``selective`` also switches the fused ``bn1 -> relu -> conv2`` on in every residual block under
    ``module`` (turning it off is left to ``backbone.fused_bn_relu``, which block copies inherit). Returns how many."""
    mode = checkpoint_mode(mode)
    n = 0
    for m in module.modules():
        if hasattr(type(m), "recompute"):
            m.recompute = mode
            n += 1
    if mode == "selective":
        set_fused_bn_relu(module, True)
    return n
