"""One optimizer and one LR scheduler per local module, behind a single Lightning-facing optimizer.

Why a container: Lightning counts ``global_step`` (and so ``max_steps`` and logging intervals) as calls to
``LightningOptimizer.step``. With K separately registered optimizers a batch would count K steps. The engine steps
each module's own SGD the moment that module's last loss is back-propagated (``step_module``) and then calls the
container's ``step`` once per batch, which only ticks Lightning's counter. Checkpoints carry every module's optimizer
and scheduler state through the container's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lla.errors import ConfigError
from lla.schedules import SCHEDULES, lr_factor


@dataclass
class OptimConfig:
    """SGD recipe shared by every reference script (§6.1): momentum 0.9, nesterov, wd 1e-4 on all parameters."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "warmup_cosine"
    warmup_epochs: int = 10
    warmup_start_lr: float = 0.01
    fused: bool | None = None  # one-kernel SGD update; None = wherever torch has the kernel (see _use_fused)

    def validate(self) -> None:
        if self.fused is not None and not isinstance(self.fused, bool):
            raise ConfigError("optim.fused", f"must be true, false or null, got {self.fused!r}", "true, false, null")
        if not self.lr > 0:
            raise ConfigError("optim.lr", f"must be > 0, got {self.lr}", "a positive float, e.g. 0.1")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"must be >= 0, got {self.weight_decay}", ">= 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError("optim.momentum", f"SGD momentum must be in [0, 1), got {self.momentum}", "[0, 1)")
        if self.schedule not in SCHEDULES:
            raise ConfigError("optim.schedule", f"unknown schedule {self.schedule!r}", ", ".join(SCHEDULES))
        if self.warmup_epochs < 0:
            raise ConfigError("optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}", ">= 0")


def _use_fused(requested: bool | None, params: Sequence[nn.Parameter]) -> bool:
    """The fused SGD kernel updates ~2x faster: K optimizers per batch run the per-parameter loop over all aux-net
    tensors too (~2% of a DGL step on CPU; on a GPU one launch per module instead of several per tensor). Same rule,
    but not the for-loop's bits: the kernel fuses the multiply-adds, so an update can differ in the last place, and
    small nets (BatchNorm1d over a few samples) grow that into visibly different weights over tens of steps.
    ``optim.fused=false`` gives torch's CPU for-loop. Auto: on where supported."""
    if requested is not None:
        return requested
    devices = _fused_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def _fused_devices() -> tuple[str, ...]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return tuple(_get_fused_kernels_supported_devices())


class ModuleOptimizers(torch.optim.Optimizer):
    """K independent SGD optimizers (one per local module) with one LambdaLR each.

    ``param_groups`` is the concatenation of the inner groups (the same dicts), so anything that reads or sets a
    group's LR through the container acts on the real optimizer.
    """

    def __init__(self, module_params: Sequence[Sequence[nn.Parameter]], cfg: OptimConfig, epochs: int):
        # Deliberately not calling Optimizer.__init__: this object owns no parameters of its own.
        self.cfg = cfg
        self.optimizers = [
            torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                            weight_decay=cfg.weight_decay, fused=_use_fused(cfg.fused, params))
            for params in module_params
        ]
        factor = lr_factor(cfg.schedule, cfg.lr, max(int(epochs), 1), cfg.warmup_epochs, cfg.warmup_start_lr)
        self.schedulers = [LambdaLR(opt, factor) for opt in self.optimizers]
        self.defaults = dict(self.optimizers[0].defaults) if self.optimizers else {}
        self._stepped = [False] * len(self.optimizers)
        self.scaler: torch.amp.GradScaler | None = None  # use_scaler(), under precision=16-mixed
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    # -- the torch.optim.Optimizer surface Lightning touches -------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return [g for opt in self.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:  # Optimizer internals may assign; the inner optimizers own the groups.
        pass

    @property
    def state(self) -> dict:  # type: ignore[override]
        merged: dict = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["optimizers"]) != len(self.optimizers):
            raise ConfigError("ckpt_path", f"checkpoint has {len(state_dict['optimizers'])} module optimizers, "
                              f"this run has {len(self.optimizers)}", "a checkpoint of the same method, backbone and K")
        for opt, sd in zip(self.optimizers, state_dict["optimizers"]):
            fused = opt.defaults["fused"]
            opt.load_state_dict(sd)
            for group in opt.param_groups:  # the kernel is this run's choice, not the checkpoint's
                group["fused"] = fused
        for sch, sd in zip(self.schedulers, state_dict.get("schedulers", [])):
            sch.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"ModuleOptimizers({len(self.optimizers)} x SGD, schedule={self.cfg.schedule})"

    def use_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Unscale and inf-check each module's gradients with ``scaler`` before its step (precision=16-mixed).

        Also turns the fused kernel off: torch's fused SGD allocates momentum buffers with ``empty_like`` and fills
        them in its first step, so a first step the scaler skips (inf gradients, common at the initial scale)
        leaves them uninitialised and the next step adds garbage to the weights."""
        self.scaler = scaler
        if scaler is not None and scaler.is_enabled():
            for opt in self.optimizers:
                opt.defaults["fused"] = opt._step_supports_amp_scaling = False
                for group in opt.param_groups:
                    group["fused"] = False

    # -- per-module stepping ------------------------------------------------------------------------------------
    def step_module(self, j: int) -> None:
        """Update module j now and free its gradients (the gradient-memory half of the saving).

        Under fp16 the gradients are scaled: the scaler unscales them, and skips this module's update if they hold
        inf/NaN. Each module is checked on its own; the scale itself is updated once per batch (Lightning calls
        ``scaler.update()`` after the container's ``step``)."""
        opt = self.optimizers[j]
        if self.scaler is not None and any(p.grad is not None for g in opt.param_groups for p in g["params"]):
            self.scaler.step(opt)  # (it refuses an optimizer without gradients: nothing to check, nothing to do)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self._stepped[j] = True

    # GradScaler.step(container) hands itself to step() instead of unscaling the container: its gradients are
    # already unscaled, stepped and freed module by module, so there is nothing left to check (lightning's
    # MixedPrecision plugin reads this flag too, and skips its own unscale_).
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):  # type: ignore[override]
        """Once per batch: step any module not stepped yet (none, in the engine's loop) and reset the flags."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for j, done in enumerate(self._stepped):
            if not done:
                self.step_module(j)
        self._stepped = [False] * len(self.optimizers)
        return loss

    def step_schedulers(self) -> None:
        for sch in self.schedulers:
            sch.step()

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]
