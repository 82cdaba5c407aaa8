"""What the method tests share: a quiet CPU Trainer and a probe of which modules a local loss reaches."""

from __future__ import annotations

import lightning as L


def trainer(**kw) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar, summary or validation (overridable)."""
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    args.update(kw)
    return L.Trainer(**args)


def module_of_param(model) -> dict[int, int]:
    """id(parameter) -> the local module whose optimizer owns it."""
    return {id(p): k for k in range(model.num_modules) for p in model.module_parameters(k)}


def modules_with_grads(model) -> list[int]:
    """The modules that hold a gradient right now."""
    owner = module_of_param(model)
    return sorted({owner[id(p)] for p in model.parameters() if p.grad is not None})


def grad_probe(method_cls: type) -> type:
    """A subclass of ``method_cls`` that records, after each local backward (before anything steps),
    ``(k, modules holding gradients)`` in ``self.seen``: gradient isolation made observable."""

    class GradProbe(method_cls):
        def backward_local(self, k, loss):
            super().backward_local(k, loss)
            self.seen.append((k, modules_with_grads(self)))

    GradProbe.__name__ = GradProbe.__qualname__ = f"{method_cls.__name__}GradProbe"
    return GradProbe


def strip_bn(module):
    """Every BatchNorm replaced by Identity, in place: per-batch statistics break exact large-batch equalities
    (accumulation, data parallelism), so those checks use no BN at all."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_bn(child)
    return module
