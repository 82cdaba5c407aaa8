"""Learning-rate schedules as small pure functions of the epoch (docs/recipes.md#cifar-recipe, docs/recipes.md#imagenet-recipes).

They are stepped once per epoch, exactly like the reference scripts' ``--cos_lr``; a LambdaLR multiplies the base
LR by ``lr_at(epoch) / base_lr``.
"""

from __future__ import annotations

import math

from lla.errors import ConfigError

SCHEDULES = ("warmup_cosine", "cosine", "constant")


def warmup_cosine_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int = 10,
                     warmup_start_lr: float = 0.01) -> float:
    """CIFAR-family ``--cos_lr`` (docs/recipes.md#cifar-recipe) for 1-based ``epoch``.

    ``cos(e) = 0.5*lr0*(1+cos(pi*e/E))``; for e <= W the LR blends linearly from ``warmup_start_lr`` (exactly 0.01 at
    e=1 with the papers' W=10) into the cosine: ``cos(e)*(e-1)/W + start*(W+1-e)/W``.
    """
    cos = 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))
    if warmup_epochs > 0 and epoch <= warmup_epochs:
        w = warmup_epochs
        return cos * (epoch - 1) / w + warmup_start_lr * (w + 1 - epoch) / w
    return cos


def cosine_lr(epoch: int, base_lr: float, epochs: int) -> float:
    """ImageNet schedule (docs/recipes.md#imagenet-recipes) for 0-based ``epoch``: ``0.5*lr0*(1+cos(pi*e/E))``, no warm-up."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))


def lr_factor(schedule: str, base_lr: float, epochs: int, warmup_epochs: int = 10,
              warmup_start_lr: float = 0.01):
    """Return ``f(epoch_index) -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR`` (epoch_index 0-based)."""
    if schedule == "warmup_cosine":
        return lambda i: warmup_cosine_lr(i + 1, base_lr, epochs, warmup_epochs, warmup_start_lr) / base_lr
    if schedule == "cosine":
        return lambda i: cosine_lr(i, base_lr, epochs) / base_lr
    if schedule == "constant":
        return lambda i: 1.0
    raise ConfigError("optim.schedule", f"unknown schedule {schedule!r}", ", ".join(SCHEDULES))
