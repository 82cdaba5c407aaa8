"""Multi-process data-parallel training for per-module local learning (``trainer=ddp``).

Why not Lightning's ``strategy=ddp``: DistributedDataParallel's reducer expects one backward per forward, while the
engine runs one backward per local module and steps each module as soon as its last loss is back-propagated.
:class:`LocalDDPStrategy` does everything DDP does *except* wrap the model: it starts the processes, builds the
process group and the distributed samplers, broadcasts rank 0's parameters and buffers at setup, and leaves gradient
averaging to the engine, module by module (:class:`ModuleGradSync`):

    backward_local(k) -> after_backward(k) -> start_grad_sync(j)      flatten module j's grads, async all-reduce
    ... the next module's forward (and backward) run while it is in flight ...
    reduce_module_grads(j) -> step_module(j)                           wait, unflatten, step

With every rank applying the same averaged gradients to the same weights, parameters stay bitwise equal across ranks,
and so do EMA copies (MAN, MLAAN), which are computed from parameters only (lla/ema.py).

Also here: a sync-BN layer that works where torch's ``SyncBatchNorm`` does not (CPU/gloo), and the popen launcher
that ties the ranks' lives to rank 0 (:class:`LocalLauncher`). The CPU benchmark of data parallelism and the process
launcher the tests use are in :mod:`lla.bench.ddp`.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from lla.compat import (
    BatchNorm,
    SubprocessScriptLauncher,
    call_children_scripts,
    flatten_dense_tensors,
    non_persistent_buffer_names,
    privateuse1_backend_name,
    set_strategy_launcher,
    set_strategy_layer_sync,
    strategy_launcher,
    strategy_layer_sync,
    unflatten_dense_tensors,
)
from lla.errors import ConfigError

#: devices on which torch's own SyncBatchNorm runs (its kernels are GPU-only); elsewhere AllReduceSyncBatchNorm
_TORCH_SYNC_BN_DEVICES = ("cuda", "xpu", "hpu", privateuse1_backend_name())


# ---------------------------------------------------------------------------------------------------- state sync
@torch.no_grad()
def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0, group=None) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values: one flattened broadcast per (device, dtype)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for group_tensors in by_kind.values():
        flat = flatten_dense_tensors(group_tensors)
        dist.broadcast(flat, src=src, group=group)
        for t, new in zip(group_tensors, unflatten_dense_tensors(flat, group_tensors)):
            t.copy_(new)


def persistent_buffers(module: nn.Module) -> Iterator[Tensor]:
    """Buffers a checkpoint carries (BN running stats), not scratch ones such as the engine's loss sums."""
    for mod in module.modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in non_persistent_buffer_names(mod):
                yield buf


def broadcast_module_states(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Make every rank hold rank ``src``'s parameters (EMA copies included) and persistent buffers."""
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    broadcast_tensors([*tensors, *persistent_buffers(module)], src=src)


# ---------------------------------------------------------------------------------------------------- grad sync
def _memory_order(t: Tensor) -> list[int]:
    """The dimension order in which ``t``'s elements lie in memory (outermost first): NCHW -> [0, 1, 2, 3], NHWC
    (channels_last) -> [0, 2, 3, 1]. ``t.permute(order)`` is then a contiguous view when ``t`` is dense."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def flatten_like_params(params: list[nn.Parameter]) -> Tensor:
    """One flat tensor of the parameters' gradients, each laid out in *its parameter's* memory order."""
    return torch.cat([p.grad.permute(_memory_order(p)).reshape(-1) for p in params])


def unflatten_like_params(flat: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """Views of ``flat`` (from :func:`flatten_like_params`) with each parameter's shape *and strides*.

    The optimizers need a gradient laid out like its weight: the fused SGD kernel walks both as flat arrays, so a
    contiguous gradient of a channels_last weight would add gradient element i to weight element j. Views keep the
    gradient memory single (the bucket is the only copy); a parameter that is not dense gets a copy."""
    out, offset = [], 0
    for p in params:
        n = p.numel()
        order = _memory_order(p)
        chunk = flat[offset:offset + n].view([p.shape[d] for d in order]).permute(
            sorted(range(p.dim()), key=order.__getitem__))
        if chunk.stride() != p.stride():  # overlapping or gapped parameter storage: no view can match it
            chunk = torch.empty_like(p).copy_(chunk)
        out.append(chunk)
        offset += n
    return out


def _buckets(params: list[nn.Parameter], cap_bytes: int) -> Iterator[list[nn.Parameter]]:
    """Consecutive runs of same-(device, dtype) parameters, each at most ``cap_bytes`` of gradient (or one tensor)."""
    bucket: list[nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if bucket and (size + nbytes > cap_bytes or (p.grad.device, p.grad.dtype) !=
                       (bucket[0].grad.device, bucket[0].grad.dtype)):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


class ModuleGradSync:
    """Averages one local module's gradients across ranks: flatten into buckets, async all-reduce, unflatten.

    ``launch(model, j)`` starts module j's all-reduce and returns at once; ``wait(model, j)`` blocks until it is done
    and puts the averaged gradients back in ``p.grad``: views of the reduced bucket with their parameters' strides
    (each gradient is flattened in its weight's memory order, so channels_last weights get channels_last gradients).
    While in flight, the module's ``p.grad`` are None: the bucket is the only copy, so gradient memory is not doubled.

    Assumes every rank back-propagates through the same parameters (true for every method here: the graphs do not
    depend on the data), so the buckets line up across ranks.
    """

    def __init__(self, world_size: int, bucket_cap_mb: float = 25.0, group=None):
        self.world_size = int(world_size)
        self.cap_bytes = max(1, int(bucket_cap_mb * 2**20))
        self.group = group
        self._params: dict[int, list[nn.Parameter]] = {}
        self._pending: dict[int, list[tuple[list[nn.Parameter], Tensor, Any]]] = {}

    def module_params(self, model, j: int) -> list[nn.Parameter]:
        if j not in self._params:  # the module's parameter set is fixed for a fit: look it up once
            self._params[j] = [p for p in model.module_parameters(j) if p.requires_grad]
        return self._params[j]

    @torch.no_grad()
    def launch(self, model, j: int) -> None:
        if j in self._pending:
            return
        jobs = []
        params = [p for p in self.module_params(model, j) if p.grad is not None]
        for bucket in _buckets(params, self.cap_bytes):
            # pre-divide: SUM of grad/W is the mean (gloo has no AVG op); /2, /4, /8 are exact in floating point
            flat = flatten_like_params(bucket).div_(self.world_size)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            for p in bucket:
                p.grad = None
            jobs.append((bucket, flat, work))
        self._pending[j] = jobs

    @torch.no_grad()
    def wait(self, model, j: int) -> None:
        if j not in self._pending:
            self.launch(model, j)
        for bucket, flat, work in self._pending.pop(j):
            work.wait()  # CUDA: the compute stream waits for the NCCL stream; the host does not block
            for p, g in zip(bucket, unflatten_like_params(flat, bucket)):
                p.grad = g

    @property
    def in_flight(self) -> list[int]:
        return sorted(self._pending)


# ---------------------------------------------------------------------------------------------------- sync BN
class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) with the matching backward (the gradient of a sum shared by all ranks is summed too)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks), on any device.

    Two differentiable all-reduces per layer (sum and count, then the centred sum of squares), so it is slower than
    torch's fused GPU SyncBatchNorm: :class:`LocalDDPStrategy` uses it only where that one cannot run (CPU).
    """

    reverts_to: type[BatchNorm] = nn.BatchNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        total = _SumAcrossRanks.apply(torch.cat([x.sum(dims), x.new_full((1,), x.numel() / channels)]))
        n = total[-1]
        mean = total[:channels] / n
        centred = x - mean.view(shape)
        var = _SumAcrossRanks.apply((centred * centred).sum(dims)) / n  # biased, as BatchNorm normalises with
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * (n / (n - 1)), m)  # unbiased, like BatchNorm's running_var
        return out


def _swap_batchnorm(module: nn.Module, convert: Callable[[BatchNorm], BatchNorm | None]) -> nn.Module:
    """Replace every BN child for which ``convert`` returns a module; parameters and buffers are shared, not copied."""
    for name, child in module.named_children():
        new = convert(child) if isinstance(child, BatchNorm) else None
        if new is None:
            _swap_batchnorm(child, convert)
            continue
        if child.affine:
            new.weight, new.bias = child.weight, child.bias
        if child.track_running_stats:
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
        new.train(child.training)
        setattr(module, name, new)
    return module


def _bn_args(bn: BatchNorm) -> tuple:
    return bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats


class AllReduceSyncBatchNorm(LayerSync):
    """Lightning layer-sync plugin: every BatchNorm becomes :class:`AllReduceBatchNorm` for the fit, then reverts."""

    def apply(self, model: nn.Module) -> nn.Module:
        def to_sync(bn: BatchNorm) -> BatchNorm | None:
            if isinstance(bn, (AllReduceBatchNorm, nn.SyncBatchNorm)):
                return None
            new = AllReduceBatchNorm(*_bn_args(bn))
            new.reverts_to = type(bn)
            return new

        return _swap_batchnorm(model, to_sync)

    def revert(self, model: nn.Module) -> nn.Module:
        def back(bn: BatchNorm) -> BatchNorm | None:
            return bn.reverts_to(*_bn_args(bn)) if isinstance(bn, AllReduceBatchNorm) else None

        return _swap_batchnorm(model, back)


# ---------------------------------------------------------------------------------------------------- strategy
def _is_comm_error(err: BaseException) -> bool:
    """Errors a surviving rank sees when a peer died: gloo's closed socket, NCCL's timeout/abort."""
    text = f"{type(err).__name__} {err}"
    return isinstance(err, dist.DistError) or any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "NCCL", "gloo", "Broken pipe", "timed out"))


#: set by a launching rank 0 for the ranks it starts (popen): their parent's pid
_LAUNCHER_PID_ENV = "LLA_LAUNCHER_PID"


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent (the launching rank 0) dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        return
    if os.getppid() != int(os.environ.get(_LAUNCHER_PID_ENV, "0")):  # it died before prctl took effect
        os._exit(1)


class LocalLauncher(SubprocessScriptLauncher):
    """Lightning's popen launcher (rank 0 re-runs the command once per other local rank), such that no process of
    the run outlives it:

    * each started rank is killed by the kernel as soon as rank 0's process ends, however it ends (kill -9, a
      second Ctrl-C): a rank whose peer is gone would otherwise wait in a collective for the whole timeout;
    * rank 0 waits for its ranks before it exits (and kills the ones still running after ``reap_timeout_s``);
    * a rank that fails (an exit code other than 0 or a signal stop's 143 / 130) gets the other ranks killed, and
      rank 0 too if it has not ended ``grace_s`` later (as Lightning's launcher does at once, before rank 0 could
      record the failure). A rank that stopped on a signal is not a failure: all ranks stop after the same batch
      (lla.checkpointing.Preemption) and rank 0 may still be saving; Lightning's launcher would kill it.
    """

    reap_timeout_s = 60.0
    poll_s = 1.0
    grace_s = 30.0

    def launch(self, function: Callable, *args: Any, trainer=None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            os.environ[_LAUNCHER_PID_ENV] = str(os.getpid())
            call_children_scripts(self)
            atexit.register(self.reap)
            threading.Thread(target=self._watch, name="lla-rank-watch", daemon=True).start()
        elif os.environ.get(_LAUNCHER_PID_ENV) == str(os.getppid()):
            _die_with_parent()
        if self.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:  # as Lightning's launcher does
            threads = max(1, (os.cpu_count() or 1) // self.num_processes)
            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)
        return function(*args, **kwargs)

    def _watch(self) -> None:
        from lla.checkpointing import EXIT_INTERRUPTED, EXIT_PREEMPTED

        procs = list(self.procs)
        while procs:
            time.sleep(self.poll_s)
            for p in [p for p in procs if p.poll() is not None]:
                procs.remove(p)
                if p.returncode not in (0, EXIT_PREEMPTED, EXIT_INTERRUPTED):
                    self.kill(signal.SIGKILL)
                    # rank 0 usually fails on its own at once (gloo: connection closed) and records the failure;
                    # an NCCL collective would wait for the whole timeout instead
                    time.sleep(self.grace_s)
                    print(f"lla: rank pid {p.pid} exited with code {p.returncode} {self.grace_s:.0f} s ago and "
                          "this process is still running: killing it", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)

    def reap(self) -> None:
        """At rank 0's exit: wait for the other ranks, kill the ones still running after ``reap_timeout_s``."""
        deadline = time.monotonic() + self.reap_timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class LocalDDPStrategy(DDPStrategy):
    """DDP processes and samplers without the DDP wrapper; gradients are averaged per local module by the engine.

    Args (besides Lightning's DDPStrategy ones):
        bucket_cap_mb: largest flattened all-reduce; a module with more gradient is sent in several buckets.
        timeout: seconds (or a timedelta) a collective may wait before the run fails; with NCCL this is how long a
            rank waits for a dead peer when nothing kills the job (SLURM: ``--kill-on-bad-exit``).
    DistributedDataParallel options (find_unused_parameters, static_graph, ...) do not apply and are rejected.
    """

    strategy_name = "local_ddp"

    def __init__(self, accelerator=None, parallel_devices=None, cluster_environment=None, checkpoint_io=None,
                 precision_plugin=None, process_group_backend: str | None = None,
                 timeout: timedelta | float | None = default_pg_timeout, start_method: str = "popen",
                 bucket_cap_mb: float = 25.0, **ddp_kwargs: Any):
        if ddp_kwargs:
            raise ConfigError("trainer.strategy", f"{sorted(ddp_kwargs)} are DistributedDataParallel options, but "
                              "LocalDDPStrategy does not wrap the model in DDP",
                              "process_group_backend, timeout, start_method, bucket_cap_mb")
        if not float(bucket_cap_mb) > 0:
            raise ConfigError("trainer.strategy.bucket_cap_mb", f"must be > 0, got {bucket_cap_mb}", "> 0, e.g. 25")
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=float(timeout))
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.grad_sync: ModuleGradSync | None = None

    def _configure_launcher(self) -> None:
        super()._configure_launcher()  # (a private hook of DDPStrategy; tests/test_compat.py checks it is called)
        if isinstance(strategy_launcher(self), SubprocessScriptLauncher):
            set_strategy_launcher(self, LocalLauncher(self.cluster_environment, self.num_processes, self.num_nodes))

    def setup(self, trainer) -> None:
        # torch's SyncBatchNorm raises on CPU; swap in the portable one so trainer.sync_batchnorm=true still works
        if isinstance(strategy_layer_sync(self), TorchSyncBatchNorm) and \
                self.root_device.type not in _TORCH_SYNC_BN_DEVICES:
            set_strategy_layer_sync(self, AllReduceSyncBatchNorm())
        super().setup(trainer)

    def configure_ddp(self) -> None:
        """Called by DDPStrategy.setup where it would wrap the model: start every rank equal instead."""
        broadcast_module_states(self.model)
        self.grad_sync = ModuleGradSync(self.world_size, self.bucket_cap_mb) if self.world_size > 1 else None

    def on_validation_start(self) -> None:
        # Without the wrapper's per-forward buffer broadcast, BN running stats drift apart per rank (each saw its own
        # shard). DDP semantics: rank 0's win, so all ranks evaluate the model the checkpoint holds.
        super().on_validation_start()
        self._align_buffers()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._align_buffers()

    def _align_buffers(self) -> None:
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            broadcast_module_states(self.lightning_module, buffers_only=True)

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return  # a stop every rank agreed on (lla.checkpointing.Preemption): each rank saves and exits itself
        try:
            rank, world = self.global_rank, self.world_size
        except Exception:  # failed before the ranks were known
            rank, world = 0, 1
        if world > 1:
            hint = (" (a collective failed: another rank probably died first; see its 'lla: rank' line)"
                    if _is_comm_error(exception) else "")
            print(f"lla: rank {rank}/{world} failed: {type(exception).__name__}: {exception}{hint}",
                  file=sys.stderr, flush=True)
        launcher = strategy_launcher(self)
        if isinstance(launcher, SubprocessScriptLauncher) and launcher.procs:
            # rank 0 launched the others (popen): kill them, or an NCCL peer would wait for the timeout
            launcher.kill(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)

    def teardown(self) -> None:
        self.grad_sync = None
        super().teardown()


for _name, _method in (("local_ddp", "popen"), ("local_ddp_spawn", "spawn")):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, LocalDDPStrategy, description="DDP processes without the DDP wrapper; "
                                  f"per-module gradient all-reduce (start_method={_method!r})", start_method=_method)
