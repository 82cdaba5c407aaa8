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

from lla.errors import ConfigError

log = logging.getLogger("lla")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")


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


def build(cfg: DictConfig, choices: dict[str, str] | None = None):
    """Instantiate (datamodule, model) from a composed config; every check happens before data loads."""
    from lla.config import check_keys, instantiate_checked

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
    return dm, model


def train(cfg: DictConfig, out_dir: Path, choices: dict[str, str], overrides: list[str],
          sweep_group: str | None = None) -> dict[str, Any]:
    """Fit one configuration and write ``results.json`` into ``out_dir``."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lla.callbacks import ActivationMemory, StepTimer

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
                           save_last=True, auto_insert_metric_name=False)
    trainer = instantiate(cfg.trainer, callbacks=[timer, act, ckpt], logger=logger, default_root_dir=str(out_dir))

    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    t0 = time.time()
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    result = {
        **info,
        "k_label": info.pop("k"),
        "val_acc": metrics.get("val/acc"),
        "val_acc_best": metrics.get("val/acc_best"),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "peak_activation_mb": act.peak_mb,
        "step_time_s": timer.step_time_s,
        "images_per_s": timer.images_per_s,
        "train_time_s": time.time() - t0,
        "overrides": overrides,
        "git_commit": _git_commit(),
        "output_dir": str(out_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    if logger and hasattr(logger, "experiment") and "Wandb" in type(logger).__name__:
        try:
            logger.experiment.finish()  # runs of a multirun stay separate
        except Exception as err:
            log.warning("wandb finish failed: %s", err)
    acc = result["val_acc_best"]
    log.info("lla: best val/acc %s, results in %s", f"{acc:.4f}" if acc is not None else "n/a", out_dir / "results.json")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    group = str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    try:
        result = train(cfg, Path(hc.runtime.output_dir), dict(hc.runtime.choices), list(hc.overrides.task), group)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return result.get("val_acc_best")


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
