"""Training-memory accounting: parameters + gradients + optimizer state + saved activations (issue 7).

Pure functions over tensors and numbers, so the arithmetic is testable without a Trainer. Each storage counts once:
views, tied weights and tensors shared between optimizer state and parameters are not double-counted.

The lower bound is what *any* implementation of the method must hold at one moment: every parameter, the optimizer
state, and the activations (aux net included) of the single most expensive local module. The measured peak adds
the gradients in flight and whatever an earlier module left alive; ``peak / lower bound`` is therefore the
engine's overhead over the ideal of freeing each module's graph and gradients right after its step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

MIB = 2**20  # the reference figures (issue 7, docs/splits.md#tables) are MiB: ResNet-32 E2E saves 159,150,724 B = 151.8 MiB


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    seen: dict = {}
    for t in tensors:
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            continue
        st = t.untyped_storage()
        seen[(t.device.type, t.device.index, st.data_ptr())] = st.nbytes()
    return sum(n for key, n in seen.items() if key[2] != 0)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Weights the model keeps resident: every parameter (EMA copies included) and every buffer (BN statistics)."""
    return storage_bytes([*module.parameters(), *module.buffers()])


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (SGD momentum buffers); ``ModuleOptimizers.state`` merges every module's."""
    tensors: list[Tensor] = []
    for state in optimizer.state.values():
        if isinstance(state, Mapping):
            tensors.extend(v for v in state.values() if isinstance(v, Tensor))
    return storage_bytes(tensors)


def module_grad_bytes(model) -> list[int]:
    """Gradient bytes of each local module's trainable parameters (layers + aux + head), in module order."""
    out = []
    for k in range(model.num_modules):
        out.append(storage_bytes([p for p in model.module_parameters(k) if p.requires_grad]))
    return out


def largest_span_grad_bytes(per_module: list[int], spans: list[int]) -> int:
    """The most gradient bytes one local loss must hold at once: the modules it reaches (k-span+1..k).

    For isolated methods (span 1) this is the largest module's gradients; a cascade (MLAAN) legitimately keeps
    the modules its loss spans un-stepped until that loss is back-propagated.
    """
    return max(sum(per_module[max(0, k - s + 1):k + 1]) for k, s in enumerate(spans))


def lower_bound_bytes(param_bytes: int, optimizer_bytes: int, largest_module_activation: int) -> int:
    """Parameters + optimizer state + the largest single module's activations with its aux net."""
    return int(param_bytes) + int(optimizer_bytes) + int(largest_module_activation)


def peak_total_bytes(param_bytes: int, optimizer_bytes: int, peak_saved_plus_grads: int) -> int:
    """The accounting peak: resident weights and state plus the joint peak of activations and gradients."""
    return int(param_bytes) + int(optimizer_bytes) + int(peak_saved_plus_grads)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return float(numerator) / float(denominator)


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else float(nbytes) / MIB
