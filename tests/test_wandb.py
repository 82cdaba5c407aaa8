"""W&B logging: one offline run per multirun job (grouped, named, typed), and training that survives W&B failing."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
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
    out = {"config": set(), "history": set(), "exit": None, "steps": []}
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
            out["steps"] += [json.loads(item.value_json) for item in rec.history.item
                             if (item.key or "/".join(item.nested_key)) == "trainer/global_step"]
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def settled_summaries(folder: Path, timeout_s: float = 30.0) -> list[dict]:
    """Summaries of every offline run file in ``folder``, once each holds its run and exit records: W&B's service
    process writes the file, and on a loaded machine it may still be flushing just after ``finish()`` returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = [summarize(f) for f in sorted(Path(folder).glob("offline-run-*/run-*.wandb"))]
        if all("id" in r and r["exit"] is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_two_job_multirun_gives_two_separate_grouped_runs_and_two_results(tmp_path):
    sweep = tmp_path / "sweep"
    man = [o for o in TINY if o != "method=dgl"] + ["method=man", "method.base=dgl"]
    proc = subprocess.run([sys.executable, "run.py", *man, "sweep=seeds", "seed=0,1", f"hydra.sweep.dir={sweep}", "-m"],
                          cwd=ROOT, env=wandb_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    runs = []
    for job in jobs:
        result = json.loads((job / "results.json").read_text())  # W&B or not, every run writes results.json
        assert result["modules"] == 2 and result["val_acc_best"] is not None
        assert result["config"]["method"]["_target_"] == "lla.methods.man.MAN" and result["train_time_s"] > 0
        assert (job / "checkpoints" / "best.ckpt").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")  # one W&B run per job, inside its folder
        runs.append(summarize(run_file))
    assert runs[0]["id"] != runs[1]["id"]
    for seed, run in enumerate(runs):
        # job type: the method with its base; group: the sweep config's name, not a timestamp
        assert run["project"] == "lla" and run["group"] == "seeds" and run["job_type"] == "dgl+man"
        assert f"seed-{seed}" in run["name"] and "hydra" not in run["name"]
        assert "enable_progress_bar" not in run["name"] and "timer_warmup" not in run["name"]  # not the experiment
        assert {"method", "backbone", "dataset", "optim", "trainer"} <= run["config"]  # the resolved config ...
        assert run["modules"] == 2  # ... with the real module count
        assert not {"ema_momentum", "base", "num_classes", "max_epochs", "image_size"} & run["config"]  # no repeats
        assert {"train/loss/m0", "train/loss/m1", "val/acc", "val/acc_best", "train/lr", "perf/images_per_s",
                "perf/step_time_s", "perf/peak_activation_mb"} <= run["history"]
        assert run["exit"] == 0  # finished before the next job started
    console = proc.stdout + proc.stderr
    for noise in ("anonymous", "LeafSpec", "on_after_batch_transfer", "Run summary", "Run history"):
        assert noise not in console, noise
    done = [line for line in console.splitlines() if "lla: done: " in line]
    assert len(done) == 2 and all("dgl+man on synthetic: best val/acc" in line and ", last " in line
                                  and "2 modules, peak activations" in line for line in done)
    assert str(jobs[0]) in done[0] and str(jobs[1]) in done[1]


def _tiny_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_a_resumed_run_continues_its_wandb_run_and_steps(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in wandb_env(tmp_path).items():
        if key.startswith("WANDB"):
            monkeypatch.setenv(key, value)
    choices = {"method": "dgl", "dataset": "synthetic"}
    first = train(_tiny_cfg([*TINY, "trainer.max_steps=2"]), tmp_path, choices, TINY)  # stops after 2 of 4 steps
    time.sleep(1.1)  # W&B names offline folders <second>-<run id>: a resume within the same second would share one
    second = train(_tiny_cfg([*TINY, "trainer.max_epochs=2"]), tmp_path, choices, TINY)  # same folder: resumes
    assert first["global_step"] == 2 and second["resumed_from"] and second["global_step"] == 4
    stored = (tmp_path / "wandb_run_id").read_text().strip()
    runs = settled_summaries(tmp_path / "wandb")
    assert len(runs) == 2 and [r.get("id") for r in runs] == [stored, stored]  # one W&B run, logged in two sittings
    assert max(runs[0]["steps"]) <= 2 < max(runs[1]["steps"]) and min(runs[1]["steps"]) >= 2  # steps go on
    third = train(_tiny_cfg([*TINY, "trainer.max_epochs=3", "resume=false"]), tmp_path, choices, TINY)
    assert third["resumed_from"] is None and (tmp_path / "wandb_run_id").read_text().strip() != stored  # new run


def test_a_resumed_run_appends_to_its_csv_file(tmp_path):
    import csv

    choices = {"method": "dgl", "dataset": "synthetic"}
    train(_tiny_cfg([*TINY, "logger=csv", "trainer.max_steps=2", "trainer.log_every_n_steps=1"]), tmp_path, choices,
          TINY)
    train(_tiny_cfg([*TINY, "logger=csv", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]), tmp_path, choices,
          TINY)
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]  # not version_1
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss/m0")]
    assert min(steps) < 2 <= max(steps) and steps == sorted(steps)  # both sittings, steps continuing
    assert sum(1 for r in rows if r.get("val/acc")) == 2  # epoch 0's validation (first sitting) and epoch 1's


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_online_wandb_without_network_falls_back_to_offline_quickly(tmp_path):
    """An API key but no reachable server: W&B would try for ~90 s; lla logs offline at once and says how to sync."""
    env = wandb_env(tmp_path)
    env.pop("WANDB_MODE")
    env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{_free_port()}")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run.py", *TINY, "logger.offline=false", f"run_dir={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    (warning,) = [line for line in console.splitlines() if "W&B online unavailable" in line]
    assert "cannot reach http://127.0.0.1" in warning and f"wandb sync {out}/wandb/offline-run-*" in warning
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")  # history kept, offline
    assert {"val/acc", "train/loss/m0"} <= summarize(run_file)["history"]
    from datetime import datetime

    first = next(line for line in console.splitlines() if line.startswith("[20") and "[lla]" in line)
    start, end = (datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") for line in (first, warning))
    assert (end - start).total_seconds() < 15  # from the run's first line to the fallback: no 90 s wait

    env.pop("WANDB_API_KEY")
    env["NETRC"] = str(tmp_path / "no-netrc")
    (tmp_path / "no-netrc").write_text("")
    proc = subprocess.run([sys.executable, "run.py", *TINY, "logger.offline=false", f"run_dir={tmp_path / 'nologin'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "no W&B login" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert list((tmp_path / "nologin").glob("wandb/offline-run-*/run-*.wandb"))


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
