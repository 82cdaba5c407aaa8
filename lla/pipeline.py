"""Module-parallel training (``trainer=pipeline``): the K local modules split into N contiguous stages, one process
(and one device) per stage, all training at the same time (docs/pipeline.md).

Gradient isolation means module k never waits for a gradient from a later module, so stage s can run batch t+1
while stage s+1 still runs batch t::

    stage 0:  read batch t -> modules [0, b1) step as the engine does -> isend (h, y[, x]) to stage 1
    stage s:  irecv batch t from stage s-1 -> modules [b_s, b_s+1) step -> isend to stage s+1
    stage N-1: irecv -> its modules, the last one with the classifier

Each stage runs the engine's own ``training_step`` over its modules only (:class:`PipelineStage` is the engine's
``receive``/``send`` hook), so module k at batch t sees exactly the input it sees in one process (module k-1's output
of batch t, computed before module k-1's step): the weights equal single-process training's (tests/test_pipeline.py).

Transport: torch.distributed point-to-point (gloo on CPU, NCCL on GPU) on a group of its own, at most
``depth`` sends in flight per stage (a stage waits for the send of batch t-depth before it sends batch t), and the
receive of batch t+1 posted before batch t is computed. Stages > 0 read no images: their train loader yields only
each batch's size (:class:`BatchSizes`), so Lightning runs the same batch count on every stage.

Every process holds the whole model (same weights at setup: rank 0's are broadcast); each stage trains and steps only
its own modules. Before validation and before every checkpoint, each stage broadcasts its modules' weights, buffers,
momentum buffers and loss sums (:meth:`PipelineStrategy.gather_state`): every process then holds the current full
model, validation runs on the full backbone, and the checkpoint rank 0 writes is an ordinary one (``mode=eval`` and a
single-process resume load it unchanged).

MAN: module k's EMA copy follows the first block of module k+1. Where that block is on the next stage, the next stage
sends the block's weights back after each of its steps, and the EMA update of step t reads the weights after step
``t - 1 - depth`` (one process: after step t-1): a fixed delay of ``depth`` steps (:class:`WeightsBack`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lla.compat import disable_sigterm_broadcast, non_persistent_buffer_names
from lla.distributed import LocalDDPStrategy, broadcast_module_states, broadcast_tensors
from lla.errors import ConfigError

log = logging.getLogger("lla")

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.int8, torch.int16, torch.bool]
_HEADER = 3 * 7  # per message tensor (h, y, x): present, dtype code, ndim, 4 per-sample dims


# ---------------------------------------------------------------------------------------------------- boundaries
def balance(costs: Sequence[float], stages: int) -> list[int]:
    """First module of each of ``stages`` contiguous groups of ``costs`` (one per module), minimising the largest
    group's total: the classic linear-partition DP, O(stages * K^2)."""
    K, n = len(costs), int(stages)
    if not 1 <= n <= K:
        raise ValueError(f"cannot split {K} modules into {n} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    best = [[inf] * (K + 1) for _ in range(n + 1)]  # best[j][i]: first i modules in j stages
    cut = [[0] * (K + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for i in range(j, K + 1):
            for m in range(j - 1, i):  # the last stage holds modules m..i-1
                v = max(best[j - 1][m], prefix[i] - prefix[m])
                if v < best[j][i] - 1e-12:
                    best[j][i], cut[j][i] = v, m
    firsts, i = [], K
    for j in range(n, 0, -1):
        i = cut[j][i]
        firsts.append(i)
    return firsts[::-1]


def check_boundaries(firsts: Any, num_modules: int, stages: int) -> list[int]:
    """``trainer.stage_boundaries``: the first module index of every stage, e.g. ``[0, 8]`` for 2 stages."""
    allowed = f"{stages} increasing module indices starting at 0, each < {num_modules} (the first module of each stage)"
    try:
        firsts = [int(v) for v in firsts]
    except (TypeError, ValueError):
        raise ConfigError("trainer.stage_boundaries", f"must be a list of module indices, got {firsts!r}",
                          allowed) from None
    if len(firsts) != stages or firsts[0] != 0 or any(b <= a for a, b in zip(firsts, firsts[1:])) \
            or firsts[-1] >= num_modules:
        raise ConfigError("trainer.stage_boundaries", f"{firsts} does not split {num_modules} modules into "
                          f"{stages} stages", allowed)
    return firsts


def check_pipelinable(model, stages: int, firsts: Sequence[int] | None = None) -> None:
    """One-line errors for what cannot be pipelined: one module (E2E), more stages than modules, a loss whose
    gradient would cross a stage boundary (MLAAN's cascade), a bad boundary list."""
    K = model.num_modules
    name = type(model).__name__
    if K < 2:
        raise ConfigError("trainer", f"trainer=pipeline needs at least 2 local modules; {name} has {K} (E2E "
                          "back-propagates through the whole network: nothing to split)",
                          "a local method (dgl, infopro, auglocal, man) with k >= 2, or trainer=cpu/gpu/ddp")
    if stages < 2 or stages > K:
        raise ConfigError("trainer.devices", f"trainer=pipeline with {stages} stages and {K} local modules",
                          f"2..{K} (one stage per process, at least one module each)")
    if firsts is not None:
        check_boundaries(firsts, K, stages)
    for k in range(K):
        if model.span(k) > 1:
            raise ConfigError("method", f"trainer=pipeline cannot run {name}: its loss {k} reaches back into module "
                              f"{k - model.span(k) + 1} (span {model.span(k)}), a gradient that would cross a stage "
                              "boundary", "a strictly local method (dgl, infopro, auglocal, man), or trainer=cpu/gpu/ddp")


def stage_modules(firsts: Sequence[int], num_modules: int, stage: int) -> range:
    ends = [*firsts[1:], num_modules]
    return range(firsts[stage], ends[stage])


def stage_submodules(model, modules: range) -> list[nn.Module]:
    """The submodules a stage owns: its modules' backbone layers, their aux nets, and the classifier if last."""
    K = model.num_modules
    subs: list[nn.Module] = []
    for k in modules:
        subs += [model.backbone.layers[i] for i in model.module_layers(k)]
        subs.append(model.aux[k] if k < K - 1 else model.backbone.head)
    return subs


def stage_tensors(model, modules: range, optimizer=None) -> list[Tensor]:
    """Everything a stage changes while it trains: its parameters (EMA copies too), persistent buffers (BN running
    stats), the momentum buffers of its modules' optimizers and its per-module loss sums."""
    params: dict[int, Tensor] = {}
    for sub in stage_submodules(model, modules):
        for p in sub.parameters():
            params.setdefault(id(p), p.data)
    for k in modules:
        for p in model.extra_module_parameters(k):
            params.setdefault(id(p), p.data)
    out = list(params.values())
    for sub in stage_submodules(model, modules):
        for mod in sub.modules():
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None and name not in non_persistent_buffer_names(mod):
                    out.append(buf)
    if optimizer is not None and hasattr(optimizer, "optimizers"):
        for k in modules:
            opt = optimizer.optimizers[k]
            for group in opt.param_groups:
                for p in group["params"]:
                    buf = opt.state.get(p, {}).get("momentum_buffer") if p in opt.state else None
                    if buf is not None:
                        out.append(buf)
    loss_sum = getattr(model, "_loss_sum", None)
    if isinstance(loss_sum, Tensor) and loss_sum.numel() == model.num_modules:
        out.append(loss_sum[modules.start:modules.stop])
    return out


def measure_module_costs(model, batch_size: int, steps: int = 5) -> list[float]:
    """Seconds of forward + local loss + backward of each module on a random batch: the fastest of ``steps`` passes
    (the least disturbed by other work on a shared machine). The model's weights and BN statistics are restored
    afterwards and its gradients dropped."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = model
    was_training = probe.training
    probe.train()
    param = next(probe.parameters())
    channels = probe.backbone.specs[0].in_channels
    size = probe.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, channels, size, size, generator=g).to(param.device, param.dtype)
    y = torch.randint(0, probe.num_classes, (batch_size,), generator=g).to(param.device)
    batch = (x, y)
    K = probe.num_modules
    times: list[list[float]] = [[] for _ in range(K)]
    for _ in range(steps):
        h = x
        for k in range(K):
            sync = param.device.type == "cuda"
            if sync:
                torch.cuda.synchronize(param.device)
            t0 = time.perf_counter()
            h = probe.forward_module(k, h.detach())
            loss = probe.final_loss(h, batch) if k == K - 1 else probe.local_loss(k, h, batch)
            loss.backward()
            if sync:
                torch.cuda.synchronize(param.device)
            times[k].append(time.perf_counter() - t0)
        probe._x01_cache = None
        probe.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.load_state_dict(saved)
    model.train(was_training)
    return [min(t) for t in times]


# ---------------------------------------------------------------------------------------------------- data
class BatchSizes(Dataset):
    """Stages > 0: a "loader" of the real one's batch sizes; each item is ``(empty (B, 0) tensor,)``."""

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> tuple[Tensor]:
        return (torch.zeros(self.sizes[i], 0),)


def batch_sizes(loader) -> list[int] | None:
    """The sizes of a train loader's batches in one epoch (indices only: no image is loaded)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None:
        return [len(b) for b in batch_sampler]
    sampler, size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None)
    if sampler is None or not isinstance(size, int) or getattr(loader, "drop_last", False):
        return None
    n = len(sampler)  # lla's on-device loaders: a sampler and a batch size, the last batch short
    return [size] * (n // size) + ([n % size] if n % size else [])


def whole_data_set(loader) -> None:
    """A loader that shards itself by rank (lla's on-device loaders read the Trainer's rank and world size): every
    stage walks the whole data set, as one process does."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "rank") and hasattr(sampler, "world"):
        sampler.rank, sampler.world = 0, 1


# ---------------------------------------------------------------------------------------------------- transport
def _encode(tensors: Sequence[Tensor | None]) -> Tensor:
    header = torch.zeros(_HEADER, dtype=torch.int64)
    for i, t in enumerate(tensors):
        if t is None:
            continue
        dims = list(t.shape[1:])
        if len(dims) > 4:
            raise ValueError(f"pipeline messages hold at most 5-d tensors, got {tuple(t.shape)}")
        header[7 * i:7 * i + 3] = torch.tensor([1, _DTYPES.index(t.dtype), len(dims)])
        header[7 * i + 3:7 * i + 3 + len(dims)] = torch.tensor(dims, dtype=torch.int64)
    return header


def _decode(header: Tensor) -> list[tuple[torch.dtype, tuple[int, ...]] | None]:
    out: list[tuple[torch.dtype, tuple[int, ...]] | None] = []
    values = header.tolist()
    for i in range(3):
        present, code, ndim = values[7 * i:7 * i + 3]
        out.append((_DTYPES[code], tuple(values[7 * i + 3:7 * i + 3 + ndim])) if present else None)
    return out


class PipelineStage:
    """One stage's side of the transport, called by the engine's ``training_step`` (``receive`` before its first
    module, ``send`` right after its last module's forward) and by the strategy (``end_epoch``, ``finish``).

    The receive of the next batch is posted while this one computes, whenever a next batch of this epoch will be
    run (the same rule on both sides of a link, :meth:`_continues`); a batch the sender never produces (the run
    stopped early on a signal) is matched at the end by :meth:`finish`, which sends a dummy for it."""

    def __init__(self, stage: int, stages: int, firsts: Sequence[int], num_modules: int, depth: int,
                 device: torch.device, group=None, send_x: bool = False):
        self.stage, self.stages = int(stage), int(stages)
        self.firsts = list(firsts)
        self.modules = stage_modules(self.firsts, num_modules, self.stage)
        self.depth = max(1, int(depth))
        self.device = device
        self.group = group
        self.send_x = send_x  # a later stage's loss needs the input image (InfoPro's reconstruction)
        self.prev = self.stage - 1 if self.stage > 0 else None
        self.next = self.stage + 1 if self.stage < self.stages - 1 else None
        self.sizes: list[int] | None = None  # batch sizes of an epoch (every stage, from the real loader)
        self._sends: deque = deque()
        self._posted: tuple[int, list[Tensor | None], list] | None = None  # (batch_idx, buffers, works)
        self._meta: list | None = None  # (dtype, per-sample shape) of h, y, x: from the first message's header
        self._header_sent = False
        self._peer_posted_next: int | None = None  # sender side: the batch the next stage has posted a receive for
        self.wait_s = 0.0  # time spent waiting on the transport (receives and send completions)
        self.batches = 0
        self.started: float | None = None  # first batch's start, last batch's end (busy fraction)
        self.weights_back: WeightsBack | None = None  # MAN: B_next's weights back to the previous stage
        self.last_stepped = False  # whether the previous batch stepped the modules
        self.steps = 0
        self.ended: float | None = None

    # -- the engine's hooks -------------------------------------------------------------------------------------
    def receive(self, model, batch, batch_idx: int, steps: bool):
        """(the batch for this stage's losses, its modules' input): stage 0's own batch, or stage s-1's message."""
        more = self._continues(model, batch_idx, steps)
        if self.weights_back is not None and self.last_stepped:
            self.weights_back.send()  # B_next after the previous batch's step, to the previous stage
        self.last_stepped = steps
        self.steps += int(steps)
        if self.started is None:
            self.started = time.perf_counter()
        if self.prev is None:
            self.batches += 1
            if self.next is not None:
                self._peer_posted_next = batch_idx + 1 if more else None
            return batch, batch[0]
        t0 = time.perf_counter()
        if self._meta is None:
            header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)  # NCCL: a device tensor
            dist.recv(header, src=self.prev, group=self.group)
            self._meta = _decode(header.cpu())  # once per fit
        if self._posted is None or self._posted[0] != batch_idx:
            self._posted = self._post(batch_idx, self._size(batch, batch_idx))
        _, (h, y, x), works = self._posted
        for w in works:
            w.wait()
        self._posted = None
        if more:  # double buffering: batch t+1 arrives while batch t computes
            self._posted = self._post(batch_idx + 1, self.sizes[batch_idx + 1])
        if self.next is not None:
            self._peer_posted_next = batch_idx + 1 if more else None
        self.wait_s += time.perf_counter() - t0
        self.batches += 1
        if getattr(model, "channels_last", False) and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        return (x, y), h

    def send(self, h: Tensor, batch) -> None:
        """Hand this stage's output of the batch on (at most ``depth`` sends in flight)."""
        if self.next is None:
            return
        x = batch[0] if self.send_x else None
        tensors = [h.detach().contiguous(), batch[1].contiguous(), None if x is None else x.contiguous()]
        t0 = time.perf_counter()
        if not self._header_sent:
            dist.send(_encode(tensors).to(self.device), dst=self.next, group=self.group)
            self._header_sent = True
        while len(self._sends) >= self.depth:
            for w in self._sends.popleft()[1]:
                w.wait()
        works = [dist.isend(t, dst=self.next, group=self.group) for t in tensors if t is not None]
        self._sends.append((tensors, works))  # the buffers stay alive until their send completes
        self.wait_s += time.perf_counter() - t0

    # -- epoch ends and the end of a fit ---------------------------------------------------------------------
    def drain(self) -> None:
        t0 = time.perf_counter()
        while self._sends:
            for w in self._sends.popleft()[1]:
                w.wait()
        self.wait_s += time.perf_counter() - t0

    def finish(self) -> None:
        """End of the fit: match a receive the next stage posted for a batch that will never come, wait for every
        send and receive still in flight."""
        if self.next is not None and self._peer_posted_next is not None and self._header_sent \
                and self.sizes is not None and self._peer_posted_next < len(self.sizes):
            b = self.sizes[self._peer_posted_next]
            tensors, _ = self._sends[-1] if self._sends else (None, None)
            if tensors is not None:
                dummies = [None if t is None else t.new_zeros((b, *t.shape[1:])) for t in tensors]
                self._sends.append((dummies, [dist.isend(t, dst=self.next, group=self.group)
                                              for t in dummies if t is not None]))
        self._peer_posted_next = None
        self.drain()
        self.ended = time.perf_counter()
        if self._posted is not None:
            for w in self._posted[2]:
                w.wait()
            self._posted = None

    # -- helpers --------------------------------------------------------------------------------------------------
    def _size(self, batch, batch_idx: int) -> int:
        if self.sizes is not None and batch_idx < len(self.sizes):
            return self.sizes[batch_idx]
        return int(batch[0].shape[0])

    def _post(self, batch_idx: int, size: int):
        buffers: list[Tensor | None] = []
        works = []
        for meta in self._meta:
            if meta is None:
                buffers.append(None)
                continue
            dtype, shape = meta
            buf = torch.empty((size, *shape), dtype=dtype, device=self.device)
            works.append(dist.irecv(buf, src=self.prev, group=self.group))
            buffers.append(buf)
        return batch_idx, buffers, works

    def _continues(self, model, batch_idx: int, steps: bool) -> bool:
        """Whether batch ``batch_idx + 1`` of this epoch will be trained: the same answer on every stage."""
        trainer = model.trainer
        total = trainer.num_training_batches
        if self.sizes is None or not isinstance(total, int) or batch_idx + 1 >= min(total, len(self.sizes)):
            return False
        max_steps = trainer.max_steps
        return max_steps is None or max_steps < 0 or trainer.global_step + int(steps) < max_steps


# ---------------------------------------------------------------------------------------------------- strategy
class PipelineStrategy(LocalDDPStrategy):
    """N processes, one stage of local modules each (:class:`PipelineStage`); no gradient averaging.

    Args (besides LocalDDPStrategy's):
        depth: batches a stage may send before the oldest send has completed (``trainer.pipeline_depth``).
        stage_boundaries: the first module of every stage (``trainer.stage_boundaries``); None balances the stages
            from each module's measured forward + backward time (rank 0 measures, every stage gets its result).
    """

    strategy_name = "lla_pipeline"

    def __init__(self, accelerator=None, parallel_devices=None, cluster_environment=None, checkpoint_io=None,
                 precision_plugin=None, process_group_backend: str | None = None,
                 timeout: timedelta | float | None = default_pg_timeout, start_method: str = "popen",
                 depth: int = 2, stage_boundaries: Sequence[int] | None = None):
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError("trainer.pipeline_depth", f"must be an integer >= 1, got {depth!r}", ">= 1 (default 2)")
        self.depth = depth
        # epoch-level values are the same on every stage (loss sums and weights are gathered): no sync_dist needed
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
        self.requested_boundaries = None if stage_boundaries is None else list(stage_boundaries)
        self.boundaries: list[int] | None = None
        self.module_costs: list[float] | None = None
        self.pipeline_stage: PipelineStage | None = None
        self.man_links: WeightsBack | None = None
        self.stage_stats: dict[str, Any] | None = None  # this stage's waits and busy fraction, after the fit
        self._p2p_group = None
        self._back_group = None

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        # Lightning's DDP setup re-seeds every process (reset_seed) after the model was built, which one process
        # does not: keep the RNG streams as they were, so stage 0's augmentation draws are one process's.
        import random

        import numpy as np

        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        super().setup_environment()
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])

    @property
    def distributed_sampler_kwargs(self) -> dict:
        return {"num_replicas": 1, "rank": 0}  # every stage walks the whole data set (only stage 0 reads it)

    def configure_ddp(self) -> None:
        model = self.lightning_module
        # Lightning broadcasts its SIGTERM flag from rank 0 before every training batch: a collective that makes the
        # stages meet once per batch and so run one after the other. Stop signals are agreed by lla's Preemption
        # callback instead, without stalling the pipeline (agree_lag).
        disable_sigterm_broadcast(model.trainer)
        broadcast_module_states(self.model)  # every stage starts from rank 0's weights
        self.grad_sync = None
        N = self.world_size
        check_pipelinable(model, N, self.requested_boundaries)
        if self.requested_boundaries is not None:
            firsts = check_boundaries(self.requested_boundaries, model.num_modules, N)
            costs = None
        else:
            costs = [0.0] * model.num_modules
            if self.global_rank == 0:
                dm = getattr(model.trainer, "datamodule", None)
                costs = measure_module_costs(model, int(getattr(dm, "batch_size", 0) or 32))
            shared = [costs]
            dist.broadcast_object_list(shared, src=0)
            costs = shared[0]
            firsts = balance(costs, N)
        self.boundaries, self.module_costs, self.num_modules = firsts, costs, model.num_modules
        backend = self._get_process_group_backend()
        self._p2p_group = dist.new_group(backend=backend)
        s = self.global_rank
        K = model.num_modules
        needs_x = [any(getattr(m, "needs_x01", False) for m in model.aux[k].modules())
                   for k in range(K - 1)] + [False]
        later = range(stage_modules(firsts, K, s).stop, K)
        self.pipeline_stage = PipelineStage(s, N, firsts, K, self.depth, self.root_device, self._p2p_group,
                                            send_x=any(needs_x[k] for k in later))
        if hasattr(model, "next_block_index") and hasattr(model, "remote_block"):  # MAN: B_next on the next stage
            self._back_group = dist.new_group(backend=backend)
            self.man_links = WeightsBack(model, firsts, s, self.depth, self.depth, self._back_group)
            self.pipeline_stage.weights_back = self.man_links
            model.remote_block = self.man_links
        if s == 0:
            log.info("lla: pipeline of %d stages, first modules %s%s", N, firsts,
                     f" (balanced from measured module times {[round(c * 1e3, 2) for c in costs]} ms)"
                     if costs else " (trainer.stage_boundaries)")

    def process_dataloader(self, dataloader: object) -> object:
        stage = self.pipeline_stage
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        whole_data_set(dataloader)
        if stage is None or trainer is None or not trainer.training:
            return dataloader
        sizes = batch_sizes(dataloader)
        if sizes is None:
            raise ConfigError("dataset", "trainer=pipeline needs a map-style train loader (with a batch sampler)",
                              "the datasets in conf/dataset")
        stage.sizes = sizes
        if stage.prev is None:
            return dataloader
        return DataLoader(BatchSizes(sizes), batch_size=None, shuffle=False)

    # -- state: every process holds the full current model at validation and checkpoint time --------------------
    def gather_state(self) -> None:
        """Each stage broadcasts what it trains (weights, buffers, momentum, loss sums): afterwards every process
        holds the current full model and optimizer state."""
        if self.boundaries is None or not (dist.is_available() and dist.is_initialized()):
            return
        model = self.lightning_module
        opt = self.optimizers[0] if self.optimizers else None
        for s in range(self.world_size):
            broadcast_tensors(stage_tensors(model, stage_modules(self.boundaries, model.num_modules, s), opt), src=s)

    def _align_buffers(self) -> None:  # before validation / test (LocalDDPStrategy's hook)
        self.gather_state()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.gather_state()  # every rank runs this in dump_checkpoint; rank 0 writes one ordinary checkpoint
        return super().lightning_module_state_dict()

    def on_train_end(self) -> None:
        super().on_train_end()
        stage = self.pipeline_stage
        if stage is not None:
            stage.finish()
            span = (stage.ended - stage.started) if stage.started is not None else None
            self.stage_stats = {"wait_s": stage.wait_s, "batches": stage.batches, "train_s": span,
                                "busy_fraction": None if not span else max(0.0, 1.0 - stage.wait_s / span)}
        if self.man_links is not None:
            if stage is not None and stage.last_stepped:
                self.man_links.send()  # the weights after the last step
            self.man_links.finish(stage.steps if stage is not None else 0)
        self.gather_state()  # after the fit every process holds the trained full model

    @property
    def agree_lag(self) -> int:
        """Batches between the launch and the read of a stop round (lla.checkpointing.Preemption). Stage s runs up
        to about ``s + depth`` batches ahead of the last stage; a round read one batch later would hold stage 0
        back to the last stage's pace. Read ``N + depth`` batches later, it never waits; every stage still stops
        after the same batch."""
        return self.world_size + self.depth

    def on_exception(self, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):  # every stage stopped after the same batch
            stage = self.pipeline_stage
            try:
                if stage is not None:
                    stage.finish()
                if self.man_links is not None and stage is not None:
                    if stage.last_stepped:
                        self.man_links.send()
                    self.man_links.finish(stage.steps)
            except Exception as err:  # a stop must not turn into a crash; the processes end anyway
                log.warning("lla: pipeline stage %s: transfers still in flight at the stop: %s", self.global_rank, err)
        super().on_exception(exception)

    def end_epoch(self, model) -> None:
        """The engine's epoch end: sends done, every stage's loss sums on every rank (rank 0 logs them)."""
        if self.pipeline_stage is not None:
            self.pipeline_stage.drain()
            for s in range(self.world_size):
                mods = stage_modules(self.boundaries, model.num_modules, s)
                broadcast_tensors([model._loss_sum[mods.start:mods.stop]], src=s)

    def run_record(self) -> dict[str, Any]:
        """What results.json records about the pipeline (rank 0 calls it after the fit; every stage joins)."""
        mine = self.stage_stats or {}
        gathered: list[Any] = [mine] * self.world_size
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        K = getattr(self, "num_modules", None)
        return {"stages": self.world_size, "stage_boundaries": self.boundaries, "depth": self.depth,
                "stage_modules": None if K is None or self.boundaries is None else
                [list(stage_modules(self.boundaries, K, s)) for s in range(self.world_size)],
                "module_costs_ms": None if self.module_costs is None else [c * 1e3 for c in self.module_costs],
                "balanced": self.requested_boundaries is None,
                **{f"stage_{key}": [(g or {}).get(key) for g in gathered]
                   for key in ("busy_fraction", "wait_s", "train_s", "batches")}}

    def teardown(self) -> None:
        self.pipeline_stage = None
        if self.man_links is not None and self.lightning_module is not None:
            self.lightning_module.remote_block = None
        self.man_links = None
        for group in (self._p2p_group, self._back_group):
            if group is not None:
                try:
                    dist.destroy_process_group(group)
                except Exception:
                    pass
        self._p2p_group = self._back_group = None
        super().teardown()


# ---------------------------------------------------------------------------------------------------- MAN
class WeightsBack:
    """MAN across a stage boundary (docs/pipeline.md#man). Module k's EMA copy follows B_next, the first block of
    module k+1; where k is the last module of stage s, B_next trains on stage s+1. Stage s+1 sends B_next's weights
    back after each of its steps (message j = the weights after step j); stage s's u-th EMA update reads message
    ``u - 1 - delay``, or the initial weights while that is < 0. One process reads the weights after step u-1 (delay 0);
    here ``delay`` = the pipeline depth, fixed, so the run is deterministic and the same in every run.

    One receive is kept posted ahead; a sender keeps at most ``delay + depth + 2`` sends in flight."""

    def __init__(self, model, firsts: Sequence[int], stage: int, delay: int, depth: int, group):
        import copy

        K = model.num_modules
        mods = stage_modules(firsts, K, stage)
        self.group, self.delay, self.stage = group, int(delay), stage
        self.reader_k = mods.stop - 1 if mods.stop < K else None  # this stage's last module reads a remote B_next
        self.copy = copy.deepcopy(model.backbone.layers[model.next_block_index(self.reader_k)]) \
            if self.reader_k is not None else None  # the delayed B_next the EMA reads; starts at the initial weights
        self.block = model.backbone.layers[model.module_layers(mods.start)[0]] if stage > 0 else None
        self.max_sends = self.delay + int(depth) + 2
        self._sends: deque = deque()
        self._posted: tuple[int, list[Tensor], list] | None = None
        self.updates = 0  # EMA updates done (reader)
        self.consumed = 0  # messages received (reader)
        self.sent = 0  # messages sent (sender)

    # reader: MAN's after_backward asks for the block its EMA follows
    def __call__(self, k: int) -> nn.Module | None:
        if k != self.reader_k:
            return None
        want = self.updates - 1 - self.delay
        self.updates += 1
        if want >= 0:
            bufs = self._receive(want)
            with torch.no_grad():
                for p, new in zip(self.copy.parameters(), bufs):
                    p.copy_(new)
            self._posted = self._post(want + 1)
        return self.copy

    def _post(self, j: int):
        bufs = [torch.empty_like(p) for p in self.copy.parameters()]
        return j, bufs, [dist.irecv(t, src=self.stage + 1, group=self.group) for t in bufs]

    def _receive(self, j: int) -> list[Tensor]:
        if self._posted is None:
            self._posted = self._post(j)
        index, bufs, works = self._posted
        assert index == j == self.consumed, (index, j, self.consumed)
        for w in works:
            w.wait()
        self._posted = None
        self.consumed += 1
        return bufs

    # sender: after each step of its modules
    def send(self) -> None:
        if self.block is None:
            return
        while len(self._sends) >= self.max_sends:
            for w in self._sends.popleft()[1]:
                w.wait()
        bufs = [p.detach().clone() for p in self.block.parameters()]
        self._sends.append((bufs, [dist.isend(t, dst=self.stage - 1, group=self.group) for t in bufs]))
        self.sent += 1

    def finish(self, steps_done: int) -> None:
        """End of the fit: the reader takes (and drops) the messages it did not need; both wait for what is in
        flight. ``steps_done``: the steps of this fit, the same on every stage."""
        if self.copy is not None:
            while self.consumed < steps_done:
                self._receive(self.consumed)
        while self._sends:
            for w in self._sends.popleft()[1]:
                w.wait()


# ---------------------------------------------------------------------------------------------------- trainer
def _lightning_trainer():
    import lightning as L

    return L.Trainer


class PipelineTrainer(_lightning_trainer()):
    """``trainer=pipeline``: a Lightning Trainer whose strategy is :class:`PipelineStrategy`, with the pipeline's own
    settings as Trainer arguments (``trainer.pipeline_depth``, ``trainer.stage_boundaries``, ``trainer.replicas``).
    What cannot be pipelined fails in ``fit`` with one line, before any process is started."""

    def __init__(self, *args: Any, pipeline_depth: int = 2, stage_boundaries: Sequence[int] | None = None,
                 replicas: int = 1, process_group_backend: str | None = None, timeout: float = 1800,
                 **kwargs: Any):
        if replicas != 1:
            raise ConfigError("trainer.replicas", f"trainer=pipeline with {replicas} data-parallel replicas per stage "
                              "is not built (each stage would need its own gradient all-reduce group and sharded "
                              "data on stage 0 only)", "1; for data parallelism alone: trainer=ddp")
        devices = kwargs.get("devices", 2)
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 2:
            raise ConfigError("trainer.devices", f"trainer=pipeline needs the number of stages, got {devices!r}",
                              "an integer >= 2 (one process and device per stage)")
        if kwargs.get("sync_batchnorm"):
            raise ConfigError("trainer.sync_batchnorm", "every stage runs every batch whole: there is no global "
                              "batch to synchronise over", "false")
        if (kwargs.get("num_nodes") or 1) != 1:
            raise ConfigError("trainer.num_nodes", "trainer=pipeline runs on one node", "1")
        if kwargs.get("strategy") in (None, "auto"):
            kwargs["strategy"] = PipelineStrategy(depth=pipeline_depth, stage_boundaries=stage_boundaries,
                                                  process_group_backend=process_group_backend, timeout=timeout)
        kwargs["use_distributed_sampler"] = False  # every stage walks the whole data set
        self.stages = devices
        self.requested_boundaries = stage_boundaries
        super().__init__(*args, **kwargs)

    def fit(self, model, *args: Any, **kwargs: Any):
        check_pipelinable(model, self.stages, self.requested_boundaries)
        return super().fit(model, *args, **kwargs)
