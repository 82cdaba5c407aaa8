"""Sweeps and long runs (issue 15): run-folder names that Hydra reads back unquoted and that show the swept values, a
multirun that records a diverged job and goes on, one-line errors for unwritable output folders, a ``--help`` with
examples, ``mode=eval`` on a folder lla created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from lla.naming import MAX_NAME, NON_EXPERIMENT_KEYS, is_non_experiment, legacy_run_name, run_name
from lla.report import ignored_key
from lla.validate import CONF_DIR, check_command, run_dir

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dataset=synthetic", "dataset.image_size=16", "dataset.num_samples=32", "dataset.num_val=16",
        "backbone=resnet20", "method=dgl", "k=2", "trainer=cpu", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "logger=none", "measure.timer_warmup=0"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


def folder_of(overrides: list[str]) -> str:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        return str(cfg.hydra.run.dir)
    finally:
        GlobalHydra.instance().clear()


def parsed_value(text: str) -> str:
    (override,) = OverridesParser.create().parse_overrides([text])
    return override.value()


# ---------------------------------------------------------------------------------------------- names
COMMANDS = [["method=dgl", "k=16"], ["method=man", "method.base=infopro", "method.ema_momentum=0.995", "k=8"],
            ["method=dgl", "optim.lr=1e-3", "trainer.precision=bf16-mixed", "dataset=cifar10"],
            ["method=mlaan", "+recipe=mlaan", "label='MLAAN (dgl)'", "seed=2"], []]


@pytest.mark.parametrize("overrides", COMMANDS, ids=[" ".join(c) or "none" for c in COMMANDS])
def test_folder_names_pass_back_to_hydra_unquoted(overrides):
    folder = folder_of(overrides)
    assert "=" not in folder and "," not in folder
    for text in (f"run_dir={folder}", f"ckpt_path={folder}/checkpoints/best.ckpt", f"run_dir=multirun/x/3_{folder[8:]}"):
        assert parsed_value(text) == text.split("=", 1)[1]  # the value Hydra reads is the folder itself
        check_command([text])
    assert folder_of(list(reversed(overrides))) == folder  # a rerun in any order finds the same folder


def test_names_show_keys_and_values():
    assert folder_of(["method=dgl", "k=16"]) == "outputs/k-16_method-dgl"
    assert folder_of([]) == "outputs/default"
    assert folder_of(["run_dir=/tmp/x", "k=2"]) == "/tmp/x"
    assert run_name(["method=man", "method.ema_momentum=0.99"]) == "method-man_method.ema_momentum-0.99"
    assert "/" not in run_name(["+recipe=a/b", "k=2"])


def test_settings_that_do_not_change_the_experiment_stay_out_of_names():
    base = folder_of(["method=dgl", "k=8"])
    assert base == folder_of(["method=dgl", "k=8", "logger.offline=false", "logger.project=mine", "resume=false",
                              "checkpoint.every_n_steps=5", "dataset.num_workers=0", "progress_every=3",
                              "trainer.enable_progress_bar=false", "optim.fused=false"])
    assert base == folder_of(["method=dgl", "k=8", "logger=csv"])
    assert base != folder_of(["method=dgl", "k=8", "trainer.max_epochs=3"])


def test_one_list_of_non_experiment_keys_for_folders_and_report():
    assert "exclude_keys" not in (CONF_DIR / "config.yaml").read_text()  # no second list in the YAML
    for pattern in NON_EXPERIMENT_KEYS:
        key = pattern.replace("*", "x")
        assert is_non_experiment(key) and ignored_key(key), key  # lla-report ignores what folder names leave out
    assert ignored_key("seed") and not is_non_experiment("seed")  # seeds: separate folders, averaged in a report
    for key in ("method.ema_momentum", "trainer.max_epochs", "k", "optim.lr", "dataset.image_size"):
        assert not ignored_key(key) and not is_non_experiment(key)


def test_sweep_folder_names_keep_every_swept_value():
    """Before: names cut at 120 characters plus a hash, so five EMA momenta differed only by the hash."""
    constant = ["method=man", "method.base=dgl", "dataset=digits", "backbone=resnet32", "k=16", "sweep=ema_momentum",
                "trainer.max_epochs=2", "dataset.batch_size=64", "optim.lr=0.05", "trainer.max_steps=3", "seed=0"]
    names = [run_name([*constant, f"method.ema_momentum={m}"]) for m in (0.9, 0.99, 0.995, 0.998, 0.999)]
    assert len(set(names)) == 5
    for m, name in zip((0.9, 0.99, 0.995, 0.998, 0.999), names):
        assert f"method.ema_momentum-{m}_" in name and "trainer.max_epochs-2" in name
    huge = run_name([f"method.option_{i}=value_{i}" for i in range(40)])  # too long even for a file system
    assert len(huge.encode()) <= MAX_NAME


def test_a_rerun_of_an_old_command_finds_its_old_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = ["method=dgl", "k=8", "logger=none"]
    assert legacy_run_name(command) == "k=8,method=dgl"
    assert run_dir(None, command) == "outputs/k-8_method-dgl"
    (tmp_path / "outputs" / "k=8,method=dgl").mkdir(parents=True)  # made before the new naming
    assert run_dir(None, command) == "outputs/k=8,method=dgl"
    (tmp_path / "outputs" / "k-8_method-dgl").mkdir()
    assert run_dir(None, command) == "outputs/k-8_method-dgl"


def test_the_parse_error_says_how_to_quote():
    from lla.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        check_command(["run_dir=outputs/k=8,method=dgl"])
    assert """'run_dir="outputs/k=8,method=dgl"'""" in str(err.value)
    assert parsed_value('run_dir="outputs/k=8,method=dgl"') == "outputs/k=8,method=dgl"  # the hint works


# ---------------------------------------------------------------------------------------------- processes
def test_eval_and_extend_on_a_folder_lla_created_unquoted(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY], cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = (p.relative_to(tmp_path) for p in (tmp_path / "outputs").iterdir())
    ev = subprocess.run([sys.executable, str(ROOT / "run.py"), "mode=eval", f"ckpt_path={folder}/checkpoints/best.ckpt",
                         "logger=none"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    trained = json.loads((tmp_path / folder / "results.json").read_text())
    evaluated = json.loads((tmp_path / folder / "eval_best.json").read_text())
    assert evaluated["val_acc"] == pytest.approx(trained["val_acc_best"])
    more = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY[:-3], f"run_dir={folder}",
                           "trainer.max_epochs=2"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    extended = json.loads((tmp_path / folder / "results.json").read_text())
    assert extended["epochs"] == 2 and extended["resumed_from"].endswith("last.ckpt")


def test_a_diverged_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    """Job 0 diverges (lr 1e30); job 1 still runs; the multirun ends with exit 3 and one line per job."""
    sweep = tmp_path / "sweep"
    tiny = [o.replace("num_samples=32", "num_samples=64") for o in TINY]  # 2 steps: the second sees NaN weights
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *tiny, "nan_check_every=1", "optim.lr=1e30,0.05",
                           f"hydra.sweep.dir={sweep}", "-m"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1"]
    first, second = (json.loads((j / "results.json").read_text()) for j in jobs)
    assert first["status"] == "diverged" and "non-finite loss" in first["error"]
    assert second["status"] == "completed" and second["val_acc_best"] is not None
    assert "optim.lr-1e+30" in jobs[0].name and "optim.lr-0.05" in jobs[1].name
    summary = [line for line in proc.stdout.splitlines() if line.startswith("lla:")]
    assert summary[0] == "lla: multirun: 2 jobs: 1 diverged, 1 completed"
    assert summary[1].startswith("lla:   job 0 diverged: non-finite loss") and str(jobs[0]) in summary[1]
    assert summary[2].startswith("lla:   job 1 completed: dgl on synthetic: best val/acc") and str(jobs[1]) in summary[2]


def test_a_job_with_bad_input_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, "k=99,2", "trainer.max_steps=1",
                           f"hydra.sweep.dir={sweep}", "-m"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: job 0 failed: k: resnet20 has 10 layers, so K=99 is impossible" in proc.stderr
    assert "Traceback" not in proc.stderr
    statuses = [json.loads((j / "results.json").read_text())["status"]
                for j in sorted(p for p in sweep.iterdir() if p.is_dir())]
    assert statuses == ["failed", "completed"]


def test_unwritable_output_folder_is_one_error_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    commands = {
        "run_dir": [f"run_dir={blocker}/run"],
        "run_dir ": ["run_dir=/proc/lla-cannot-write-here"],
        "hydra.sweep.dir": [f"hydra.sweep.dir={blocker}/sweep", "seed=0,1", "-m"],
    }
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "run.py"), *TINY, *args], cwd=tmp_path, env=env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err[-3000:])
        assert len(lines) == 1 and lines[0].startswith(f"error: {name.strip()}: cannot write "), (name, err)
        assert "allowed: a writable folder" in lines[0] and "Traceback" not in err + out


def test_help_gives_examples_instead_of_hydras_banner():
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "Hydra" not in proc.stdout.splitlines()[0] and "Powered by Hydra" not in proc.stdout
    assert "Examples:" in proc.stdout and "sweep=ema_momentum -m" in proc.stdout and "method: auglocal" in proc.stdout
