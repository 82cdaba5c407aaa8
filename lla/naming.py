"""Run-folder and run names, and the one list of settings that do not change an experiment.

A run folder is a pure function of the command: ``python run.py method=dgl k=8`` trains in ``outputs/k-8_method-dgl``
(overrides sorted, ``key-value`` items joined by ``_``), so rerunning the command finds the folder, and the checkpoint,
of the first attempt. The names hold only characters Hydra reads unquoted (letters, digits, ``_ - + .``), so a folder
lla created can be passed back as it is: ``run_dir=outputs/k-8_method-dgl`` or
``mode=eval ckpt_path=outputs/k-8_method-dgl/checkpoints/best.ckpt``.

:data:`NON_EXPERIMENT_KEYS` lists the settings that never make two runs different experiments (paths, logging,
checkpoint cadence, progress display...). They are left out of folder names and W&B run names, and ``lla-report``
never splits a table row on them. It is the only such list: conf/config.yaml names folders through the resolvers
of :mod:`lla.validate`, which read it from here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

#: config keys (dotted, ``fnmatch`` patterns) that do not change what is trained
NON_EXPERIMENT_KEYS: tuple[str, ...] = (
    "hydra", "hydra.*", "hydra/*",  # Hydra's own settings (launcher, sweep folder, ...)
    "logger", "logger.*",  # where and how metrics are logged (wandb / csv / none, offline or online, project)
    "run_dir", "resume", "ckpt_path", "label",  # where the run lives, whether it resumes, its row name
    "checkpoint", "checkpoint.*", "nan_check_every", "progress_every", "measure", "measure.*",
    "optim.fused",  # the same SGD rule in one kernel
    "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "dataset.root", "dataset.download", "dataset.num_workers", "dataset.pin_memory", "dataset.persistent_workers",
    "dataset.verify_md5", "dataset.eval_batch_size",
    "k_sweep", "k_sweep.*", "auglocal_readme_depth", "auglocal_readme_depth.*",  # sweep menus, not settings
    "published", "published.*",  # an experiment's published results (lla.paper), not a setting
)

#: longest folder name (bytes): file systems stop at 255, and a sweep job's number goes in front
MAX_NAME = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+\-]+")  # what Hydra does not read unquoted, plus path separators


def is_non_experiment(key: str, extra: Iterable[str] = ()) -> bool:
    """Whether the dotted config key ``key`` (or an override's key / group) is in :data:`NON_EXPERIMENT_KEYS`."""
    key = str(key).lstrip("+~")
    return any(fnmatchcase(key, pattern) for pattern in (*NON_EXPERIMENT_KEYS, *extra))


def split_override(text: str) -> tuple[str, str]:
    """``+method.ema_momentum=0.9`` -> ``("method.ema_momentum", "0.9")``; a deletion ``~key`` -> ``(key, "none")``."""
    text = str(text)
    if text.startswith("~"):
        return text.lstrip("~").split("=", 1)[0], "none"
    key, _, value = text.lstrip("+").partition("=")
    return key, value


def clean_value(value: str) -> str:
    """A value as a folder-name fragment: quotes dropped, every run of other characters (``/ , = [ ] :``...) -> ``+``."""
    value = str(value).strip().strip("'\"")
    return _UNSAFE.sub("+", value).strip(".") or "none"


def experiment_items(overrides: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of a command's overrides that change the experiment, sorted by key."""
    items = [split_override(o) for o in overrides]
    return sorted((k, v) for k, v in items if k and not is_non_experiment(k))


def run_name(overrides: Iterable[str] | None) -> str:
    """``["method=dgl", "k=16", "logger=none"]`` -> ``k-16_method-dgl``; ``default`` without overrides.

    Every value stays visible: when the full name is too long for a file system the keys shrink to their last part
    (``method.ema_momentum`` -> ``ema_momentum``), and only past that a prefix plus a hash of the whole stands in."""
    if isinstance(overrides, str):  # an old-style ``k=8,method=dgl`` string
        overrides = [o for o in overrides.split(",") if o]
    items = experiment_items(overrides or [])
    name = "_".join(f"{k}-{clean_value(v)}" for k, v in items) or "default"
    if len(name.encode()) > MAX_NAME:
        name = "_".join(f"{k.rsplit('.', 1)[-1]}-{clean_value(v)}" for k, v in items)
    if len(name.encode()) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name.encode()[:MAX_NAME - 11].decode(errors='ignore')}-{digest}"
    return name


# ---------------------------------------------------------------------------------------------- before this scheme
#: what folder names left out before this scheme (Hydra's override_dirname with these exclude_keys)
_LEGACY_EXCLUDE = ("logger", "trainer.enable_progress_bar", "dataset.root", "dataset.num_workers", "run_dir", "resume",
                   "ckpt_path", "checkpoint.every_n_steps", "nan_check_every", "progress_every", "optim.fused")


def legacy_run_name(overrides: Iterable[str]) -> str:
    """The folder name the same command got before (``k=8,method=dgl``, cut at 120 characters plus a hash)."""
    lines = sorted(str(o) for o in overrides if split_override(str(o))[0] not in _LEGACY_EXCLUDE)
    name = ",".join(lines).replace("/", "_").replace("\\", "_").strip(".") or "default"
    if len(name) > 120:
        name = f"{name[:109]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def existing_folder(new: str, old: str) -> str:
    """``new``, unless only ``old`` (the same command's folder under the previous naming) exists: a rerun of an old
    command then resumes in its old folder."""
    return old if old != new and not Path(new).exists() and Path(old).is_dir() else new


def method_label(method: str, method_cfg: Any = None) -> str:
    """``dgl+man`` for a plug-in on a base rule (MAN, MLAAN, AugLocal with ``base``), else the method's name."""
    base = method_cfg.get("base") if method_cfg is not None and hasattr(method_cfg, "get") else None
    return f"{base}+{method}" if base else str(method)
