"""`dataset=cifar10 dataset.root=<generated dir> trainer.fast_dev_run=true` trains end to end through run.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.datagen import write_cifar10

ROOT = Path(__file__).resolve().parent.parent


def test_cifar10_from_generated_files_trains_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_cifar10(data, n_train=64, n_test=32)
    out = tmp_path / "run"
    cmd = [sys.executable, "run.py", "method=dgl", "backbone=resnet20", "k=4", "dataset=cifar10",
           f"dataset.root={data}", "dataset.num_workers=0", "dataset.batch_size=16", "trainer.fast_dev_run=true",
           "logger=none", "trainer.enable_progress_bar=false", f"run_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "cifar10" and result["modules"] == 4
    assert result["global_step"] == 1 and result["val_acc"] is not None
