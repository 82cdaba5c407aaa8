"""``python run.py trainer=pipeline ...`` end to end (docs/pipeline.md): a 2-stage run trains, validates, writes
results.json (with its stage boundaries) and checkpoints; stopped after epoch 1 (a ``max_steps`` budget) and resumed
with the same command, it ends with the same weights as an uninterrupted single-process run of 2 epochs (the pipeline
and its resume are exact, and its checkpoint is an ordinary one); a bad setting is one ``error:`` line with exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["dataset=digits", "backbone=resnet20", "method=dgl", "k=4", "dataset.batch_size=32",
          "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
          "logger=csv", "measure.timer_warmup=0"]
PIPE = ["trainer=pipeline", "trainer.devices=2", "trainer.accelerator=cpu"]


def run(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # same kernels in 1 and 2 processes
    for key in [k for k in env if k.startswith(("SLURM_", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LLA_LAUNCHER"))]:
        del env[key]
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_pipeline_run_trains_validates_checkpoints_and_resumes_exactly(tmp_path):
    pipe, single = tmp_path / "pipe", tmp_path / "single"
    two = [*COMMON, "trainer.max_epochs=2"]  # the LR schedule covers 2 epochs in every leg
    # max_steps is a budget, not a new schedule: the first leg stops after epoch 0 (4 batches) of the same run
    first = run([*PIPE, *two, "trainer.max_steps=4", "trainer.stage_boundaries=[0,1]", f"run_dir={pipe}"])
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((pipe / "results.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == 4 and result["val_acc"] is not None
    assert result["pipeline"]["stage_boundaries"] == [0, 1] and result["pipeline"]["stages"] == 2
    assert result["pipeline"]["stage_modules"] == [[0], [1, 2, 3]]
    assert all(0.0 <= b <= 1.0 for b in result["pipeline"]["stage_busy_fraction"])
    assert (pipe / "checkpoints" / "best.ckpt").is_file()
    assert "val/acc" in (next(pipe.glob("csv/**/metrics.csv"))).read_text()  # rank 0 logged validation
    # the same command without the budget resumes from last.ckpt (every stage takes its part) ...
    second = run([*PIPE, *two, "trainer.stage_boundaries=[0,1]", f"run_dir={pipe}"])
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((pipe / "results.json").read_text())
    assert resumed["resumed_from"] and resumed["global_step"] == 8
    # ... and ends where one process ends after 2 uninterrupted epochs (the pipeline is exact, resume too)
    ref = run(["trainer=cpu", *two, f"run_dir={single}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert not json.loads((single / "results.json").read_text())["resumed_from"]
    got, want = weights(pipe), weights(single)
    assert got.keys() == want.keys()
    for key in want:  # float32, one thread in every process: the same kernels, so the same bits
        assert torch.equal(got[key], want[key]), f"{key} differs by {(got[key] - want[key]).abs().max():.2e}"
    pipe_ckpt = torch.load(pipe / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert len(pipe_ckpt["optimizer_states"][0]["optimizers"]) == 4  # every module's optimizer in one file


@pytest.mark.parametrize("args, key", [  # the other refusals: tests/test_pipeline.py, without a process each
    (["method=mlaan", "k=4"], "method"),  # refused in fit, before any stage process starts
    (["trainer.replicas=2"], "trainer.replicas"),  # refused when the trainer is built
])
def test_what_cannot_be_pipelined_is_one_line_and_exit_2(tmp_path, args, key):
    proc = run([*PIPE, *COMMON, *args, f"run_dir={tmp_path / 'r'}"], timeout=200)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {key}:") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
