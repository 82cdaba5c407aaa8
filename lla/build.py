"""Build a run from a composed config: the datamodule and the model, every check made first.

Shared by the entry point (``lla/cli.py``) and the tools (``lla/bench``, ``mode=eval``); it imports neither.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lla import validate
from lla.errors import ConfigError
from lla.validate import check_before_fit, check_command, check_config, explain_hydra_error

#: the Hydra config folder (``conf/``)
CONF_DIR = str(validate.CONF_DIR)


def quiet_lightning() -> None:
    """Silence Lightning's info lines and the warnings that do not apply to lla's runs (tiny loaders, manual
    optimization, resumed run folders)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resuming
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")  # resuming
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning vs newer torch
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")  # lla.engine's, on purpose
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # tiny runs


def git_commit() -> str | None:
    """The commit of the lla checkout this code runs from, or None (not a git checkout, no git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def build(cfg: DictConfig, choices: dict[str, str] | None = None):
    """Instantiate (datamodule, model) from a composed config; every check happens before data loads."""
    from lla.config import check_keys, instantiate_checked

    check_config(cfg)
    from lla.compile import check_options as check_compile
    from lla.compile import compile_model

    check_compile(cfg.get("compile", False), cfg.get("compile_mode", "default"), cfg.get("compile_dynamic", False))
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
    if cfg.get("compile", False):  # after the layout: the graphs are traced for the weights' final format
        compile_model(model, cfg.get("compile_mode", "default"), cfg.get("compile_dynamic", False))
    trainer_cfg = cfg.get("trainer") or {}  # per-module accumulation/clipping: the engine's, never the Trainer's
    model.configure_module_steps(trainer_cfg.get("accumulate_grad_batches", 1) or 1,
                                 trainer_cfg.get("gradient_clip_val"), trainer_cfg.get("gradient_clip_algorithm"))
    return dm, model


build_run = build  # (check_run's argument ``build`` hides the function)


# ---------------------------------------------------------------------------------------------- everything
def check_run(overrides: Sequence[str], conf_dir: Path | str = validate.CONF_DIR,
              build: Callable[[DictConfig], tuple[Any, Any]] | None = None) -> None:
    """Every check ``python run.py <overrides>`` makes before training, in-process (tests, notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_command(overrides, conf_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    except Exception as err:
        mapped = explain_hydra_error(err, overrides, conf_dir)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        GlobalHydra.instance().clear()
    method = str(cfg.hydra.runtime.choices.get("method", ""))
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    check_config(cfg)
    dm, model = (build or build_run)(cfg)
    check_before_fit(dm, model, method)
