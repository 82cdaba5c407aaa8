"""Under ``trainer=ddp`` only global rank 0 writes the run folder's files, atomically, and per-rank figures are
gathered (issue 14, defect 3): a real 2-process gloo run through ``run.py``.

A ``sitecustomize`` module (loaded by every rank's interpreter at start-up) logs every write of results.json /
config.yaml with the writing rank, and gives each rank a known step time (rank 0: 0.25 s, rank 1: 0.75 s), so the test
can tell the slowest rank's figure from last-writer-wins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = textwrap.dedent('''
    import os
    import pathlib

    LOG = os.environ["LLA_TEST_WRITE_LOG"]
    NAMES = ("results.json", "config.yaml")


    def rank():
        return int(os.environ.get("LOCAL_RANK", "0"))


    def note(path):
        if pathlib.Path(str(path)).name in NAMES:
            with open(LOG, "a") as f:
                f.write(f"{rank()} {pathlib.Path(str(path)).name}\\n")


    _replace, _write_text = os.replace, pathlib.Path.write_text


    def replace(src, dst, *args, **kwargs):
        note(dst)
        return _replace(src, dst, *args, **kwargs)


    def write_text(self, *args, **kwargs):
        note(self)
        return _write_text(self, *args, **kwargs)


    os.replace, pathlib.Path.write_text = replace, write_text

    import lla.callbacks  # noqa: E402

    lla.callbacks.StepTimer.step_time_s = property(lambda self: 0.25 + 0.5 * rank() if self.times else None)
''')


@pytest.mark.slow
def test_only_rank_0_writes_run_files_and_step_time_is_the_slowest_ranks(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log, out = tmp_path / "writes.log", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "LLA_TEST_WRITE_LOG": str(log),
           "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith(("SLURM_", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"))]:
        del env[key]
    cmd = [sys.executable, str(ROOT / "run.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "dataset=synthetic", "dataset.image_size=16", "dataset.num_samples=64", "dataset.num_val=32",
           "dataset.batch_size=8", "backbone=resnet20", "method=dgl", "k=2", "trainer.max_epochs=1",
           "trainer.enable_progress_bar=false", "logger=none", "measure.timer_warmup=0", f"run_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    writes = sorted(log.read_text().split("\n")[:-1])
    assert writes == ["0 config.yaml", "0 results.json"], writes  # one writer each: rank 0
    result = json.loads((out / "results.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == 4  # 64 samples / (2 ranks x 8) per epoch
    assert result["per_rank"]["step_time_s"] == [0.25, 0.75]
    assert result["step_time_s"] == 0.75  # the slowest rank's, whichever rank finished last
    peaks = result["per_rank"]["peak_activation_mb"]
    assert len(peaks) == 2 and all(p > 0 for p in peaks) and result["peak_activation_mb"] == max(peaks)
    assert result["images_per_s"] == pytest.approx(sum(result["per_rank"]["images_per_s"]))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
