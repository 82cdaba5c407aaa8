"""Hydra entry point (``python run.py ...`` / ``lla-train ...``): validate, instantiate, fit, write results.json.

Bad input ends with one line ``error: <key>: <problem>; allowed: <...>`` and exit code 2, before data loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lla import naming, validate  # validate registers the resolvers conf/config.yaml uses
from lla.build import CONF_DIR, build, git_commit, quiet_lightning
from lla.errors import ConfigError

log = logging.getLogger("lla")


def run_name_from_overrides(overrides: list[str]) -> str:
    """``method=dgl k=16 logger=none`` -> ``k-16_method-dgl``: the W&B run name, the folder name of a run (without
    the settings that do not change the experiment, lla.naming)."""
    return naming.run_name(overrides)


def write_run_file(path: Path, text: str) -> None:
    """A run-folder file (results.json, config.yaml) written to a temporary name and renamed: readers, and a rerun
    after a kill, see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def gather_ranks(values: dict[str, Any]) -> dict[str, list] | None:
    """Every process's ``values`` (a dict of numbers) as {key: [rank 0's, rank 1's, ...]}; None in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return {key: [g.get(key) for g in gathered] for key in values}


def combine_ranks(per_rank: dict[str, list]) -> dict[str, Any]:
    """The run's figures from every rank's: the slowest rank's step time, the summed throughput, the highest peak."""
    def known(key):
        return [v for v in per_rank.get(key, []) if v is not None]

    out: dict[str, Any] = {}
    for key, combine in (("step_time_s", max), ("images_per_s", sum), ("peak_cuda_mb", max),
                         ("peak_activation_mb", max)):
        out[key] = combine(known(key)) if known(key) else None
    return out


def end_line(result: dict[str, Any]) -> str:
    """The one line a job ends with: method (with base), dataset, best / last accuracy, modules, memory, folder."""
    def acc(key):
        return f"{result[key]:.4f}" if result.get(key) is not None else "n/a"

    memory = (f"peak CUDA {result['peak_cuda_mb']:.0f} MB" if result.get("peak_cuda_mb")
              else f"peak activations {result['peak_activation_mb']:.1f} MB" if result.get("peak_activation_mb")
              else "peak memory n/a")
    return (f"{result.get('method_label') or result.get('method')} on {result.get('dataset')}: best val/acc "
            f"{acc('val_acc_best')}, last {acc('val_acc')}, {result.get('modules')} modules, {memory}, "
            f"{result.get('output_dir')}")


def finish_wandb(logger: Any, exit_code: int = 0) -> None:
    """End this job's W&B run, so the next job of a multirun (same process) starts its own; never raises."""
    from lla.compat import logger_experiment_started

    if logger and "Wandb" in type(logger).__name__ and logger_experiment_started(logger):
        try:
            logger.experiment.finish(exit_code=exit_code)
        except Exception as err:
            log.warning("wandb finish failed: %s", err)


def train(cfg: DictConfig, out_dir: Path, choices: dict[str, str], overrides: list[str],
          sweep_group: str | None = None) -> dict[str, Any]:
    """Fit one configuration and write ``results.json`` into ``out_dir``."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lla.callbacks import ActivationMemory, LossProgressBar, StepTimer
    from lla.checkpointing import RunLock, reliability_callbacks, resolve_resume, stop_status, trainer_plugins
    from lla.loggers import make_logger

    quiet_lightning()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run_name_from_overrides(overrides)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm, model = build(cfg, choices)
    method_name = choices.get("method", type(model).__name__.lower())
    info = {"method": method_name, "method_label": naming.method_label(method_name, cfg.method),
            "backbone": cfg.backbone.get("name", choices.get("backbone")),
            "dataset": choices.get("dataset"), **model.describe(), "seed": int(cfg.seed)}
    log.info("lla: %s on %s with %s: K=%s -> %d modules (boundaries %s)", method_name, info["dataset"],
             info["backbone"], info["k"], info["modules"], info["boundaries"])
    validate.check_before_fit(dm, model, method_name)  # data files, image size: before anything heavy
    lock = RunLock(out_dir).acquire()  # one process per run folder; released below or when the process ends
    resume = resolve_resume(cfg.get("ckpt_path"), bool(cfg.get("resume", True)), out_dir,
                            OmegaConf.to_container(cfg.trainer, resolve=True))
    if resume.finished is not None:
        log.info("lla: %s already finished (results.json); resume=false trains it again", out_dir)
        lock.release()
        return resume.finished

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = int(getattr(rank_zero_only, "rank", 0) or 0)
    logger = make_logger(cfg.logger if "logger" in cfg else None, out_dir, name=name, job_type=info["method_label"],
                         group=sweep_group, resuming=resume.path is not None, rank=rank,
                         hparams={**OmegaConf.to_container(cfg, resolve=True), "modules": info["modules"]})

    timer = StepTimer(warmup=int(cfg.measure.timer_warmup), read_every=int(cfg.get("progress_every", 10)))
    act = ActivationMemory(batches=int(cfg.measure.activation_batches))
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor="val/acc", mode="max",
                           save_last=False, auto_insert_metric_name=False, enable_version_counter=False)
    # last.ckpt every N steps + every epoch + on SIGTERM/SIGUSR1/2, NaN check, exact-resume state (lla.checkpointing)
    safety, last_ckpt, preemption = reliability_callbacks(
        out_dir, every_n_steps=int(cfg.get("checkpoint", {}).get("every_n_steps", 0)),
        nan_check_every=int(cfg.get("nan_check_every", 10)), seed=int(cfg.seed), method=method_name)
    callbacks = [timer, act, ckpt, *safety]
    if cfg.trainer.get("enable_progress_bar", True):
        # Each refresh turns the logged train/loss into a Python float: one GPU->CPU sync, which per step would stall
        # the K modules' kernel launches behind the GPU.
        callbacks.append(LossProgressBar(refresh_rate=int(cfg.get("progress_every", 1))))
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, plugins=trainer_plugins(),
                              logger=logger, default_root_dir=str(out_dir), accumulate_grad_batches=1,
                              gradient_clip_val=None, gradient_clip_algorithm=None)  # done per module (build)
    except Exception as err:  # e.g. trainer.precision=17, or trainer=gpu on a machine without one
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):  # a trainer class's own one-line error (trainer=pipeline)
            raise cause from None
        raise ConfigError("trainer", f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}",
                          "see conf/trainer/*.yaml and Lightning's Trainer arguments") from None

    if trainer.global_rank == 0:  # one writer per run folder
        write_run_file(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=False))
    if cfg.get("compile", False) and trainer.strategy.root_device.type == "cpu":
        log.info("lla: compile=true on a CPU: pays with modules of several blocks, costs with one block per module "
                 "(docs/compile.md#speed)")
    t0 = time.time()
    if resume.path:
        log.info("lla: resuming from %s (epoch %s, step %s)", resume.path, resume.epoch, resume.global_step)
    status, stop = "completed", None
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=resume.path)
    except BaseException as err:  # results.json is still written; the error is raised again below
        status, stop = stop_status(err, preemption.stopped_by), err
    if stop is None and resume.path and "val/acc" not in trainer.callback_metrics:
        trainer.validate(model, datamodule=dm, verbose=False)  # resumed at the very end: nothing left to train
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    mine = {"step_time_s": timer.step_time_s, "images_per_s": timer.images_per_s, "peak_cuda_mb": timer.peak_cuda_mb,
            "peak_activation_mb": act.peak_mb}
    # every rank's figures (a collective: only when every rank finished fit, so none is missing)
    per_rank = gather_ranks(mine) if status == "completed" else None
    figures = combine_ranks(per_rank) if per_rank else mine
    record = getattr(trainer.strategy, "run_record", None)  # trainer=pipeline: stages, boundaries, waits (a collective)
    pipeline = record() if record is not None and status == "completed" else None
    if pipeline and per_rank and all(v is not None for v in per_rank["images_per_s"]):
        figures["images_per_s"] = min(per_rank["images_per_s"])  # every stage sees every image: the slowest one's
    result = {
        "status": status,  # completed | preempted | diverged (NaN/inf loss) | interrupted | failed
        "error": None if stop is None or status in ("preempted", "interrupted") else str(stop),
        "resumed_from": resume.path,
        "last_checkpoint": last_ckpt.saved_path,
        **info,
        "k_label": info.pop("k"),
        "val_acc": metrics.get("val/acc"),
        "val_acc_best": metrics.get("val/acc_best"),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "peak_activation_mb": figures["peak_activation_mb"],  # the highest of every rank's
        "peak_cuda_mb": figures["peak_cuda_mb"],
        "label": cfg.get("label"),
        "choices": {g: c for g, c in choices.items() if not g.startswith("hydra/")},
        "step_time_s": figures["step_time_s"],  # the slowest rank's median step
        "images_per_s": figures["images_per_s"],  # summed over ranks
        "per_rank": per_rank,  # {figure: [rank 0, rank 1, ...]} under DDP, else null
        "pipeline": pipeline,  # trainer=pipeline: stage boundaries, module times, per-stage waits; else null
        "train_time_s": time.time() - t0,
        "overrides": overrides,
        "git_commit": git_commit(),
        "output_dir": str(out_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.global_rank == 0:  # one writer per run folder
        write_run_file(out_dir / "results.json", json.dumps(result, indent=2, default=str))
    lock.release()
    if stop is not None:  # after results.json: a slow W&B upload must not outlast the launcher's grace period
        finish_wandb(logger, exit_code=1)  # a failed job must not leave its run open for the next one
    if isinstance(stop, SIGTERMException):  # a signal stopped every rank after the same batch
        line = preemption.finish(stop, trainer, last_ckpt)  # exit code 143 (130: Ctrl-C); requeue on SLURM
        if trainer.is_global_zero:
            log.warning("%s", line)
    if stop is not None:
        raise stop
    finish_wandb(logger)  # runs of a multirun stay separate
    if trainer.global_rank == 0:
        log.info("lla: done: %s", end_line(result))
    return result


#: one entry per finished job of this process's multirun, for the summary at its end (:func:`multirun_summary`)
JOBS: list[dict[str, Any]] = []


def _task(cfg: DictConfig, hc: Any, group: str | None) -> tuple[float | None, dict[str, Any]]:
    """Evaluate or train one configuration: (the value Hydra's sweepers read, the result)."""
    if cfg.mode == "eval":
        from lla.evaluate import evaluate

        result = evaluate(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), dict(hc.runtime.choices))
        return result.get("val_acc"), result
    if cfg.mode != "train":
        raise ConfigError("mode", f"unknown mode {cfg.mode!r}", "train, eval")
    result = train(cfg, Path(hc.runtime.output_dir), dict(hc.runtime.choices), list(hc.overrides.task), group)
    return result.get("val_acc_best"), result


def _record_failure(out_dir: Path, status: str, reason: str, started: float, cfg: DictConfig, hc: Any) -> None:
    """A results.json for a job that failed before training wrote its own (bad input, a crash while building)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    path = out_dir / "results.json"
    if getattr(rank_zero_only, "rank", 0) or (path.is_file() and path.stat().st_mtime >= started):
        return
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        config = OmegaConf.to_container(cfg, resolve=False)
    choices = {g: c for g, c in dict(hc.runtime.choices).items() if not str(g).startswith("hydra/")}
    result = {"status": status, "error": reason, "method": choices.get("method"), "dataset": choices.get("dataset"),
              "backbone": choices.get("backbone"), "choices": choices, "overrides": list(hc.overrides.task),
              "output_dir": str(out_dir), "config": config}
    with contextlib.suppress(OSError):
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_file(path, json.dumps(result, indent=2, default=str))


def _multirun_job(cfg: DictConfig, hc: Any, group: str | None) -> float | None:
    """One job of a multirun: a job that fails (bad input, NaN loss, a crash) is recorded in its results.json and in
    the summary, and the sweep goes on. A signal (SIGTERM, Ctrl-C) stops the whole sweep."""
    from lla.checkpointing import stop_status

    out_dir, started, num = Path(hc.runtime.output_dir), time.time(), hc.job.num
    try:
        value, result = _task(cfg, hc, group)
    except Exception as err:
        status = stop_status(err)  # diverged (NaN/inf loss) | failed
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, ConfigError):
            reason = f"{type(err).__name__}: {reason}" if status == "failed" else reason
        if status == "failed" and not isinstance(err, ConfigError):
            import traceback

            traceback.print_exc()  # a real crash: its traceback, then the sweep goes on
        _record_failure(out_dir, status, reason, started, cfg, hc)
        print(f"error: job {num} {status}: {reason}", file=sys.stderr, flush=True)
        JOBS.append({"num": num, "status": status, "line": f"{reason} ({out_dir})"})
        return None
    status = result.get("status", "completed")
    JOBS.append({"num": num, "status": status, "line": end_line(result) if "method" in result else str(out_dir)})
    return value


def multirun_summary() -> int:
    """Print one line per job of this process's multirun; the exit code: 0 when every job completed, 3 when the only
    failures are diverged jobs (NaN/inf loss), else 1."""
    if not JOBS:
        return 0
    from lla.checkpointing import EXIT_NON_FINITE

    counts: dict[str, int] = {}
    for job in JOBS:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    jobs = f"{len(JOBS)} job{'s' if len(JOBS) != 1 else ''}"
    print(f"lla: multirun: {jobs}: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    for job in JOBS:
        print(f"lla:   job {job['num']} {job['status']}: {job['line']}", flush=True)
    bad = {job["status"] for job in JOBS} - {"completed"}
    JOBS.clear()
    if not bad:
        return 0
    return EXIT_NON_FINITE if bad == {"diverged"} else 1


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lla.checkpointing import EXIT_NON_FINITE, EXIT_PREEMPTED, NonFiniteLossError

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    # W&B group: the experiment or sweep config's name; an ad-hoc multirun's folder; logger.group=<name> wins
    group = choices.get("experiment") or choices.get("sweep") or (
        str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None)
    try:
        if hc.mode == RunMode.MULTIRUN:
            return _multirun_job(cfg, hc, group)
        return _task(cfg, hc, group)[0]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:  # the last good checkpoint and results.json are kept
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE)
    except SIGTERMException as err:  # last.ckpt saved (and the job requeued on SLURM): rerun the command to resume
        sys.exit(err.code or EXIT_PREEMPTED)  # 143, or 130 after Ctrl-C


def _output_folder_error(err: BaseException, argv: list[str]) -> ConfigError | None:
    """Hydra could not create or write the run / sweep folder (a path under a file, /proc, no permission): the
    one-line error. Errors raised inside a job (disk full while training) are not this."""
    import traceback

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or any(frame.f_code is _task.__code__ for frame, _ in traceback.walk_tb(err.__traceback__)):
        return None
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "run_dir"
    where = cause.filename if isinstance(cause, OSError) and cause.filename else "the output folder"
    return ConfigError(key, f"cannot write {where} ({cause.strerror or type(cause).__name__})",
                       f"a writable folder, e.g. {key}=<path under your home or scratch disk>")


def main() -> None:
    """``python run.py`` / ``lla-train``: Hydra's own errors (unknown group option or key, bad override syntax) end
    as one ``error:`` line and exit code 2 too, like every other bad input (lla.validate)."""
    argv = sys.argv[1:]
    try:
        validate.check_command(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of Hydra's multi-line report
    try:
        _hydra_main()
    except Exception as err:
        mapped = validate.explain_hydra_error(err, argv) or _output_folder_error(err, argv)
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
        code = multirun_summary()  # a multirun: one line per job (also when a signal stopped it)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
