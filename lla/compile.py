"""``compile=true``: :func:`torch.compile` applied to each local module and each aux net, never to the whole model
(docs/compile.md).

What is compiled, per model:

* each local module's forward (its backbone layers, one graph per module: :func:`module_runners`); the engine's
  ``run_module`` calls it, also for the modules a spanning loss (MLAAN's and HPFF's cascades) runs again, so those
  run compiled too;
* each aux net's forward (``model.aux[k]``), or, for an aux container that has no forward of its own (MLAAN's
  MLM head + LAM net), each of its parts; a rule's forward usually ends in its loss, so the loss is in the graph;
* the classifier head the last module's loss goes through.

Each graph gets its own forward and backward (AOTAutograd), so the engine still cuts the input of every module,
back-propagates each local loss on its own and steps each module's optimizer at once: gradient isolation and the
per-module schedule are exactly the eager ones. Weights, state-dict keys and checkpoints are unchanged
(``nn.Module.compile`` compiles a module in place; the module runners are plain functions held outside the state).

Shapes: compiled with ``dynamic=False`` by default, i.e. one static graph per input shape. An epoch's last, smaller
batch therefore compiles every graph once more (one recompile per graph for the whole run, cached after that).
``dynamic=true`` marks nothing static; ``dynamic=null`` is torch's automatic mode (static first, then dynamic on
the dimension that changed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lla import compat
from lla.errors import ConfigError

#: torch.compile's modes (``compile_mode``). ``reduce-overhead`` captures CUDA graphs on a GPU (a no-op on the CPU).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Each compiled callable may hold this many graphs (shapes x guards) before torch gives up and runs it eagerly.
#: Module runners share one code object, and so do aux nets of one class: K modules of a deep net need more than
#: torch's default of 8.
RECOMPILE_LIMIT = 256


def check_options(enabled: Any, mode: Any, dynamic: Any = False) -> None:
    """``error: compile...`` for a value that is not one of the allowed ones."""
    if not isinstance(enabled, bool):
        raise ConfigError("compile", f"must be true or false, got {enabled!r}", "true, false")
    if mode not in MODES:
        raise ConfigError("compile_mode", f"unknown torch.compile mode {mode!r}", ", ".join(MODES))
    if dynamic not in (True, False, None):
        raise ConfigError("compile_dynamic", f"must be true, false or null, got {dynamic!r}", "false, true, null")


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def compiled_parts(module: nn.Module) -> Iterator[nn.Module]:
    """The modules of an aux net that a method calls: the net itself if it has a forward, else (a plain container,
    e.g. MLAAN's MLM head + LAM net) each child that has one, recursively."""
    if _has_forward(module):
        yield module
        return
    for child in module.children():
        yield from compiled_parts(child)


def module_runners(model) -> list[Callable[[Tensor], Tensor]]:
    """One function per local module k: ``x -> layers of module k applied in order`` (what the engine's
    ``forward_module`` does eagerly), not yet compiled."""

    def runner(layers: tuple[nn.Module, ...]) -> Callable[[Tensor], Tensor]:
        def run_module(x: Tensor) -> Tensor:
            for layer in layers:
                x = layer(x)
            return x
        return run_module

    return [runner(tuple(model.backbone.layers[i] for i in model.module_layers(k))) for k in range(model.num_modules)]


def compile_model(model, mode: str = "default", dynamic: bool | None = False, fullgraph: bool = False):
    """Compile ``model`` (an :class:`lla.engine.LocalLearner`) per local module and per aux net, in place; returns
    it. Compilation itself happens lazily, at the first step that runs each graph (:func:`compile_time` reports it)."""
    check_options(True, mode, dynamic)
    compat.set_recompile_limit(RECOMPILE_LIMIT)
    options = {"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}
    model.compiled_modules = [torch.compile(run, **options) for run in module_runners(model)]
    parts = [part for aux in model.aux for part in compiled_parts(aux)]
    parts.append(model.backbone.head)
    for part in parts:
        part.compile(**options)
    model.compile_options = dict(options)
    return model


def is_compiled(model) -> bool:
    return getattr(model, "compiled_modules", None) is not None


@contextmanager
def count_compiles() -> Iterator[dict[str, float]]:
    """Count the graphs torch compiles inside the block and the seconds that took: ``{"graphs": n, "seconds": s}``
    (filled when the block exits). A recompile (new shape, failed guard) is one more graph."""
    out = {"graphs": 0, "seconds": 0.0}
    before = compat.compiled_graph_count()
    t0 = compat.compile_seconds()
    try:
        yield out
    finally:
        out["graphs"] = compat.compiled_graph_count() - before
        out["seconds"] = compat.compile_seconds() - t0


def timed_warmup(step: Callable[[], Any], steps: int = 2) -> dict[str, float]:
    """Run ``step`` ``steps`` times (the compile happens here) and return the compile figures: graphs, the
    seconds torch spent compiling, and the wall time of the whole warm-up."""
    t0 = time.perf_counter()
    with count_compiles() as c:
        for _ in range(steps):
            step()
    return {"graphs": c["graphs"], "compile_s": c["seconds"], "warmup_s": time.perf_counter() - t0}
