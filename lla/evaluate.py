"""``python run.py mode=eval ckpt_path=<run>/checkpoints/best.ckpt``: evaluate a checkpoint with its run's config.

The network is rebuilt from the training run's own ``config.yaml`` (found next to the ``checkpoints/`` folder), not
from today's defaults, so a checkpoint evaluates the same way after conf/ changes. Overrides on the eval command line
(``dataset.root=...``, ``trainer=gpu``, ``dataset.eval_batch_size=...``) still apply on top. Evaluation runs on one
device over the validation split, which is the test split for every dataset lla ships (docs/recipes.md#test-as-validation); the
numbers go to ``eval.json`` in the eval command's own output folder and to ``eval_<checkpoint>.json`` in the run's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lla.errors import ConfigError

log = logging.getLogger("lla")

#: keys of the eval command that say *what* to evaluate, never applied to the saved config
EVAL_KEYS = ("mode", "ckpt_path")


def find_run_dir(ckpt: Path) -> Path:
    """The training run folder of a checkpoint: the nearest parent holding ``config.yaml`` (``<run>/checkpoints/``)."""
    for parent in list(ckpt.resolve().parents)[:3]:
        if (parent / "config.yaml").is_file():
            return parent
    raise ConfigError("ckpt_path", f"no config.yaml in the run folder above {ckpt}",
                      "a checkpoint an lla run wrote, e.g. <run dir>/checkpoints/best.ckpt or last.ckpt")


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's saved config with every interpolation resolved as it was during training.

    ``${hydra:...}`` (conf/row uses ``${hydra:runtime.choices.dataset}`` to pick InfoPro presets) must read the
    *training* job's Hydra config, which Hydra saved as ``.hydra/hydra.yaml``, not the eval job's.
    """
    text = (run_dir / "config.yaml").read_text()
    if "${hydra:" not in text:
        cfg = OmegaConf.create(text)
        OmegaConf.resolve(cfg)
        return cfg
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        raise ConfigError("ckpt_path", f"{run_dir / 'config.yaml'} uses ${{hydra:...}} but {hydra_file} is missing",
                          "a run folder written by `python run.py` (it keeps .hydra/)")
    cfg = OmegaConf.create(text.replace("${hydra:", "${hydra."))
    cfg.hydra = OmegaConf.load(hydra_file).hydra
    OmegaConf.resolve(cfg)
    del cfg["hydra"]
    return cfg


def apply_overrides(saved: DictConfig, current: DictConfig, overrides: list[str],
                    groups: set[str] = frozenset()) -> tuple[DictConfig, list[str]]:
    """Put the eval command's overrides on the saved config, reading each value from ``current`` (the eval
    command's composed config), so Hydra's parsing and group files are honoured. Returns (config, ignored).

    A group override (``trainer=gpu``) replaces that node. Groups without a node of their own (row, net, experiment)
    and ``hydra.*`` cannot apply to a finished run; they are returned as ignored.
    """
    ignored = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("~+")
        if key in EVAL_KEYS:
            continue
        value = OmegaConf.select(current, key, default=None)
        if key.startswith("hydra") or (key in groups and not isinstance(value, DictConfig)):
            ignored.append(override)
        elif override.startswith("~"):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
        else:
            if isinstance(value, DictConfig):
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(saved, key, value, merge=False, force_add=True)
    return saved, ignored


def eval_trainer(cfg: DictConfig):
    """One device, no logger/checkpoints: evaluation is cheap and must not touch the training run's folder."""
    import lightning as L

    t = cfg.trainer
    limit = t.get("limit_val_batches")
    return L.Trainer(accelerator=t.get("accelerator", "auto"), devices=1, precision=t.get("precision", "32-true"),
                     logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=bool(t.get("enable_progress_bar", False)),
                     limit_val_batches=1.0 if limit is None else limit)


def evaluate(cfg: DictConfig, out_dir: Path, overrides: list[str], choices: dict[str, Any] | None = None) -> dict:
    """Evaluate ``cfg.ckpt_path`` with its run's config; writes and returns ``eval.json``'s content."""
    import torch

    from lla.build import build, quiet_lightning

    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path", "mode=eval needs a checkpoint", "ckpt_path=<run dir>/checkpoints/best.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise ConfigError("ckpt_path", f"{ckpt} does not exist", "a .ckpt file written by a training run")
    quiet_lightning()
    run_dir = find_run_dir(ckpt)
    run_cfg, ignored = apply_overrides(load_run_config(run_dir), cfg, overrides, set(choices or {}))
    for override in ignored:
        log.warning("mode=eval: %s does not apply to a finished run; ignored", override)

    dm, model = build(run_cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own file: it holds Lightning metadata
    model.load_state_dict(state["state_dict"])
    metrics = eval_trainer(run_cfg).validate(model, datamodule=dm, verbose=False)[0]
    saved = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    result = {
        "ckpt_path": str(ckpt),
        "run_dir": str(run_dir),
        "epoch": state.get("epoch"),
        "global_step": state.get("global_step"),
        "val_acc": metrics.get("val/acc"),
        "val_loss": metrics.get("val/loss"),
        "val_acc_top5": metrics.get("val/acc_top5"),
        "method": saved.get("method"),
        "dataset": saved.get("dataset"),
        "backbone": run_cfg.backbone.get("name"),
        "k_label": saved.get("k_label", run_cfg.k),
        "modules": model.num_modules,
        "overrides": [o for o in overrides if o not in ignored and o.split("=", 1)[0].lstrip("~+") not in EVAL_KEYS],
        "config": OmegaConf.to_container(run_cfg, resolve=True),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    (out_dir / "eval.json").write_text(text)
    (run_dir / f"eval_{ckpt.stem}.json").write_text(text)  # also with the run: the eval folder is shared by evals
    acc = result["val_acc"]
    log.info("lla: %s (epoch %s): val/acc %s, written to %s", ckpt.name, result["epoch"],
             f"{acc:.4f}" if acc is not None else "n/a", out_dir / "eval.json")
    return result
