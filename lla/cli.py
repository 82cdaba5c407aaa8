"""Hydra entry point (``python run.py ...`` / ``lla-train ...``): validate, instantiate, fit, write results.json.

Bad input ends with one line ``error: <key>: <problem>; allowed: <...>`` and exit code 2, before data loads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lla import validate  # also registers the ${lla_run_dir:...} resolver conf/config.yaml uses
from lla.errors import ConfigError

log = logging.getLogger("lla")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resuming


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def run_name_from_overrides(overrides: list[str]) -> str:
    """``method=dgl k=16`` -> ``method=dgl,k=16``: the W&B run name and the folder suffix of a sweep job."""
    keep = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(("hydra", "logger"))]
    return ",".join(keep) or "default"


def finish_wandb(logger: Any, exit_code: int = 0) -> None:
    """End this job's W&B run, so the next job of a multirun (same process) starts its own; never raises."""
    if logger and "Wandb" in type(logger).__name__ and getattr(logger, "_experiment", None) is not None:
        try:
            logger.experiment.finish(exit_code=exit_code)
        except Exception as err:
            log.warning("wandb finish failed: %s", err)


def build(cfg: DictConfig, choices: dict[str, str] | None = None):
    """Instantiate (datamodule, model) from a composed config; every check happens before data loads."""
    from lla.config import check_keys, instantiate_checked

    validate.check_config(cfg)
    check_keys(cfg.dataset, "dataset")
    check_keys(cfg.method, "method", provided={"backbone", "k", "num_classes", "image_size", "optim",
                                                "max_epochs", "denormalize"})
    if cfg.k is None or int(cfg.k) < 1:
        raise ConfigError("k", f"must be a positive integer, got {cfg.k}", "1..number of layers of the backbone")
    dm = instantiate_checked(cfg.dataset, "dataset")
    backbone = instantiate_checked(cfg.backbone, "backbone", num_classes=dm.num_classes)
    model = instantiate_checked(
        cfg.method, "method", backbone=backbone, k=int(cfg.k), num_classes=dm.num_classes,
        image_size=dm.image_size, optim=OmegaConf.to_container(cfg.optim, resolve=True),
        max_epochs=int(cfg.trainer.max_epochs), denormalize=dm.denormalize)
    if cfg.get("channels_last", False):
        model.use_channels_last()
    return dm, model


def train(cfg: DictConfig, out_dir: Path, choices: dict[str, str], overrides: list[str],
          sweep_group: str | None = None) -> dict[str, Any]:
    """Fit one configuration and write ``results.json`` into ``out_dir``."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lla.callbacks import ActivationMemory, StepTimer
    from lla.checkpointing import RunLock, reliability_callbacks, resolve_resume, stop_status, trainer_plugins

    _quiet_lightning()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run_name_from_overrides(overrides)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm, model = build(cfg, choices)
    method_name = choices.get("method", type(model).__name__.lower())
    info = {"method": method_name, "backbone": cfg.backbone.get("name", choices.get("backbone")),
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

    logger: Any = False
    if cfg.logger and "_target_" in cfg.logger:
        extra = {"save_dir": str(out_dir)}
        if "Wandb" in cfg.logger._target_:
            extra.update(name=name, job_type=method_name, group=sweep_group, dir=str(out_dir))
        try:
            logger = instantiate(cfg.logger, **extra)
            if hasattr(logger, "log_hyperparams"):
                logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "modules": info["modules"]})
        except Exception as err:  # a logger must never stop training
            log.warning("logger %s could not start (%s); training goes on without it", cfg.logger._target_, err)
            logger = False

    timer = StepTimer(warmup=int(cfg.measure.timer_warmup))
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
        callbacks.append(TQDMProgressBar(refresh_rate=int(cfg.get("progress_every", 1))))
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, plugins=trainer_plugins(),
                              logger=logger, default_root_dir=str(out_dir))
    except Exception as err:  # e.g. trainer.precision=17, or trainer=gpu on a machine without one
        cause = err.__cause__ or err
        raise ConfigError("trainer", f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}",
                          "see conf/trainer/*.yaml and Lightning's Trainer arguments") from None

    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    t0 = time.time()
    if resume.path:
        log.info("lla: resuming from %s (epoch %s, step %s)", resume.path, resume.epoch, resume.global_step)
    status, stop = "completed", None
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=resume.path)
    except BaseException as err:  # results.json is still written; the error is raised again below
        status, stop = stop_status(err, preemption.stopped_by), err
        finish_wandb(logger, exit_code=1)  # a failed job must not leave its run open for the next one
    if stop is None and resume.path and "val/acc" not in trainer.callback_metrics:
        trainer.validate(model, datamodule=dm, verbose=False)  # resumed at the very end: nothing left to train
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
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
        "peak_activation_mb": act.peak_mb,
        "peak_cuda_mb": timer.peak_cuda_mb,
        "label": cfg.get("label"),
        "choices": {g: c for g, c in choices.items() if not g.startswith("hydra/")},
        "step_time_s": timer.step_time_s,
        "images_per_s": timer.images_per_s,
        "train_time_s": time.time() - t0,
        "overrides": overrides,
        "git_commit": _git_commit(),
        "output_dir": str(out_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:  # two ranks writing one file at once can interleave it
        (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    lock.release()
    if isinstance(stop, SIGTERMException):  # a signal stopped every rank after the same batch
        line = preemption.finish(stop, trainer, last_ckpt)  # exit code 143 (130: Ctrl-C); requeue on SLURM
        if trainer.is_global_zero:
            log.warning("%s", line)
    if stop is not None:
        raise stop
    finish_wandb(logger)  # runs of a multirun stay separate
    acc = result["val_acc_best"]
    log.info("lla: best val/acc %s, results in %s", f"{acc:.4f}" if acc is not None else "n/a", out_dir / "results.json")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lla.checkpointing import EXIT_NON_FINITE, EXIT_PREEMPTED, NonFiniteLossError

    hc = HydraConfig.get()
    group = str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    try:
        if cfg.mode == "eval":
            from lla.evaluate import evaluate

            return evaluate(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task),
                            dict(hc.runtime.choices)).get("val_acc")
        if cfg.mode != "train":
            raise ConfigError("mode", f"unknown mode {cfg.mode!r}", "train, eval")
        result = train(cfg, Path(hc.runtime.output_dir), dict(hc.runtime.choices), list(hc.overrides.task), group)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:  # the last good checkpoint and results.json are kept
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE)
    except SIGTERMException as err:  # last.ckpt saved (and the job requeued on SLURM): rerun the command to resume
        sys.exit(err.code or EXIT_PREEMPTED)  # 143, or 130 after Ctrl-C
    return result.get("val_acc_best")


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
        mapped = validate.explain_hydra_error(err, argv)
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
