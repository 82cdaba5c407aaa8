"""Stopping a run with a signal, as a cluster or a user does, in real processes (``python run.py``).

A signal (SIGTERM, SLURM's SIGUSR1/2, Ctrl-C's SIGINT) on any process of a run stops every process after the same
batch: ``checkpoints/last.ckpt`` is written once, results.json says ``preempted`` (``interrupted`` for Ctrl-C), the
run folder's lock is gone, no process of the run is left, and the same command resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lla.checkpointing import EXIT_INTERRUPTED, EXIT_PREEMPTED, RunLock, peek
from lla.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
STOP_LINE = "rerun the same command to resume"
# per process: 16 images of 32x32 per step; 2 processes x 60 steps = 1920 images in one epoch
STEPS = 60
COMMON = ["dataset=synthetic", "backbone=resnet20", "method=dgl", "k=2", "dataset.image_size=32", "dataset.num_val=16",
          "dataset.batch_size=16", "trainer.max_epochs=1", "logger=none", "trainer.accelerator=cpu",
          "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2", "measure.activation_batches=0"]


def _saved_step(path: Path) -> int | None:
    try:
        return peek(path)["global_step"] if path.is_file() else None
    except ConfigError:
        return None


def _children(pid: int) -> list[int]:
    out = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in f.read_text().split()]
        except OSError:
            pass
    return out


def _session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the run was started in its own session): ranks, loader workers, ..."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ..., session id
            found.append(int(stat.parent.name))
    return found


class Run:
    """``python run.py <overrides>`` in its own session, output to files (no pipe can fill up and block it)."""

    def __init__(self, tmp_path: Path, overrides: list[str], name: str):
        self.folder = tmp_path / "run"
        self.last = self.folder / "checkpoints" / "last.ckpt"
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        for key in [k for k in env if k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))]:
            del env[key]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *overrides,
                                          f"run_dir={self.folder}"], cwd=tmp_path, env=env, stdout=out, stderr=err,
                                         start_new_session=True)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, predicate, timeout: float = 240.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended early (rc {self.proc.returncode}):\n{self.output()[-3000:]}")
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"timed out:\n{self.output()[-3000:]}")

    def saved_after(self, step: int) -> int | None:
        """The step of last.ckpt once it is past ``step`` (a step checkpoint: training is under way)."""
        saved = _saved_step(self.last)
        return saved if saved is not None and saved > step else None

    def rank1(self) -> int | None:
        kids = [c for c in _children(self.proc.pid) if "run.py" in Path(f"/proc/{c}/cmdline").read_text()]
        return kids[0] if kids else None

    def finish(self, timeout: float) -> float:
        """Wait for the launcher to exit (at most ``timeout`` s; then kill everything and fail); seconds taken."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout:.0f} s after the signal:\n{self.output()[-3000:]}") from None
        return time.monotonic() - start

    def kill(self) -> None:
        for pid in _session_processes(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def assert_nothing_left(self, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while (left := _session_processes(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            self.kill()
        assert not left, f"processes of the run still alive after it ended: {left}"


def assert_stopped_cleanly(run: Run, rc: int, status: str, after_step: int) -> int:
    """The checks every signal case shares; returns the step the run stopped at."""
    out = run.output()
    assert run.proc.returncode == rc, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count(STOP_LINE) == 1, out[-3000:]  # one line, from rank 0 only
    results = json.loads((run.folder / "results.json").read_text())
    step = _saved_step(run.last)
    assert results["status"] == status
    assert results["global_step"] == step > after_step  # saved at the stop, after the previous stop
    assert f"saved {run.last} at epoch 0, step {step}" in out
    assert not (run.folder / ".lock").exists()  # released, and the file is gone
    RunLock(run.folder).acquire().release()
    run.assert_nothing_left()
    return step


@pytest.mark.slow
def test_a_signal_on_any_rank_stops_every_rank_saves_once_and_the_rerun_resumes(tmp_path):
    """trainer=ddp on 2 CPU processes: SIGTERM to rank 0, then (rerun) SIGTERM to rank 1, then (rerun) Ctrl-C to the
    whole process group as a terminal sends it, then (rerun) to the end. Each stop ends within 60 s."""
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.strategy.timeout=120", *COMMON,
           f"dataset.num_samples={2 * 16 * STEPS}"]
    stopped = 0
    for n, (target, sig, rc, status) in enumerate([
            ("rank0", signal.SIGTERM, EXIT_PREEMPTED, "preempted"),
            ("rank1", signal.SIGTERM, EXIT_PREEMPTED, "preempted"),
            ("group", signal.SIGINT, EXIT_INTERRUPTED, "interrupted")]):
        run = Run(tmp_path, ddp, f"stop{n}")
        rank1 = run.wait_for(run.rank1)
        run.wait_for(lambda: run.saved_after(stopped + 1))  # training, mid-epoch  # noqa: B023
        if target == "rank0":
            os.kill(run.proc.pid, sig)
        elif target == "rank1":
            os.kill(rank1, sig)
        else:
            os.killpg(run.proc.pid, sig)
        seconds = run.finish(timeout=60)
        before = stopped
        stopped = assert_stopped_cleanly(run, rc, status, stopped)
        assert not Path(f"/proc/{rank1}").exists() or "Z" in Path(f"/proc/{rank1}/stat").read_text().split()[2]
        if n:
            assert f"resuming from {run.last} (epoch 0, step {before})" in run.output()
        print(f"{sig.name} to {target}: stopped at step {stopped}, launcher exited {seconds:.1f} s after the signal")
    # kill -9 of rank 0 (the launcher): the kernel ends rank 1 with it; the .lock file stays, but unlocked
    run = Run(tmp_path, ddp, "kill9")
    run.wait_for(run.rank1)
    run.wait_for(lambda: run.saved_after(stopped + 1))
    os.kill(run.proc.pid, signal.SIGKILL)
    run.finish(timeout=10)
    run.assert_nothing_left(within=1.5)  # at once (gloo alone notices the closed socket after ~3 s; NCCL never)
    assert (run.folder / ".lock").exists()
    stopped = _saved_step(run.last)

    run = Run(tmp_path, ddp, "end")
    run.finish(timeout=300)
    assert run.proc.returncode == 0, run.output()[-3000:]
    assert f"resuming from {run.last} (epoch 0, step {stopped})" in run.output()
    results = json.loads((run.folder / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == STEPS  # no batch trained twice or lost
    assert not (run.folder / ".lock").exists()  # a clean finish releases the lock too
    run.assert_nothing_left()


@pytest.mark.slow
def test_ctrl_c_saves_says_so_and_a_second_ctrl_c_quits_at_once(tmp_path):
    single = [*COMMON, f"dataset.num_samples={16 * STEPS}"]
    # Ctrl-C once: stop after the batch, save, one line, status interrupted, rc 130
    run = Run(tmp_path, single, "once")
    run.wait_for(lambda: (s := _saved_step(run.last)) is not None and s >= 2)
    run.proc.send_signal(signal.SIGINT)
    run.finish(timeout=60)
    stopped = assert_stopped_cleanly(run, EXIT_INTERRUPTED, "interrupted", 0)

    # Ctrl-C twice: the second one ends the process at once (default SIGINT action), nothing more is saved
    run = Run(tmp_path, single, "twice")
    run.wait_for(lambda: (s := _saved_step(run.last)) is not None and s > stopped + 1)
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two separate key presses (signals sent together would be delivered as one)
    assert run.proc.poll() is None  # still finishing its batch / saving
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=5) < 2
    assert run.proc.returncode == -signal.SIGINT, run.output()[-3000:]
    run.assert_nothing_left()
    step = _saved_step(run.last)  # the last periodic (or stop) checkpoint is intact

    # the rerun resumes from it, even though the killed run could not remove its lock file
    run = Run(tmp_path, single, "rerun")
    run.finish(timeout=300)
    assert run.proc.returncode == 0, run.output()[-3000:]
    assert f"resuming from {run.last} (epoch 0, step {step})" in run.output()
    assert json.loads((run.folder / "results.json").read_text())["global_step"] == STEPS
    assert not (run.folder / ".lock").exists()


# ---------------------------------------------------------------------------------------------- the agreement
def _signal_worker(rank: int, world: int, out: str, signal_rank: int, at_step: int) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torch.utils.data import DataLoader, TensorDataset

    from lla.backbones import build_backbone
    from lla.checkpointing import Preemption
    from lla.distributed import LocalDDPStrategy
    from lla.methods.dgl import DGL

    class SignalAt(L.Callback):  # a signal arriving while batch `at_step` trains, on one rank only
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == signal_rank and trainer.global_step == at_step:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.set_num_threads(1)
    model = DGL(build_backbone("resnet20", 10), k=2, num_classes=10, image_size=8,
                optim={"lr": 0.02, "schedule": "constant", "warmup_epochs": 0})
    data = TensorDataset(torch.randn(40 * 4 * world, 3, 8, 8), torch.randint(0, 10, (40 * 4 * world,)))
    preemption = Preemption()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=LocalDDPStrategy() if world > 1 else "auto",
                        max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[SignalAt(), preemption])
    try:
        trainer.fit(model, DataLoader(data, batch_size=4))
        stopped = None
    except SIGTERMException:
        stopped = preemption.stopped_by
    Path(out, f"rank{rank}.json").write_text(json.dumps({"step": trainer.global_step, "stopped": stopped}))


@pytest.mark.parametrize("world,signal_rank", [(1, 0), (2, 0), (2, 1)])
def test_every_rank_stops_after_the_same_batch(tmp_path, world, signal_rank):
    """The signal arrives during batch 5 (global_step 5 -> 6) on one rank. One process stops after that batch; two
    processes agree on it at the next batch end and both stop after batch 6, whichever rank got it."""
    from lla.bench.ddp import spawn

    spawn(_signal_worker, world, (str(tmp_path), signal_rank, 5), timeout_s=120, threads=1)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    expected = 6 if world == 1 else 7
    assert results == [{"step": expected, "stopped": "preempted"}] * world
