"""Checkpoints that survive crashes, preemption and diverging losses, and a resume that continues the same run.

What a run folder holds and when it is written (docs/architecture.md#properties-to-keep: nothing a user needs is lost):

* ``checkpoints/last.ckpt``: every ``checkpoint.every_n_steps`` optimizer steps, at every epoch end, and when SIGTERM
  (or SLURM's / submitit's SIGUSR1 / SIGUSR2, or Ctrl-C's SIGINT) stops the run (:class:`Preemption`: every rank
  stops after the same batch). A kill -9 loses at most N steps.
* ``checkpoints/best.ckpt``: the epoch with the best ``val/acc`` (Lightning's ModelCheckpoint).

Every file is written to a temporary name in the same folder, fsync'ed, then renamed over the old one
(:class:`AtomicCheckpointIO`). Lightning's own ``_atomic_save`` stages the file in the system temp folder and moves it,
which is a copy, not a rename, whenever that folder sits on another file system (local /tmp vs. a shared disk): a
kill during that copy would leave a truncated ``last.ckpt``.

Resuming (:func:`resolve_resume`): ``ckpt_path=last``, or automatically when the run folder already holds
``last.ckpt`` (``resume=false`` turns that off). Lightning restores weights (EMA and learnable-bias copies are
parameters or buffers of the model), the optimizer container (every module's SGD and LR scheduler, lla.optim) and
its loop counters. :class:`ResumeState` adds what Lightning leaves out: the RNG states, the best-so-far validation
accuracy, the per-module running loss sums, and an epoch-seeded shuffle so that epoch e sees the same order whether
or not the run stopped before it. Stopping at an epoch end and resuming gives the same weights bit for bit on the CPU.
A mid-epoch stop (step checkpoint) resumes with the right counters, weights and optimizer state, but Lightning replays
that epoch's remaining batch count from the start of the epoch's order (a plain DataLoader cannot skip ahead), so the
rest of that one epoch sees a different subset of the data; later epochs see their usual order again. With loader
workers the order stays exact; their augmentation draws too unless the workers are persistent (their RNG lives in the
worker processes, out of a checkpoint's reach).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, RandomSampler

from lla.compat import disable_sigterm_broadcast, fit_data_fetcher, request_sigterm_stop
from lla.errors import ConfigError

log = logging.getLogger("lla")
LAST = "last.ckpt"
#: ``python run.py`` exit codes besides 0 (done), 1 (crash) and 2 (bad input, lla.errors.ConfigError)
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a job stopped by SIGTERM: not done, rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C after saving; rerun to resume


class NonFiniteLossError(RuntimeError):
    """A module's loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def stop_status(err: BaseException | None, stopped_by: str | None = None) -> str:
    """The ``status`` results.json records for how ``trainer.fit`` ended (``stopped_by``: :class:`Preemption`'s)."""
    if err is None:
        return "completed"
    if isinstance(err, SIGTERMException):
        return stopped_by or "preempted"
    if isinstance(err, NonFiniteLossError):
        return "diverged"
    return "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"


# ---------------------------------------------------------------------------------------------- atomic files
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``.<name>.<pid>.tmp`` next to ``path``, fsync, then ``os.replace``: readers (and a rerun
    after a kill) see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every file system)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_torch_save` for local paths (remote URLs: Lightning's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def remove_stale_temp_files(folder: Path) -> None:
    """Temporary files of a save that a kill interrupted (the run lock guarantees nobody is writing them now)."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---------------------------------------------------------------------------------------------- resume
@dataclass
class Resume:
    """What ``trainer.fit`` resumes from (``path``), or the results of a run that already finished (``finished``)."""

    path: str | None = None
    epoch: int | None = None
    global_step: int | None = None
    finished: dict | None = None


def peek(path: str | Path) -> dict:
    """Epoch and step of a checkpoint without reading its tensors (memory-mapped); ConfigError if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise ConfigError("ckpt_path", f"{path} is not a readable checkpoint ({type(err).__name__}: {err})",
                          "delete it (or pass resume=false) to start the run over") from None
    return {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}


def resolve_resume(ckpt_path: str | None, resume: bool, out_dir: str | Path, trainer: Mapping | None = None) -> Resume:
    """Decide where training starts: ``ckpt_path=<file>``, ``ckpt_path=last`` (this run's last.ckpt, which must
    exist), or ``null`` + ``resume=true``: last.ckpt when the run folder has one, else from scratch.

    A run whose results.json says it completed with the same ``trainer.max_epochs`` / ``max_steps`` is not trained
    again (``resume=false`` starts it over); with a larger limit it goes on from last.ckpt."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / LAST
    if ckpt_dir.is_dir() and rank_zero_only.rank == 0:
        remove_stale_temp_files(ckpt_dir)
    if ckpt_path in (None, "", "null") and not resume:
        return Resume()
    if ckpt_path == "hpc":  # Lightning's SLURM checkpoint name: let Lightning find it
        return Resume(path="hpc")
    if ckpt_path not in (None, "", "null", "last"):
        path = Path(str(ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError("ckpt_path", f"{path} does not exist",
                              "a .ckpt file, last (this run folder's checkpoints/last.ckpt), or null")
        return Resume(path=str(path), **peek(path))
    if not last.is_file():
        if ckpt_path == "last":
            raise ConfigError("ckpt_path", f"no checkpoint to resume: {last} does not exist (a different command "
                              "writes to a different run folder)", "the same overrides as the run to resume, "
                              "run_dir=<its folder>, or a .ckpt path")
        return Resume()
    results = out_dir / "results.json"
    if results.is_file():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(results.read_text())
            limits = ("max_epochs", "max_steps")
            before = (previous.get("config") or {}).get("trainer") or {}
            same = all(before.get(k) == (trainer or {}).get(k, before.get(k)) for k in limits)
            if previous.get("status") == "completed" and same:
                return Resume(path=str(last), finished=previous, **peek(last))
    return Resume(path=str(last), **peek(last))


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lock`` while a run trains there (global rank 0 only): two processes
    never write one run folder, e.g. the same command started twice. The file holds the owner's pid.

    :meth:`release` (also at interpreter exit) deletes the file, so a folder with a ``.lock`` is one in use or one
    whose run was killed. A file left by a killed run does not block the rerun: the kernel dropped its lock with
    the process, and the next run locks the same file again."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".lock"
        self._file = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return self
        if rank_zero_only.rank != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "?"
                f.close()
                raise ConfigError("run_dir", f"{self.path.parent} is in use by another run (pid {owner})",
                                  "wait for it to finish, or give this run its own folder: run_dir=<path>") from None
            except OSError as err:  # file systems without flock: run unlocked rather than not at all
                log.warning("lla: cannot lock %s (%s); make sure no other run uses this folder", self.path, err)
                f.close()
                return self
            try:  # the holder we waited for may have deleted the file meanwhile: then lock the new one
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still locked: nobody can hold a lock on it in between
            self._file.close()  # closing drops the flock
            self._file = None
            atexit.unregister(self.release)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------- exact resume
def _rng_state() -> dict:
    """Every global RNG, as tensors and plain Python values (a ``weights_only`` load accepts them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                        gauss], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of epoch ``epoch``: a function of (seed, epoch) only, never of how the run got there."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**63 - 1)


def _train_loaders(trainer) -> list:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


class ResumeState(L.Callback):
    """What an exact resume needs beyond Lightning's checkpoint: RNG states, ``val_acc_best`` (a torchmetrics
    MaxMetric, whose state is not in the state_dict), the engine's per-module loss sums of the running epoch, and an
    epoch-seeded shuffle of the train loader (its generator is otherwise seeded once, when the loader is built)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._rng: dict | None = None

    # -- save / load -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state: dict[str, Any] = {"rng": _rng_state()}
        best = getattr(pl_module, "val_acc_best", None)
        if best is not None and getattr(best, "update_called", False):
            state["val_acc_best"] = float(best.compute())
        if isinstance(getattr(pl_module, "_loss_sum", None), torch.Tensor):
            state["loss_sum"] = pl_module._loss_sum.detach().cpu().clone()
            state["loss_batches"] = int(getattr(pl_module, "_loss_batches", 0))
        checkpoint["lla_resume"] = state

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("lla_resume") or {}
        self._rng = state.get("rng")
        if state.get("val_acc_best") is not None and getattr(pl_module, "val_acc_best", None) is not None:
            pl_module.val_acc_best.update(torch.tensor(state["val_acc_best"]))
        if "loss_sum" in state and isinstance(getattr(pl_module, "_loss_sum", None), torch.Tensor):
            pl_module._loss_sum.copy_(state["loss_sum"])
            pl_module._loss_batches = state["loss_batches"]

    # -- replay ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self._rng is not None:
            _set_rng_state(self._rng)  # nothing between here and the first batch draws from them
            self._rng = None
        self._reseed(trainer)
        # A multi-worker loader draws its order when the iterator is built, and Lightning built this epoch's in
        # FitLoop.setup_data, before any hook: build it again now that the sampler is reseeded. (Single-process
        # loaders draw at the first batch, after this hook.)
        fetcher = fit_data_fetcher(trainer)
        if any(getattr(dl, "num_workers", 0) > 0 for dl in _train_loaders(trainer)) and fetcher is not None:
            iter(fetcher)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reseed(trainer)

    def _reseed(self, trainer) -> None:
        """Fresh generators seeded from (seed, epoch): the epoch's order is their first draw, however many times
        Lightning builds an iterator (each build is preceded by a reseed)."""
        epoch = trainer.current_epoch
        for dl in _train_loaders(trainer):
            sampler = getattr(dl, "sampler", None)
            if isinstance(dl, DataLoader) and isinstance(sampler, RandomSampler) and sampler.generator is not None:
                sampler.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                dl.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch) + 1)  # worker seeds
            elif hasattr(sampler, "set_epoch"):  # DistributedSampler, lla's DeviceLoader: (seed, epoch) already
                sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------- non-finite losses
class NonFiniteLossCheck(L.Callback):
    """Stop the run when any module's loss is NaN or inf, naming method, module, epoch and step.

    Reads the engine's per-module loss sums of the running epoch (``LocalLearner._loss_sum``): a NaN or inf in any
    step keeps the sum non-finite until the epoch ends, so nothing between two checks is missed. Each step records,
    on the device and without a host sync, the first step at which each module's sum went bad; the host looks every
    ``every`` steps (one sync per look), at every epoch end, before validation, and before every checkpoint write —
    so a diverged state never overwrites the last good checkpoint. ``every=1`` looks each step (one sync per step);
    larger values only delay the stop, the reported step stays exact.
    """

    def __init__(self, every: int = 10, method: str = "", last_checkpoint: Callable[[], str | None] | None = None):
        self.every = int(every)
        self.method = method
        self.last_checkpoint = last_checkpoint or (lambda: None)
        self._first: torch.Tensor | None = None  # per module: first bad global step, -1 = none
        self._looked_at = 0  # the global step last looked at (0: nothing trained yet)

    def on_train_start(self, trainer, pl_module) -> None:
        if not isinstance(getattr(pl_module, "_loss_sum", None), torch.Tensor):
            log.warning("lla: no NaN/inf check: %s keeps no per-module loss sums (_loss_sum)", type(pl_module).__name__)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sums = getattr(pl_module, "_loss_sum", None)
        if not isinstance(sums, torch.Tensor):
            return
        if self._first is None or self._first.shape != sums.shape or self._first.device != sums.device:
            self._first = torch.full(sums.shape, -1, dtype=torch.long, device=sums.device)
        bad = ~torch.isfinite(sums)
        self._first = torch.where(bad & (self._first < 0), trainer.global_step, self._first)
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step != self._looked_at:
            self._looked_at = trainer.global_step  # once per step (accumulation: several batches share a step)
            self.check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training or (trainer.state.fn == "fit" and not trainer.sanity_checking):
            self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        """One host sync: raise NonFiniteLossError if any module's loss went non-finite (on any rank)."""
        if self._first is None:
            return
        first = self._first.tolist()
        bad = [k for k, step in enumerate(first) if step >= 0]
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        last = self.last_checkpoint()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
        name = f"method {self.method}, " if self.method else ""
        where = ""
        if trainer.world_size > 1:  # every rank joins (all agreed to stop) and names the first bad module of any
            firsts = trainer.strategy.all_gather(self._first).reshape(trainer.world_size, -1).tolist()
            sums = trainer.strategy.all_gather(pl_module._loss_sum.detach().float()).reshape(trainer.world_size, -1)
            _, k, rank = min((s, j, r) for r, row in enumerate(firsts) for j, s in enumerate(row) if s >= 0)
            first, value = firsts[rank], sums[rank, k].item()  # rank 0's results.json names it too
            where = f" on another process (rank {rank})" if rank != trainer.global_rank else ""
        else:
            k = min(bad, key=lambda j: (first[j], j))
            value = pl_module._loss_sum[k].item()
        raise NonFiniteLossError(
            f"non-finite loss ({value}){where} in {name}module {k} of {len(first)} (0-based), "
            f"epoch {trainer.current_epoch}, step {first[k]}; {kept}")


# ---------------------------------------------------------------------------------------------- last.ckpt
class LastCheckpoint(Checkpoint):
    """``checkpoints/last.ckpt`` every ``every_n_steps`` optimizer steps, at every epoch end, and when a signal stops
    the run (:class:`Preemption` makes Lightning raise SIGTERMException after the same batch on every rank; the state
    is then that of a finished batch). ``guard`` runs before each write (the NaN check)."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0, guard: Callable[[Any, Any], None] | None = None):
        self.path = Path(dirpath) / LAST
        self.every_n_steps = int(every_n_steps)
        self.guard = guard
        self.saved_step: int | None = None
        self.saved_path: str | None = str(self.path) if self.path.is_file() else None

    def save(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:  # a smoke test leaves nothing to resume
            return
        if self.guard is not None:
            self.guard(trainer, pl_module)
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step, self.saved_path = trainer.global_step, str(self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.saved_step:
            self.save(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)  # runs after the module's hook: the LR schedulers have stepped

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            if self.saved_step == trainer.global_step and self.saved_path == str(self.path):
                return  # this batch's periodic save (or the epoch end's) already holds the state: write it once
            try:
                self.save(trainer, pl_module)
            except NonFiniteLossError as err:  # keep the last good one
                log.error("lla: not saving on SIGTERM: %s", err)


# ---------------------------------------------------------------------------------------------- preemption
def _on_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Preemption(L.Callback):
    """Stops the run after a whole batch, on every rank after the same one, when any process of it receives SIGTERM,
    SIGUSR1 / SIGUSR2 (SLURM ``--signal``, submitit's ``signal_delay_s``: the job ends soon) or SIGINT (Ctrl-C); then
    :class:`LastCheckpoint` saves, results.json says ``preempted`` (``interrupted`` for Ctrl-C), and after a requeue
    signal :meth:`requeue` hands the job back to the scheduler.

    The signal handlers only record the signal. The stop is decided at batch ends: in one process at once; with
    several, each rank's flag goes into an all-reduce (MAX) of a small CPU tensor on a gloo side group, launched
    without waiting at the end of batch t and read at the end of batch t+1. Every rank reads the same result, so all
    stop after the same batch, and nothing waits for the GPU. This replaces Lightning's SIGTERM handling, which
    broadcasts from inside the signal handler (pairing with whatever collective another rank is in, e.g. a module's
    gradient all-reduce: the job hangs until the collective timeout) and broadcasts and reads a flag on the host at
    every batch. Lightning's SLURM handler, which saves from inside the handler halfway through a step, is turned off
    by :func:`trainer_plugins`.

    A second Ctrl-C ends the process at once (SIGINT's default action), without saving.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
                    if hasattr(signal, name))
    REQUEUE_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name))
    PREEMPT, INTERRUPT = 1, 2  # stop codes; the ranks agree on the largest one

    def __init__(self):
        self.signal: int | None = None  # the requeue signal this process received, if any
        self.stopped_by: str | None = None  # "preempted" | "interrupted" once the ranks agreed to stop
        self._code = 0  # this process's stop request
        self._previous: dict[int, Any] = {}
        self._installed = False
        self._group = None
        self._pending: list[tuple[torch.Tensor, Any]] = []  # launched rounds, oldest first
        self._lag = 1  # batches between a round's launch and its read (trainer=pipeline: more, lla.pipeline)

    # -- signal handlers ------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        # the handlers from before the fit: Lightning installs its own after this hook, and we take over from those
        if stage == "fit" and _on_main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        self.signal, self.stopped_by, self._code = None, None, 0

    def _install(self, trainer) -> None:
        if self._installed or not _on_main_thread():
            return
        for sig in self.SIGNALS:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handle)
        self._installed = True
        # Lightning broadcasts its SIGTERM flag from rank 0 and reads it on the host before every batch under DDP;
        # the stop is agreed in on_train_batch_end instead (and its flag is only set once all ranks agreed).
        disable_sigterm_broadcast(trainer)

    def _handle(self, signum, frame) -> None:
        """Only records the signal: no logging, no collective, no I/O inside a signal handler."""
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
            self._code = max(self._code, self.INTERRUPT)
        else:
            self._code = max(self._code, self.PREEMPT)
        if signum in self.REQUEUE_SIGNALS:
            self.signal = signum

    def restore(self, keep_sigint_default: bool = False) -> None:
        """Put back the handlers that were there before the fit (idempotent)."""
        for sig, handler in self._previous.items():
            if keep_sigint_default and sig == signal.SIGINT:
                continue
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._installed = False

    # -- the collective decision --------------------------------------------------------------------------------
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)
        self._pending = []
        self._lag = max(1, int(getattr(trainer.strategy, "agree_lag", 1)))
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # CPU tensors on their own group: never queued behind (or paired with) the gradient all-reduces
            self._group = torch.distributed.new_group(backend="gloo")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        code = self._agree()
        if code and self.stopped_by is None:
            self.stopped_by = "interrupted" if code >= self.INTERRUPT else "preempted"
            # Lightning's own stop: SIGTERMException once this batch is fully accounted for (same on all ranks)
            if not request_sigterm_stop(trainer):
                raise SIGTERMException()

    def _agree(self) -> int:
        """The stop code all ranks agree on at this batch end (one process: its own, at once)."""
        if self._group is None:
            return self._code
        agreed = 0
        if len(self._pending) >= self._lag:
            flags, work = self._pending.pop(0)
            work.wait()  # launched `lag` whole batches ago: done by now; a CPU tensor, so no device sync
            agreed = int(flags[0])
        if not agreed:
            flags = torch.tensor([self._code], dtype=torch.int32)
            work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group,
                                                async_op=True)
            self._pending.append((flags, work))
        return agreed

    def on_train_end(self, trainer, pl_module) -> None:
        for _, work in self._pending:  # every rank launched the same rounds: they complete on all
            work.wait()
        self._pending = []

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._pending = []  # a failed peer may never join it: do not wait
        # back to the handlers from before the fit, except that after a Ctrl-C a second one still quits at once
        self.restore(keep_sigint_default=self._code >= self.INTERRUPT)
        self._drop_group()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.restore()
        self._drop_group()

    def _drop_group(self) -> None:
        if self._group is not None:
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group(self._group)
            self._group = None

    def finish(self, stop: SIGTERMException, trainer, last: LastCheckpoint) -> str:
        """After the ranks stopped: set the exit code on ``stop`` (143, or 130 after Ctrl-C), hand a requeue
        signal's job back (:meth:`requeue`), and return the one line to print (what was saved, how to go on)."""
        status = self.stopped_by or "preempted"
        stop.code = EXIT_INTERRUPTED if status == "interrupted" else EXIT_PREEMPTED
        requeued = self.requeue()
        if last.saved_path and last.saved_step == trainer.global_step:
            saved = f"saved {last.saved_path} at epoch {trainer.current_epoch}, step {trainer.global_step}"
        else:
            saved = f"nothing saved at step {trainer.global_step} (last checkpoint: {last.saved_path or 'none'})"
        how = "Ctrl-C" if status == "interrupted" else "a stop signal"
        return (f"lla: {status} by {how}: {saved}; rerun the same command to resume"
                + (f" ({requeued})" if requeued else ""))

    def requeue(self) -> str | None:
        """After the run stopped on a requeue signal: give the job back (global rank 0). Returns what was done.

        A previous handler of that signal (submitit's) is called: it requeues and exits. Otherwise on SLURM:
        ``scontrol requeue <job>``."""
        self.restore(keep_sigint_default=self._code >= self.INTERRUPT)
        if self.signal is None or rank_zero_only.rank != 0:
            return None
        previous = self._previous.get(self.signal)
        if callable(previous):
            previous(self.signal, None)
            return "handed to the job's own signal handler"
        array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
        if not job:
            return None
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("lla: could not requeue SLURM job %s: %s", job, err)
            return None
        if done.returncode != 0:
            log.warning("lla: scontrol requeue %s failed: %s", job, done.stderr.strip())
            return None
        return f"requeued SLURM job {job}"


# ---------------------------------------------------------------------------------------------- wiring
def trainer_plugins() -> list:
    """Atomic checkpoint files; on SLURM, Lightning's cluster environment without its in-handler auto-requeue."""
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def reliability_callbacks(out_dir: str | Path, every_n_steps: int = 0, nan_check_every: int = 10, seed: int = 0,
                          method: str = "") -> tuple[list, LastCheckpoint, Preemption]:
    """The callbacks a training run needs to be resumable: (all of them, the last.ckpt writer, the signal handler)."""
    last = LastCheckpoint(Path(out_dir) / "checkpoints", every_n_steps)
    nan = NonFiniteLossCheck(nan_check_every, method, last_checkpoint=lambda: last.saved_path)
    last.guard = nan.check
    preemption = Preemption()
    return [ResumeState(seed), nan, preemption, last], last, preemption
