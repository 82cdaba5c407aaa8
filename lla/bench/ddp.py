"""Benchmark of data-parallel training on CPU processes: ``lla-bench --ddp N`` / ``python -m lla.bench.ddp --bench N``.

:func:`measure_ddp_overhead` times N gloo processes against one, at the same per-process batch; :func:`spawn` is the
process launcher it uses (the tests use it too): fresh processes wired as one job, with a deadline on every join.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lla.distributed import LocalDDPStrategy
from lla.errors import ConfigError


# ---------------------------------------------------------------------------------------------------- local launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_entry(rank: int, fn: Callable, world_size: int, port: int, threads: int | None, args: tuple) -> None:
    # The environment Lightning's LightningEnvironment reads when processes are created externally (like torchrun).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    for key in [k for k in os.environ if k.startswith(("SLURM_", "PMI_", "OMPI_"))]:
        del os.environ[key]  # a test run inside a SLURM job must not be mistaken for a SLURM task
    if threads:
        torch.set_num_threads(threads)
    fn(rank, world_size, *args)


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 300.0,
          threads: int | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes on this machine, wired as one job.

    A Trainer built inside ``fn`` with ``devices=world_size, strategy=LocalDDPStrategy()`` joins them (gloo on CPU).
    Every join has a deadline: a failing rank raises RuntimeError naming it (the others are killed), and a run still
    going after ``timeout_s`` is killed and raises TimeoutError, so a hang fails instead of blocking.
    """
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, start_processes

    ctx = start_processes(_worker_entry, args=(fn, world_size, _free_port(), threads, args), nprocs=world_size,
                          join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                raise TimeoutError(f"ranks {alive} of {world_size} still running after {timeout_s:.0f} s "
                                   "(a hang in a collective?): killed")
    except ProcessRaisedException as err:
        raise RuntimeError(f"rank {err.error_index} of {world_size} failed; the others were stopped:\n{err}") from None
    except ProcessExitedException as err:
        raise RuntimeError(f"rank {err.error_index} of {world_size} died (exit code {err.exit_code}); "
                           "the others were stopped") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


# ---------------------------------------------------------------------------------------------------- benchmark
def _bench_worker(rank: int, world_size: int, spec: dict, out: str) -> None:
    import lightning as L
    from hydra import compose, initialize_config_dir

    from lla.build import CONF_DIR, build, quiet_lightning
    from lla.callbacks import StepTimer

    quiet_lightning()
    per_step = spec["batch_size"] * world_size
    overrides = [f"method={spec['method']}", f"backbone={spec['backbone']}", "dataset=synthetic", f"k={spec['k']}",
                 f"dataset.batch_size={spec['batch_size']}", f"dataset.image_size={spec['image_size']}",
                 f"dataset.num_samples={per_step * (spec['warmup'] + spec['steps'])}", "logger=none",
                 "optim.schedule=constant", "trainer.max_epochs=1"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    L.seed_everything(0, verbose=False)
    dm, model = build(cfg)
    timer = StepTimer(warmup=spec["warmup"])
    trainer = L.Trainer(accelerator="cpu", devices=world_size, max_steps=spec["warmup"] + spec["steps"],
                        strategy=LocalDDPStrategy() if world_size > 1 else "auto", callbacks=[timer], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_time_s": timer.step_time_s}))


def measure_ddp_overhead(world_size: int = 2, method: str = "dgl", backbone: str = "resnet20", k: int = 4,
                         batch_size: int = 32, image_size: int = 32, steps: int = 10, warmup: int = 3,
                         threads: int | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    """Median step time of ``world_size`` CPU/gloo processes vs one process, at the same *per-process* batch.

    Both runs get ``threads`` intra-op threads per process (default: CPU cores // world_size), so the difference is
    the cost of data parallelism (gradient all-reduce, waits, samplers), not of a smaller compute share.
    """
    if int(world_size) < 2:
        raise ConfigError("bench.ddp", f"needs at least 2 processes, got {world_size}", ">= 2")
    threads = threads or max(1, (os.cpu_count() or 1) // int(world_size))
    spec = dict(method=method, backbone=backbone, k=int(k), batch_size=int(batch_size), image_size=int(image_size),
                steps=int(steps), warmup=int(warmup))
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, int(world_size)):
            out = str(Path(tmp) / f"w{world}.json")
            spawn(_bench_worker, world, (spec, out), timeout_s=timeout_s, threads=threads)
            times[world] = json.loads(Path(out).read_text())["step_time_s"]
    single, multi = times[1], times[int(world_size)]
    return {"world_size": int(world_size), **spec, "threads_per_process": threads, "single_step_s": single,
            "ddp_step_s": multi, "overhead_s": multi - single, "overhead_pct": 100.0 * (multi / single - 1.0)}


def main(argv: list[str] | None = None) -> int:
    """``python -m lla.bench.ddp --bench N [key=value ...]`` (keys: measure_ddp_overhead's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--bench" or not argv[1].isdigit():
        print("usage: python -m lla.bench.ddp --bench N [method=dgl backbone=resnet20 k=4 batch_size=32 "
              "image_size=32 steps=10 warmup=3 threads=T]", file=sys.stderr)
        return 2
    defaults = {name: par.default for name, par in inspect.signature(measure_ddp_overhead).parameters.items()}
    kwargs: dict[str, Any] = {}
    for item in argv[2:]:
        key, _, value = item.partition("=")
        if key not in {"method", "backbone", "k", "batch_size", "image_size", "steps", "warmup", "threads"}:
            print(f"error: bench.{key}: unknown option; allowed: method, backbone, k, batch_size, image_size, "
                  "steps, warmup, threads", file=sys.stderr)
            return 2
        kwargs[key] = value if isinstance(defaults.get(key, ""), str) else int(value)
    try:
        result = measure_ddp_overhead(int(argv[1]), **kwargs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    print(f"{result['world_size']} processes: {result['ddp_step_s'] * 1e3:.1f} ms/step vs "
          f"{result['single_step_s'] * 1e3:.1f} ms in one process at batch {result['batch_size']} per process "
          f"({result['overhead_pct']:+.1f}%)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # run the importable copy, so spawned workers pickle functions by reference to lla.bench.ddp
    from lla.bench.ddp import main as _main

    sys.exit(_main())
