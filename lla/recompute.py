"""``method.aux_checkpoint``: recompute aux-net activations in backward instead of storing them (issue 7).

A local module's peak is its own activations plus its aux net's, both alive between forward and backward. With
recompute on, an aux net stores only the input of each *segment* (one conv-BN-ReLU run, one residual block); the
rest is recomputed, one segment at a time, while backward walks through it. MAN's two block copies, MLAAN's LAM
blocks and AugLocal's sampled blocks are whole-block segments, so those methods gain most.

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

from lla.compat import BatchNorm, DropoutNd

#: a segment ends after one of these (conv-BN-ReLU is one segment)
SEGMENT_ENDS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)
_BN = BatchNorm


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


def run_segment(modules: nn.Module | Sequence[nn.Module], x: Tensor, enabled: bool) -> Tensor:
    """``modules(x)``, stored as only ``x`` when ``enabled`` and a graph is being built.

    Only feature maps are worth it: a segment on a flat (N, F) input (the MLP after global pooling) stores a few KB
    and would pay the recompute's fixed cost for nothing, so it runs plainly."""
    seq = (modules,) if isinstance(modules, nn.Module) else tuple(modules)
    if not (enabled and torch.is_grad_enabled() and x.requires_grad and x.dim() >= 4):
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


class Chain(nn.Sequential):
    """``nn.Sequential`` for aux nets (same state-dict keys) that recomputes segment by segment when asked."""

    recompute: bool = False
    _segments: list[tuple[nn.Module, ...]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.recompute and torch.is_grad_enabled()):
            return super().forward(x)
        if self._segments is None:  # the chain never changes after it is built: split it once
            self._segments = split_segments(list(self))
        for segment in self._segments:
            x = run_segment(segment, x, True)
        return x


def set_recompute(module: nn.Module, enabled: bool) -> int:
    """Switch recompute on every aux part that supports it (``recompute`` attribute); returns how many."""
    n = 0
    for m in module.modules():
        if hasattr(type(m), "recompute"):
            m.recompute = bool(enabled)
            n += 1
    return n
