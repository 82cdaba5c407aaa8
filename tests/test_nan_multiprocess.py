"""A NaN loss in ONE process of a 2-process CPU (gloo) run, through ``run.py``: every process stops at the same
check (the ranks agree on it), the run ends with exit code 3 (no hang, no kill), rank 0 writes results.json with
status ``diverged`` and the error, and ``checkpoints/last.ckpt`` keeps the last good (finite) weights.

The NaN comes from a method subclass in a module the test writes and puts on every process's ``PYTHONPATH``
(Lightning's launcher re-runs the same command, so ``method._target_`` reaches every rank); it turns module
``LLA_TEST_NAN_MODULE``'s loss NaN from global step ``LLA_TEST_NAN_STEP`` on, on local rank ``LLA_TEST_NAN_RANK``
only (-1: on every rank that computes that module, which under ``trainer=pipeline`` is one stage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

INJECT = textwrap.dedent('''
    import os

    from lla.methods.dgl import DGL


    class NaNOnOneRank(DGL):
        def spoil(self, k, loss):
            rank = int(os.environ["LLA_TEST_NAN_RANK"])
            if rank in (-1, int(os.environ.get("LOCAL_RANK", "0"))) and k == int(os.environ["LLA_TEST_NAN_MODULE"]) \\
                    and self.global_step >= int(os.environ["LLA_TEST_NAN_STEP"]):
                return loss * float("nan")
            return loss

        def local_loss(self, k, h, batch):
            return self.spoil(k, super().local_loss(k, h, batch))

        def final_loss(self, h, batch):  # the last module's loss
            return self.spoil(self.num_modules - 1, super().final_loss(h, batch))
''')

COMMON = ["dataset=digits", "dataset.image_size=16", "backbone=resnet20", "method=dgl", "dataset.batch_size=16",
          "method._target_=nan_inject.NaNOnOneRank", "trainer.accelerator=cpu", "trainer.devices=2",
          "trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.limit_val_batches=2",
          "trainer.enable_progress_bar=false", "logger=none", "measure.timer_warmup=0",
          "checkpoint.every_n_steps=2", "nan_check_every=3"]


def run(tmp_path: Path, args: list[str], rank: int, module: int, step: int, timeout: int = 240):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "nan_inject.py").write_text(INJECT)
    env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "LLA_TEST_NAN_RANK": str(rank), "LLA_TEST_NAN_MODULE": str(module), "LLA_TEST_NAN_STEP": str(step)}
    for key in [k for k in env if k.startswith(("SLURM_", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LLA_LAUNCHER"))]:
        del env[key]
    out = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *COMMON, *args, f"run_dir={out}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc, out, time.monotonic() - start


def check(proc, out: Path, seconds: float, module_text: str) -> dict:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, f"exit code {proc.returncode}:\n{output[-4000:]}"
    assert seconds < 120, output[-3000:]  # nothing waited for a collective timeout or the launcher's grace
    result = json.loads((out / "results.json").read_text())
    assert result["status"] == "diverged", result["status"]
    assert "non-finite loss" in result["error"] and module_text in result["error"], result["error"]
    last = out / "checkpoints" / "last.ckpt"
    if last.is_file():  # the check before each write kept the diverged state out of it
        state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert result["last_checkpoint"] == str(last)
    assert "Traceback" not in output or "NonFiniteLossError" not in output.split("Traceback")[-1], output[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("module, saves, step", [(1, 2, 4), (0, 0, 6)], ids=["before_a_save", "periodic_look"])
def test_ddp_nan_on_rank_1_only(tmp_path, module, saves, step):
    """Rank 1's module goes NaN in the batch that makes step 4; rank 0's losses are finite then. Found by the check
    before step 4's save, or by the look every 3 steps at step 6 (by then the averaged NaN gradients have made rank
    0's loss NaN too, from step 5): every rank, rank 0's results.json included, names rank 1's module and step 4."""
    proc, out, seconds = run(tmp_path, ["trainer=ddp", "k=2", f"checkpoint.every_n_steps={saves}"],
                             rank=1, module=module, step=3)
    result = check(proc, out, seconds, f"on another process (rank 1) in method dgl, module {module} of 2 (0-based), "
                                       "epoch 0, step 4")
    assert result["global_step"] == step  # both ranks stopped at the same look
    if saves:
        assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2  # the good one


@pytest.mark.slow
@pytest.mark.parametrize("module, text", [(2, "module 2 of 4"), (0, "module 0 of 4")], ids=["last_stage", "stage_0"])
def test_pipeline_nan_on_one_stage_only(tmp_path, module, text):
    """trainer=pipeline, stages [0] and [1, 2, 3]: one stage's module goes NaN; the record says diverged."""
    proc, out, seconds = run(tmp_path, ["trainer=pipeline", "k=4", "trainer.stage_boundaries=[0,1]"],
                             rank=-1, module=module, step=3)
    # rank 0 (stage 0) names the module, whichever stage computed it
    where = "" if module == 0 else " on another process (rank 1)"
    check(proc, out, seconds, f"non-finite loss (nan){where} in method dgl, {text} (0-based), epoch 0, step 4")
