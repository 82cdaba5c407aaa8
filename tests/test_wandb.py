"""W&B logging: one offline run per multirun job (grouped, named, typed), and training that survives W&B failing."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from lla.cli import CONF_DIR, finish_wandb, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dataset=synthetic", "dataset.image_size=16", "dataset.num_samples=64", "dataset.num_val=32",
        "backbone=resnet20", "method=dgl", "k=2", "trainer=cpu", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "measure.timer_warmup=0"]


def wandb_env(tmp: Path) -> dict[str, str]:
    """Offline W&B that writes nothing outside ``tmp``."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp / "wandb-home")
    return env


def wandb_records(path: Path):
    """Protobuf records of an offline ``run-<id>.wandb`` file (LevelDB-style log: 32 KiB blocks of chunks with a
    7-byte header: crc32, length, type 1=full 2=first 3=middle 4=last)."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def summarize(run_file: Path) -> dict:
    out = {"config": set(), "history": set(), "exit": None}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, project=rec.run.project, group=rec.run.run_group,
                       job_type=rec.run.job_type, name=rec.run.display_name)
        elif kind == "config":
            for item in rec.config.update:
                out["config"].add(item.key)
                if item.key == "modules":
                    out["modules"] = json.loads(item.value_json)
        elif kind == "history":
            out["history"] |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def test_two_job_multirun_gives_two_separate_grouped_runs_and_two_results(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "run.py", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}", "-m"],
                          cwd=ROOT, env=wandb_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    runs = []
    for job in jobs:
        result = json.loads((job / "results.json").read_text())  # W&B or not, every run writes results.json
        assert result["modules"] == 2 and result["val_acc_best"] is not None
        assert result["config"]["method"]["_target_"] == "lla.methods.dgl.DGL" and result["train_time_s"] > 0
        assert (job / "checkpoints" / "best.ckpt").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")  # one W&B run per job, inside its folder
        runs.append(summarize(run_file))
    assert runs[0]["id"] != runs[1]["id"]
    for seed, run in enumerate(runs):
        assert run["project"] == "lla" and run["group"] == str(sweep) and run["job_type"] == "dgl"
        assert f"seed={seed}" in run["name"] and "hydra" not in run["name"]
        assert {"method", "backbone", "dataset", "optim", "trainer"} <= run["config"]  # the resolved config ...
        assert run["modules"] == 2  # ... with the real module count
        assert {"train/loss/m0", "train/loss/m1", "val/acc", "val/acc_best", "train/lr", "perf/images_per_s",
                "perf/step_time_s", "perf/peak_activation_mb"} <= run["history"]
        assert run["exit"] == 0  # finished before the next job started


def test_training_goes_on_when_wandb_cannot_start(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")

    def broken_init(*args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, "logger=wandb"])
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
    with caplog.at_level(logging.WARNING, logger="lla"):
        result = train(cfg, tmp_path, {"method": "dgl", "dataset": "synthetic"}, TINY)
    assert "could not start" in caplog.text and "W&B is down" in caplog.text
    assert result["val_acc_best"] is not None and (tmp_path / "results.json").is_file()
    assert not list(tmp_path.glob("wandb/offline-run-*"))


class _Run:
    def __init__(self, fail: bool = False):
        self.codes, self.fail = [], fail

    def finish(self, exit_code=0):
        self.codes.append(exit_code)
        if self.fail:
            raise OSError("disk full")


class FakeWandbLogger:
    def __init__(self, run):
        self._experiment = self.experiment = run


def test_finish_wandb_closes_failed_runs_and_never_raises(caplog):
    run = _Run()
    finish_wandb(FakeWandbLogger(run), exit_code=1)
    assert run.codes == [1]
    finish_wandb(FakeWandbLogger(None))  # W&B never started: nothing to finish
    finish_wandb(False)
    with caplog.at_level(logging.WARNING, logger="lla"):
        finish_wandb(FakeWandbLogger(_Run(fail=True)))
    assert "disk full" in caplog.text
