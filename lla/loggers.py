"""Experiment loggers of a run (W&B, CSV): named after the experiment, continued on resume, never a reason to stop.

* W&B: ``job_type`` is the method with its base rule (``dgl+man``), the group is the experiment or sweep name, the
  run name holds only the overrides that change the experiment. The run id is kept in the run folder
  (``wandb_run_id``), so a resumed run continues the same W&B run (``resume="allow"``) with its steps going on.
* Online W&B without a login or a reachable server falls back to offline logging at once (nothing is dropped; a
  ``wandb sync`` hint is printed), instead of waiting for W&B's own ~90 s timeout.
* CSV: one file per run folder (``csv/version_0/metrics.csv``) that a resumed run appends to.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("lla")
RUN_ID_FILE = "wandb_run_id"
DEFAULT_WANDB_URL = "https://api.wandb.ai"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wandb_run_id(out_dir: Path, resuming: bool, rank: int = 0) -> str:
    """The W&B run id of this run folder: the stored one when the run resumes, else a new one (stored by rank 0)."""
    path = Path(out_dir) / RUN_ID_FILE
    if resuming and path.is_file() and (stored := path.read_text().strip()):
        return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id format
    if rank == 0:
        _atomic_write(path, run_id + "\n")
    return run_id


def wandb_online_problem(timeout_s: float = 3.0) -> str | None:
    """Why online W&B cannot work right now (no API key, server unreachable), or None. Takes at most ``timeout_s``."""
    url = os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_URL
    parsed = urlparse(url if "://" in url else f"https://{url}")
    host = parsed.hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        try:
            import netrc

            found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
        except Exception:
            found = None
        if not found:
            return f"no W&B login for {host} (wandb login, or set WANDB_API_KEY)"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"cannot reach {url} ({err.strerror or err})"
    return None


def _is_wandb(logger_cfg: Any) -> bool:
    return "Wandb" in str(logger_cfg.get("_target_", ""))


def make_logger(logger_cfg: Any, out_dir: Path, *, name: str, job_type: str, group: str | None, resuming: bool,
                hparams: dict, rank: int = 0) -> Any:
    """Instantiate ``cfg.logger`` for the run in ``out_dir`` and log ``hparams`` once; False when there is none or
    it cannot start (training goes on without it)."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return False
    target = str(logger_cfg._target_)
    extra: dict[str, Any] = {"save_dir": str(out_dir)}
    if target.endswith("loggers.CSVLogger"):  # lla's: one file per run folder, which a resumed run appends to
        extra.update(version=0, keep_existing=resuming)
    offline_hint = None
    if _is_wandb(logger_cfg):
        import wandb

        extra.update(name=name, job_type=job_type, dir=str(out_dir), id=wandb_run_id(out_dir, resuming, rank),
                     resume="allow", settings=wandb.Settings(silent=True))
        if logger_cfg.get("group") is None and group:
            extra["group"] = group
        if not logger_cfg.get("offline", False) and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            if (problem := wandb_online_problem()) is not None:
                extra["offline"], offline_hint = True, problem
    try:
        logger = _start(logger_cfg, extra)
    except Exception as err:  # a logger must never stop training
        if _is_wandb(logger_cfg) and not extra.get("offline"):
            offline_hint = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            extra["offline"] = True
            try:
                logger = _start(logger_cfg, extra)
            except Exception as err2:
                log.warning("logger %s could not start (%s); training goes on without it", target, err2)
                return False
        else:
            log.warning("logger %s could not start (%s); training goes on without it", target, err)
            return False
    if offline_hint is not None:
        log.warning("lla: W&B online unavailable (%s); logging offline instead. Upload later: wandb sync %s",
                    offline_hint, Path(out_dir) / "wandb" / "offline-run-*")
    try:
        logger.log_hyperparams(hparams)
    except Exception as err:
        log.warning("logger %s could not log the config (%s); training goes on without it", target, err)
        return False
    # Lightning would log the model's and datamodule's init arguments again, as top-level keys: the config above is
    # the whole run already
    logger.log_hyperparams = lambda *args, **kwargs: None
    return logger


def _start(logger_cfg: Any, extra: dict) -> Any:
    from hydra.utils import instantiate

    from lla.compat import wandb_init_kwargs

    logger = instantiate(logger_cfg, **extra)
    init = wandb_init_kwargs(logger)
    if init is not None:
        init.pop("anonymous", None)  # Lightning passes it; W&B warns that it has no effect
    if hasattr(logger, "experiment"):
        logger.experiment  # start it now: a W&B failure shows here, not in the middle of training  # noqa: B018
    return logger


def _csv_base():
    from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger

    return LightningCSVLogger


class CSVLogger(_csv_base()):
    """Lightning's CSVLogger, except that a resumed run (``keep_existing=True``) appends to the run folder's
    ``metrics.csv`` instead of deleting it (Lightning's writer removes an existing file when it starts)."""

    def __init__(self, *args: Any, keep_existing: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep_existing = keep_existing

    @property
    def experiment(self):
        from lla.compat import started_experiment

        started = started_experiment(self)
        if started is not None:
            return started
        import csv

        path = Path(self.log_dir) / "metrics.csv"
        kept = path.read_bytes() if self.keep_existing and path.is_file() else None
        experiment = super().experiment
        if kept is not None and hasattr(experiment, "metrics_keys"):
            path.write_bytes(kept)
            with open(path, newline="") as f:
                experiment.metrics_keys = sorted(next(csv.reader(f), []))
        return experiment
