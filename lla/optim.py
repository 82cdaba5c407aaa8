"""One optimizer and one LR scheduler per local module, behind a single Lightning-facing optimizer.

Why a container: Lightning counts ``global_step`` (and so ``max_steps`` and logging intervals) as calls to
``LightningOptimizer.step``. With K separately registered optimizers a batch would count K steps. The engine steps
each module's own SGD the moment that module's last loss is back-propagated (``step_module``) and then calls the
container's ``step`` once per batch, which only ticks Lightning's counter. Checkpoints carry every module's optimizer
and scheduler state through the container's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lla.compat import foreach_mul_, fused_kernel_devices, steps_with_amp_scaling
from lla.errors import ConfigError
from lla.schedules import SCHEDULES, lr_factor


@dataclass
class OptimConfig:
    """SGD recipe shared by every reference script (docs/recipes.md#cifar-recipe): momentum 0.9, nesterov, wd 1e-4 on all parameters."""

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


CLIP_ALGORITHMS = ("norm", "value")


def check_clipping(value, algorithm) -> tuple[float | None, str]:
    """Validate ``trainer.gradient_clip_val`` / ``trainer.gradient_clip_algorithm``: (value or None, algorithm)."""
    algorithm = "norm" if algorithm is None else algorithm
    if algorithm not in CLIP_ALGORITHMS:
        raise ConfigError("trainer.gradient_clip_algorithm", f"unknown algorithm {algorithm!r}", ", ".join(CLIP_ALGORITHMS))
    if value is None:
        return None, algorithm
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ConfigError("trainer.gradient_clip_val", f"must be a finite number >= 0 or null, got {value!r}",
                          "null or 0 (off), or a positive float, e.g. 1.0")
    return (float(value) or None), algorithm


def _use_fused(requested: bool | None, params: Sequence[nn.Parameter]) -> bool:
    """The fused SGD kernel updates ~2x faster: K optimizers per batch run the per-parameter loop over all aux-net
    tensors too (~2% of a DGL step on CPU; on a GPU one launch per module instead of several per tensor). Same rule,
    but not the for-loop's bits: the kernel fuses the multiply-adds, so an update can differ in the last place, and
    small nets (BatchNorm1d over a few samples) grow that into visibly different weights over tens of steps.
    ``optim.fused=false`` gives torch's CPU for-loop. Auto: on where supported."""
    if requested is not None:
        return requested
    devices = fused_kernel_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


class _StateView(MutableMapping):
    """The container's ``state``: each parameter's entry is read from and written to the inner optimizer that owns
    the parameter (a missing one is created there, as in a real optimizer's ``defaultdict``)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self._optimizers = optimizers
        self._owner = {p: opt for opt in optimizers for g in opt.param_groups for p in g["params"]}

    def _owner_of(self, p) -> torch.optim.Optimizer:
        opt = self._owner.get(p)
        if opt is None:
            raise KeyError(p)
        return opt

    def __getitem__(self, p):
        return self._owner_of(p).state[p]

    def __setitem__(self, p, value) -> None:
        self._owner_of(p).state[p] = value

    def __delitem__(self, p) -> None:
        del self._owner_of(p).state[p]

    def __iter__(self) -> Iterator:
        return (p for opt in self._optimizers for p in opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


@steps_with_amp_scaling
class ModuleOptimizers(torch.optim.Optimizer):
    """K independent SGD optimizers (one per local module) with one LambdaLR each.

    A real ``torch.optim.Optimizer`` (its ``__init__`` runs, so step hooks, profiling and pickling work as for any
    optimizer) whose ``param_groups`` are the inner optimizers' groups, the same dicts: anything that reads or sets a
    group's LR through the container acts on the real optimizer; they are re-linked after ``load_state_dict``,
    which gives the inner optimizers new group dicts. ``state`` is the one remaining stand-in, a live view that
    reads and writes each parameter's entry in the inner optimizer owning it: the K optimizers cannot share one state
    dict, because each inner ``state_dict`` packs every key of its own ``state`` by its own parameter indices.
    """

    def __init__(self, module_params: Sequence[Sequence[nn.Parameter]], cfg: OptimConfig, epochs: int):
        self.cfg = cfg
        self.optimizers = [
            torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                            weight_decay=cfg.weight_decay, fused=_use_fused(cfg.fused, params))
            for params in module_params
        ]
        factor = lr_factor(cfg.schedule, cfg.lr, max(int(epochs), 1), cfg.warmup_epochs, cfg.warmup_start_lr)
        self.schedulers = [LambdaLR(opt, factor) for opt in self.optimizers]
        defaults = dict(self.optimizers[0].defaults) if self.optimizers else {}
        # the inner groups themselves (not copies), so both views share them; they already hold every default
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], defaults)
        self._link()
        self._stepped = [False] * len(self.optimizers)
        self.scaler: torch.amp.GradScaler | None = None  # use_scaler(), under precision=16-mixed
        self.clip_value, self.clip_algorithm = None, "norm"  # set_clipping()
        self._zero_momentum_buffers()

    def _link(self) -> None:
        """Point ``param_groups`` and ``state`` at the inner optimizers' current groups and states."""
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = _StateView(self.optimizers)  # type: ignore[assignment]

    # -- the torch.optim.Optimizer surface Lightning touches -------------------------------------------------
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
        self._link()
        self._zero_momentum_buffers()  # a checkpoint written before a module's first step has none

    def __repr__(self) -> str:
        return f"ModuleOptimizers({len(self.optimizers)} x SGD, schedule={self.cfg.schedule})"

    def use_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Unscale and inf-check each module's gradients with ``scaler`` before its step (precision=16-mixed).

        With the fused kernel (the default) ``scaler.step`` hands the kernel the scale and the inf flag as tensors:
        it unscales and skips an overflowing step on the device, without a host sync. The momentum buffers exist
        from the start (:meth:`_zero_momentum_buffers`), so a skipped first step leaves nothing uninitialised. With
        ``optim.fused=false`` the scaler reads the inf flag on the host, once per module step."""
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def set_clipping(self, value: float | None, algorithm: str | None = "norm") -> None:
        """Clip each module's gradients right before its own step: total 2-norm at most ``value`` (``"norm"``) or
        every element in [-value, value] (``"value"``); ``None``/0 turns clipping off."""
        self.clip_value, self.clip_algorithm = check_clipping(value, algorithm)

    def scale_grads(self, j: int, factor: float) -> None:
        """Multiply module j's gradients by ``factor`` in place (the mean of an accumulation window)."""
        grads = [p.grad for g in self.optimizers[j].param_groups for p in g["params"] if p.grad is not None]
        if grads:
            foreach_mul_(grads, factor)

    def _zero_momentum_buffers(self) -> None:
        """Create every missing momentum buffer as zeros. With dampening 0 the first step then computes
        ``buf = momentum * 0 + grad = grad``, torch's own first-step value, in every kernel; and the fused kernel,
        which otherwise allocates the buffers with ``empty_like`` and fills them in its first step, never meets an
        uninitialised buffer after a first step that the fp16 scaler skipped."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                if group["momentum"] == 0:
                    continue
                for p in group["params"]:
                    state = opt.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # -- per-module stepping ------------------------------------------------------------------------------------
    def step_module(self, j: int) -> None:
        """Update module j now and free its gradients (the gradient-memory half of the saving).

        Under fp16 the gradients are scaled: the scaler unscales them, and skips this module's update if they hold
        inf/NaN. Each module is checked on its own; the scale itself is updated once per batch (Lightning calls
        ``scaler.update()`` after the container's ``step``). Clipping (:meth:`set_clipping`) acts on the unscaled
        gradients, after any data-parallel averaging."""
        opt = self.optimizers[j]
        has_grads = any(p.grad is not None for g in opt.param_groups for p in g["params"])
        if self.clip_value and has_grads:
            if self.scaler is not None:
                self.scaler.unscale_(opt)  # on the device; the step below then skips an overflow the same way
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if self.clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, self.clip_value)
            else:
                torch.nn.utils.clip_grad_value_(params, self.clip_value)
        if self.scaler is not None and has_grads:
            self.scaler.step(opt)  # (it refuses an optimizer without gradients: nothing to check, nothing to do)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self._stepped[j] = True

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):  # type: ignore[override]
        """Once per batch: step any module not stepped yet (none, in the engine's loop) and reset the flags.

        ``@steps_with_amp_scaling``: GradScaler.step(container) hands itself to this method instead of unscaling the
        container, whose gradients are already unscaled, stepped and freed module by module, so there is nothing left
        to check (Lightning's MixedPrecision plugin reads the flag too and skips its own ``unscale_``)."""
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
