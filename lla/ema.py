"""The one EMA helper used by MAN and MLAAN (docs/methods/man.md#ema-copies, docs/methods/mlaan.md).

Parameters only: BN running statistics are *not* averaged, as in the reference code; an EMA copy keeps its own
running stats from its own train-mode forwards (never used at inference, since evaluation ignores aux nets).
"""

from __future__ import annotations

import torch
from torch import nn

from lla.compat import foreach_copy_, foreach_lerp_
from lla.errors import ConfigError


def check_momentum(momentum: float, key: str = "method.ema_momentum") -> float:
    """Reject momenta outside [0, 1] (1 freezes the EMA, 0 copies the target every step)."""
    if not 0.0 <= float(momentum) <= 1.0:
        raise ConfigError(key, f"EMA momentum must be in [0, 1], got {momentum}", "0 <= m <= 1 (papers: 0.995)")
    return float(momentum)


def make_ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module``: same weights now, no gradients ever."""
    import copy

    ema = copy.deepcopy(module)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, target: nn.Module, momentum: float) -> None:
    """``theta_ema <- m * theta_ema + (1 - m) * theta_target`` in place, over ``parameters()`` only."""
    ema_params = list(ema.parameters())
    target_params = [p.detach() for p in target.parameters()]
    if momentum == 1.0:
        return
    if momentum == 0.0:
        foreach_copy_(ema_params, target_params)
        return
    foreach_lerp_(ema_params, target_params, 1.0 - momentum)
