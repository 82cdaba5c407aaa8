"""Resume, crashes, preemption, non-finite losses (issue 8): lla.checkpointing + the run-folder logic of lla.validate.

In-process runs go through ``lla.cli.train`` (the same code as ``python run.py``); three subprocesses cover what only
a real process can show: kill -9 mid-epoch, SIGTERM, and a rerun of the same command that resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf, open_dict

from lla.checkpointing import (
    EXIT_PREEMPTED,
    NonFiniteLossError,
    Resume,
    RunLock,
    atomic_torch_save,
    epoch_seed,
    peek,
    resolve_resume,
)
from lla.cli import CONF_DIR, train
from lla.errors import ConfigError
from lla.methods.dgl import DGL
from lla.validate import run_dir, run_name

ROOT = Path(__file__).resolve().parent.parent
# 64 images of 16x16, batch 16: 4 steps per epoch on a 4-module MAN (EMA + learnable-bias copies) over DGL
TINY = ["dataset=synthetic", "backbone=resnet20", "method=man", "method.base=dgl", "k=4", "dataset.image_size=16",
        "dataset.num_samples=64", "dataset.num_val=32", "dataset.batch_size=16", "trainer.max_epochs=2",
        "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.benchmark=false",
        "checkpoint.every_n_steps=3", "nan_check_every=1", "optim.schedule=warmup_cosine", "optim.warmup_epochs=1",
        "measure.activation_batches=0", "dataset.augment=true"]


def compose_cfg(overrides, hydra_node=False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    if not hydra_node:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg, choices


def run(overrides, out_dir):
    cfg, choices = compose_cfg(overrides)
    return train(cfg, Path(out_dir), choices, list(overrides))


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- atomic writes
def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def dies_halfway(obj, f, *a, **k):  # a kill while writing: bytes on disk, then the process is gone
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}  # the old file, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left either


# ---------------------------------------------------------------------------------------------- resume decision
def test_resolve_resume(tmp_path):
    out = tmp_path / "run"
    assert resolve_resume(None, True, out) == Resume()  # nothing there yet: from scratch
    with pytest.raises(ConfigError, match="ckpt_path: no checkpoint to resume"):
        resolve_resume("last", True, out)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope.ckpt"), True, out)

    last = out / "checkpoints" / "last.ckpt"
    atomic_torch_save({"epoch": 1, "global_step": 7}, last)
    (last.parent / ".last.ckpt.999.tmp").write_bytes(b"junk of a killed save")
    r = resolve_resume(None, True, out)
    assert (r.path, r.epoch, r.global_step, r.finished) == (str(last), 1, 7, None)
    assert not (last.parent / ".last.ckpt.999.tmp").exists()
    assert resolve_resume("last", False, out).path == str(last)  # explicit wins over resume=false
    assert resolve_resume(None, False, out) == Resume()

    done = {"status": "completed", "config": {"trainer": {"max_epochs": 2, "max_steps": -1}}}
    (out / "results.json").write_text(json.dumps(done))
    assert resolve_resume(None, True, out, {"max_epochs": 2, "max_steps": -1}).finished == done
    assert resolve_resume(None, True, out, {"max_epochs": 3, "max_steps": -1}).finished is None  # train longer

    last.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        resolve_resume(None, True, out)


def test_run_folder_is_a_function_of_the_command():
    def folder(overrides):
        cfg, _ = compose_cfg(overrides, hydra_node=True)
        return cfg.hydra.run.dir

    a = folder(["method=dgl", "k=8"])
    assert a == folder(["k=8", "method=dgl"]) == "outputs/k-8_method-dgl"  # a rerun finds the same folder
    assert a == folder(["k=8", "method=dgl", "resume=false", "logger=none", "checkpoint.every_n_steps=5"])
    assert folder(["method=dgl", "k=4"]) != a
    assert folder([]) == "outputs/default"
    assert folder(["run_dir=/tmp/x"]) == "/tmp/x"
    assert "/" not in run_name("dataset.root=/data/x,k=2")
    long = run_name("x" * 400)
    assert len(long) <= 200 and long != run_name("x" * 399)
    assert run_dir(None, "") == "outputs/default"
    cfg, _ = compose_cfg(["method=dgl"], hydra_node=True)  # multirun jobs: numbered subfolders, µs-stamped sweeps
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert "${hydra.job.num}" in sweep["subdir"] and sweep["dir"].endswith("%S-%f}")


def test_two_runs_never_share_a_folder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=r"run_dir: .* is in use by another run \(pid \d+\)"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # free again once the first run is done
    assert not (tmp_path / ".lock").exists()  # and the lock file is gone with it
    (tmp_path / ".lock").write_text("12345")  # left by a killed run: the kernel dropped its lock
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    lock.release()


# ---------------------------------------------------------------------------------------------- exact resume
class BrokenLogger:
    """A logger whose start fails, like W&B without network: training must go on."""

    def __init__(self, **kwargs):
        raise RuntimeError("wandb.init timed out")


def test_two_epochs_equal_one_plus_resume_plus_one(tmp_path):
    straight = tmp_path / "straight"
    cfg, choices = compose_cfg(TINY)
    with open_dict(cfg):
        cfg.logger = {"_target_": f"{__name__}.BrokenLogger"}
    result = train(cfg, straight, choices, TINY)
    assert result["status"] == "completed" and result["global_step"] == 8  # the broken logger stopped nothing

    split = tmp_path / "split"
    first = run(TINY + ["trainer.max_steps=4"], split)  # stops after epoch 0 (a budget, not a new schedule)
    assert first["global_step"] == 4 and ckpt(split / "checkpoints/last.ckpt")["global_step"] == 4
    second = run(TINY, split)  # same folder, no ckpt_path: resumes from last.ckpt by itself
    assert second["resumed_from"] == str(split / "checkpoints/last.ckpt")
    assert second["global_step"] == 8 and second["epochs"] == 2

    a, b = ckpt(straight / "checkpoints/last.ckpt"), ckpt(split / "checkpoints/last.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(".ema." in k for k in a["state_dict"]) and any(".lb." in k for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key  # weights, EMA and LB copies, BN statistics
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    for sa, sb in zip(opt_a["optimizers"], opt_b["optimizers"]):  # every module's SGD momentum
        for ia, ib in zip(sa["state"].values(), sb["state"].values()):
            assert torch.equal(ia["momentum_buffer"], ib["momentum_buffer"])
    assert opt_a["schedulers"] == opt_b["schedulers"]  # every module's LR schedule, same position
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert result["val_acc_best"] == second["val_acc_best"]  # best-so-far survived the restart

    again = run(TINY, split)  # finished: not trained a third time
    assert again["global_step"] == 8 and again["train_time_s"] == second["train_time_s"]


def test_epoch_seed_depends_on_epoch_only():
    assert epoch_seed(0, 3) == epoch_seed(0, 3) != epoch_seed(0, 4) != epoch_seed(1, 3)


# ---------------------------------------------------------------------------------------------- NaN / inf
class NaNAtStep5(DGL):
    """Module 1's loss turns NaN in the batch that makes global step 5."""

    def local_loss(self, k, h, batch):
        loss = super().local_loss(k, h, batch)
        if k == 1 and self.global_step == 4:
            return loss * float("nan")
        return loss


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    overrides = TINY[:2] + ["method=dgl", *TINY[4:], "checkpoint.every_n_steps=2", "nan_check_every=3"]
    cfg, choices = compose_cfg(overrides)
    with open_dict(cfg):
        cfg.method._target_ = f"{__name__}.NaNAtStep5"
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, tmp_path, choices, overrides)
    # seen at step 6 (checks every 3 steps and before each save), reported at the step where it happened
    assert "non-finite loss (nan) in method dgl, module 1 of 4" in str(err.value)
    assert "epoch 1, step 5" in str(err.value)
    assert f"the last good checkpoint is {tmp_path / 'checkpoints/last.ckpt'}" in str(err.value)
    last = ckpt(tmp_path / "checkpoints/last.ckpt")
    assert last["global_step"] == 4  # step 6's save was refused: the diverged state never overwrote it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged" and "module 1" in results["error"]


def test_a_failed_run_writes_results_json_before_it_closes_wandb(tmp_path, monkeypatch):
    """W&B's finish (an upload that may take long) comes after results.json: under a multi-process launcher the
    other ranks' failure starts a grace period after which this process is killed, and the record must exist."""
    import lla.cli

    seen = []
    monkeypatch.setattr(lla.cli, "finish_wandb",
                        lambda logger, exit_code=0: seen.append((exit_code, (tmp_path / "results.json").exists())))
    overrides = TINY[:2] + ["method=dgl", *TINY[4:], "nan_check_every=3"]
    cfg, choices = compose_cfg(overrides)
    with open_dict(cfg):
        cfg.method._target_ = f"{__name__}.NaNAtStep5"
    with pytest.raises(NonFiniteLossError):
        train(cfg, tmp_path, choices, overrides)
    assert seen == [(1, True)]


# ---------------------------------------------------------------------------------------------- SLURM requeue
class SignalAt(L.Callback):
    def __init__(self, step, sig):
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def test_sigusr1_saves_then_requeues_the_slurm_job(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    import lla.checkpointing as ckpting

    original = ckpting.reliability_callbacks

    def with_signal(*args, **kwargs):
        callbacks, last, preemption = original(*args, **kwargs)
        return [SignalAt(3, signal.SIGUSR1), *callbacks], last, preemption

    monkeypatch.setattr(ckpting, "reliability_callbacks", with_signal)
    overrides = TINY[:2] + ["method=dgl", *TINY[4:], "checkpoint.every_n_steps=0"]
    with pytest.raises(SIGTERMException):
        run(overrides, tmp_path / "run")
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["status"] == "preempted" and results["global_step"] == 3
    assert ckpt(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 3  # saved at the batch boundary
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handlers given back


# ---------------------------------------------------------------------------------------------- real processes
def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, errs = proc.communicate()
            raise AssertionError(f"run ended early (rc {proc.returncode}):\n{out[-2000:]}\n{errs[-2000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def _saved_step(path):
    try:
        return peek(path)["global_step"] if path.is_file() else None
    except ConfigError:
        return None


@pytest.mark.slow
def test_kill9_then_sigterm_then_rerun_resumes_each_time(tmp_path):
    run_folder = tmp_path / "run"
    command = [sys.executable, str(ROOT / "run.py"), "dataset=synthetic", "backbone=resnet20", "method=dgl", "k=2",
               "dataset.image_size=16", "dataset.num_samples=128", "dataset.num_val=16", "dataset.batch_size=8",
               "trainer.max_epochs=2", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
               "checkpoint.every_n_steps=2", f"run_dir={run_folder}", "measure.activation_batches=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    last = run_folder / "checkpoints" / "last.ckpt"

    def start():
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    # 1. kill -9 once the first step checkpoint exists (16 steps per epoch: mid-epoch)
    p = start()
    _wait_for(lambda: _saved_step(last), p)
    p.kill()
    p.wait()
    s1 = _saved_step(last)  # readable: a kill during a save cannot leave a partial last.ckpt
    assert s1 is not None and s1 % 2 == 0 and 0 < s1 < 16

    # 2. the same command resumes at s1; SIGTERM after its next checkpoint saves at the batch boundary and exits
    p = start()
    s_mid = _wait_for(lambda: (s := _saved_step(last)) is not None and s > s1 and s, p)
    p.send_signal(signal.SIGTERM)
    out, errs = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, errs[-2000:]
    assert "Traceback" not in errs
    assert f"resuming from {last} (epoch 0, step {s1})" in out
    results = json.loads((run_folder / "results.json").read_text())
    s2 = _saved_step(last)
    assert results["status"] == "preempted" and results["global_step"] == s2 >= s_mid

    # 3. once more: it resumes at s2 and finishes
    p = start()
    out, errs = p.communicate(timeout=300)
    assert p.returncode == 0, errs[-3000:]
    assert f"resuming from {last} (epoch " in out and f", step {s2})" in out
    results = json.loads((run_folder / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 32 and results["epochs"] == 2


# ---------------------------------------------------------------------------------------------- host syncs
def test_progress_bar_reads_the_loss_every_progress_every_steps(tmp_path, monkeypatch):
    """Each progress-bar refresh turns train/loss into a float (a GPU->CPU sync on CUDA): count those reads."""
    from lla.callbacks import LossProgressBar

    reads = []
    real = LossProgressBar.get_metrics

    def counting(self, trainer, pl_module):
        reads.append(1)
        return real(self, trainer, pl_module)

    monkeypatch.setattr(LossProgressBar, "get_metrics", counting)
    quiet = [o for o in TINY if not o.startswith(("trainer.enable_progress_bar", "checkpoint.", "nan_check_every"))]
    counts = {}
    for every in (1, 100):
        reads.clear()
        run(quiet + [f"progress_every={every}", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=50",
                     "checkpoint.every_n_steps=0", "nan_check_every=0"], tmp_path / f"every{every}")
        counts[every] = len(reads)
    # 2 epochs x 4 steps: the bar always refreshes at an epoch's last step; steps 1-3 of each only when every=1
    assert counts[1] - counts[100] >= 6
