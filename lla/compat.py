"""Every private torch, Lightning and Hydra name lla relies on, in one place.

Each use is one small named function or constant here, and ``tests/test_compat.py`` checks each of them against the
installed versions, so an upgrade that renames or changes one fails there with the version in the message instead of
somewhere inside a training run. Code elsewhere in ``lla`` imports these names, never the private ones.

Checked with torch 2.14, lightning 2.6, hydra-core 1.3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------------- torch
#: Base class of every BatchNorm (1d/2d/3d, SyncBatchNorm): ``torch.nn.modules.batchnorm._BatchNorm``. lla's portable
#: SyncBN derives from it (so it is a BatchNorm wherever torch checks), and BN layers are found by ``isinstance``.
BatchNorm: type[nn.Module] = nn.modules.batchnorm._BatchNorm

#: Base class of Dropout/Dropout1d/2d/3d: ``torch.nn.modules.dropout._DropoutNd`` (recompute saves the RNG only
#: where a segment draws random numbers).
DropoutNd: type[nn.Module] = nn.modules.dropout._DropoutNd

#: In-place multi-tensor ops (one kernel launch per list): ``torch._foreach_mul_``, ``torch._foreach_copy_``,
#: ``torch._foreach_lerp_``. torch's own optimizers use them; they have no public alias.
foreach_mul_ = torch._foreach_mul_
foreach_copy_ = torch._foreach_copy_
foreach_lerp_ = torch._foreach_lerp_


def fused_kernel_devices() -> tuple[str, ...]:
    """Device types with torch's fused optimizer kernels (``fused=True``):
    ``torch.utils._foreach_utils._get_fused_kernels_supported_devices``."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return tuple(_get_fused_kernels_supported_devices())


def privateuse1_backend_name() -> str:
    """The name a PrivateUse1 accelerator backend registered (``"privateuseone"`` by default):
    ``torch._C._get_privateuse1_backend_name``."""
    return torch._C._get_privateuse1_backend_name()


def flatten_dense_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat 1-D tensor holding ``tensors`` back to back: ``torch._utils._flatten_dense_tensors``."""
    from torch._utils import _flatten_dense_tensors

    return _flatten_dense_tensors(tensors)


def unflatten_dense_tensors(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``tensors`` (the inverse of :func:`flatten_dense_tensors`):
    ``torch._utils._unflatten_dense_tensors``."""
    from torch._utils import _unflatten_dense_tensors

    return list(_unflatten_dense_tensors(flat, tensors))


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s own buffers registered with ``persistent=False`` (not in its state_dict):
    ``nn.Module._non_persistent_buffers_set``."""
    return module._non_persistent_buffers_set


def steps_with_amp_scaling(cls: type) -> type:
    """Class decorator: mark an optimizer whose ``step`` handles the fp16 GradScaler itself. ``GradScaler.step``
    and Lightning's MixedPrecision plugin read ``optimizer._step_supports_amp_scaling`` and then skip their own
    ``unscale_`` / inf check and hand the optimizer to ``step`` directly."""
    cls._step_supports_amp_scaling = True
    return cls


def set_recompile_limit(n: int) -> None:
    """Let each compiled function hold up to ``n`` graphs before torch falls back to eager
    (``torch._dynamo.config.recompile_limit``; never lowers it)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(int(n), dynamo_config.recompile_limit)


def compiled_graph_count() -> int:
    """How many graphs torch.compile has captured in this process so far, recompiles included
    (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cudagraph_skips() -> int:
    """How many compiled graphs Inductor ran without CUDA graphs under ``mode="reduce-overhead"`` (dynamic shapes,
    CPU tensors, mutated inputs, ...): ``torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]``."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


#: ``torch._dynamo.utils.compilation_time_metrics`` entries that together are the compile time of a graph: the
#: forward (Dynamo + AOTAutograd + Inductor) and the backward, which is compiled at its first call.
COMPILE_TIME_KEYS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far (forward and backward graphs), from
    ``torch._dynamo.utils.compilation_time_metrics``."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(compilation_time_metrics.get(key, ())) for key in COMPILE_TIME_KEYS))


# ------------------------------------------------------------------------------------------------------- lightning
def __getattr__(name: str) -> Any:
    # ``SubprocessScriptLauncher``: Lightning's popen launcher (rank 0 re-runs the command once per other local
    # rank), ``start_method="popen"`` of DDPStrategy: ``lightning.pytorch.strategies.launchers._SubprocessScriptLauncher``.
    # lla's LocalLauncher derives from it. Imported on first use, so that importing this module stays cheap.
    if name == "SubprocessScriptLauncher":
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        return _SubprocessScriptLauncher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def call_children_scripts(launcher: Any) -> None:
    """Start the other local ranks (``SubprocessScriptLauncher._call_children_scripts``); fills ``launcher.procs``."""
    launcher._call_children_scripts()


def strategy_launcher(strategy: Any) -> Any:
    """The launcher a strategy configured (``Strategy._launcher``), or None."""
    return getattr(strategy, "_launcher", None)


def set_strategy_launcher(strategy: Any, launcher: Any) -> None:
    """Replace the launcher ``DDPStrategy._configure_launcher`` chose (``Strategy._launcher``). Call it from an
    override of ``_configure_launcher``, after the base class's."""
    strategy._launcher = launcher


def strategy_layer_sync(strategy: Any) -> Any:
    """The strategy's SyncBatchNorm plugin (``ParallelStrategy._layer_sync``: set from ``trainer.sync_batchnorm``)."""
    return strategy._layer_sync


def set_strategy_layer_sync(strategy: Any, layer_sync: Any) -> None:
    """Replace the SyncBatchNorm plugin before ``DDPStrategy.setup`` applies it (``ParallelStrategy._layer_sync``)."""
    strategy._layer_sync = layer_sync


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``LightningModule._trainer``; the public
    ``module.trainer`` raises when there is none)."""
    return module._trainer


def fit_data_fetcher(trainer: Any) -> Any:
    """The fit loop's training-data fetcher (``FitLoop._data_fetcher``), or None before ``FitLoop.setup_data``.
    ``iter()`` on it rebuilds the training iterators."""
    return getattr(trainer.fit_loop, "_data_fetcher", None)


def disable_sigterm_broadcast(trainer: Any) -> bool:
    """Stop Lightning from broadcasting its SIGTERM flag from rank 0 before every training batch
    (``_TrainingEpochLoop._broadcast_sigterm_tensor``, a collective plus a host read). True if it was there."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        return False
    epoch_loop._broadcast_sigterm_tensor = lambda: None
    return True


def request_sigterm_stop(trainer: Any) -> bool:
    """Make Lightning stop as it does on SIGTERM (a ``SIGTERMException`` once the running batch is accounted for)
    by setting ``trainer._signal_connector.received_sigterm``. False if that flag is not there."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "received_sigterm"):
        return False
    connector.received_sigterm = True
    return True


def logger_experiment_started(logger: Any) -> bool:
    """Whether a Lightning logger (CSV, W&B, ...) has created its experiment yet (``logger._experiment``)."""
    return getattr(logger, "_experiment", None) is not None


def started_experiment(logger: Any) -> Any:
    """A Lightning logger's experiment if it exists already, else None, without creating one
    (``logger._experiment``)."""
    return getattr(logger, "_experiment", None)


def wandb_init_kwargs(logger: Any) -> dict | None:
    """The keyword arguments Lightning's WandbLogger will pass to ``wandb.init`` (``WandbLogger._wandb_init``),
    or None for another logger."""
    init = getattr(logger, "_wandb_init", None)
    return init if isinstance(init, dict) else None


# ----------------------------------------------------------------------------------------------------------- hydra
def hydra_args_parser():
    """Hydra's own command-line parser (the flags ``@hydra.main`` accepts): ``hydra._internal.utils.get_args_parser``."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()
