"""Bad input (issue 8, point 1): one line ``error: <key>: <problem>; allowed: <...>``, exit code 2, no traceback.

The table runs in-process through :func:`lla.build.check_run`, the same checks ``python run.py`` makes before it
trains; four real commands (run side by side) pin down the exit code and the exact shape of stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lla.build import check_run
from lla.errors import ConfigError
from lla.validate import check_command, closest, explain_hydra_error

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dataset=synthetic", "backbone=resnet20", "dataset.image_size=16", "dataset.num_samples=32",
        "dataset.num_val=16", "logger=none"]

# (overrides, the key the error must name, words the line must hold)
BAD_INPUTS = [
    (["method=nope"], "method", "unknown method 'nope'; allowed: auglocal, dgl, e2e, hpff, infopro, man, mlaan"),
    (["method=dgl,mann", "-m"], "method", "did you mean man?"),  # every value of a sweep is checked
    (["backbone=resnt20"], "backbone", "did you mean resnet20?"),
    (["dataset=cifar100"], "dataset", "did you mean cifar10?"),
    (["method=man", "method.base=nope"], "method.base", "unknown base rule 'nope'; allowed: dgl, infopro"),
    (["method=dgl", "k=999", *TINY], "k", "resnet20 has 10 layers, so K=999 is impossible; allowed: 1..10"),
    (["method=dgl", "k=0"], "k", "must be >= 1, got 0"),
    (["method=man", "method.ema_momentum=1.5"], "method.ema_momentum", "must be in [0, 1], got 1.5"),
    (["method=mlaan", "method.ema_momentum=-0.1"], "method.ema_momentum", "must be in [0, 1], got -0.1"),
    (["method=dgl", "method.ema_momentum=0.9"], "method.ema_momentum",
     "not an option of method dgl (only of man, mlaan); allowed: aux_checkpoint, feature_dim, head"),
    (["method=dgl", "+method.ema_momentum=0.9"], "method.ema_momentum", "unknown key for lla.methods.dgl.DGL"),
    (["method=dgl", "method.hed=man"], "method.hed", "allowed: did you mean method.head?"),
    (["trainer.max_epoch=3"], "trainer.max_epoch", "allowed: did you mean trainer.max_epochs?"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch", "did you mean trainer.max_epochs?"),
    (["optim.lrr=0.1"], "optim.lrr", "did you mean optim.lr?"),
    (["+seeed=1"], "seeed", "unknown top-level key 'seeed'; allowed: did you mean seed?"),
    (["dataset.batch_size=0"], "dataset.batch_size", "must be a positive integer, got 0"),
    (["dataset=synthetic", "dataset.batch_size=-4"], "dataset.batch_size", "must be a positive integer, got -4"),
    (["optim.lr=-1"], "optim.lr", "must be > 0, got -1"),
    (["optim.lr=0"], "optim.lr", "must be > 0, got 0"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", "must be >= 1, got 0"),
    (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps", "must be >= 0"),
    (["nan_check_every=often"], "nan_check_every", "must be an integer, got 'often'"),
    (["progress_every=0"], "progress_every", "must be >= 1, got 0"),
    (["channels_last=yes"], "channels_last", "must be true or false, got 'yes'"),
    (["optim.fused=maybe"], "optim.fused", "must be true, false or null"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path", "/nonexistent/last.ckpt does not exist"),
    (["method=infopro", "dataset=cifar10", "dataset.image_size=24"], "dataset.image_size",
     "not an option of dataset cifar10 (only of digits, synthetic)"),
    (["dataset.image_size=4"], "dataset.image_size", "got 4; allowed: an integer >= 8 (the digits are 8x8)"),
    (["method=dgl", "k=4", "backbone=vgg13", *TINY[0:1], *TINY[2:]], "dataset.image_size",
     "vgg13 cannot take 16x16 images"),
    (["dataset=cifar10", "dataset.root=/nonexistent"], "dataset.root", "CIFAR-10 not found"),
    (["k=[8"], "k", "cannot parse 'k=[8'"),
]


@pytest.mark.parametrize("overrides,key,words", BAD_INPUTS, ids=[" ".join(c[0])[:60] for c in BAD_INPUTS])
def test_bad_input_names_key_problem_and_allowed(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        if "-m" in overrides:
            check_command(overrides)
        else:
            check_run(overrides)
    assert err.value.key == key
    assert words in str(err.value)
    assert "\n" not in str(err.value)  # one line


def test_corrupt_dataset_file_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"\x80\x04 cut short")
    with pytest.raises(ConfigError, match=r"dataset.root: .*data_batch_1 is truncated or corrupt"):
        check_run(["dataset=cifar10", f"dataset.root={tmp_path}"])


def test_good_input_passes_every_check():
    check_run(["method=man", "method.base=dgl", "k=4", *TINY])


def test_closest_suggests_only_near_names():
    assert closest("max_epoch", ["max_epochs", "max_steps"], "trainer.").startswith("did you mean trainer.max_epochs?")
    assert closest("zzz", ["lr", "momentum"]) == "lr, momentum"


def test_other_errors_are_not_disguised_as_config_errors():
    assert explain_hydra_error(RuntimeError("CUDA out of memory"), []) is None


def test_commands_print_one_error_line_and_exit_2(tmp_path):
    """Real processes, started together: Hydra's errors (1, 2) and the task's (3) look the same."""
    commands = {
        "method": ["method=nope"],  # rejected before Hydra composes
        "trainer.max_epoch": ["trainer.max_epoch=3"],  # rejected by Hydra while composing
        "method.ema_momentum": ["method=man", "method.ema_momentum=1.5"],  # rejected by the method, in the task
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {key: subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, "logger=none"], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, args in commands.items()}
    for key, proc in procs.items():
        out, errs = proc.communicate(timeout=300)
        lines = [line for line in errs.splitlines() if line.strip()]
        assert proc.returncode == 2, (key, errs)
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), (key, errs)
        assert "allowed: " in lines[0] and "Traceback" not in errs + out
    assert not (tmp_path / "outputs" / "method=nope").exists()  # nothing was created for a command Hydra never ran


def _compose_error(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as err:
        return err
    finally:
        GlobalHydra.instance().clear()
    raise AssertionError(f"{overrides} composed without an error")


def _same_structure_other_text(err):
    """An exception of the same type, cause type, keys and options as ``err``, with none of its words."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException):
        return MissingConfigException("reworded", missing_cfg_file=err.missing_cfg_file, options=err.options)
    fake = type(err)("reworded")
    cause = err.__cause__
    if cause is not None:
        fake.__cause__ = type(cause)("reworded too")
        fake.__cause__.full_key = cause.full_key
    return fake


@pytest.mark.parametrize("overrides,key", [
    (["trainer.max_epoch=3"], "trainer.max_epoch"),  # Could not override (cause: ConfigAttributeError)
    (["method=dgl", "method.ema_momentum=0.9"], "method.ema_momentum"),
    (["~trainer.max_epoch"], "trainer.max_epoch"),  # Could not delete: does not exist (no cause)
    (["+seed=1"], "seed"),  # Could not append: already there (no cause)
    (["method=nope"], "method"),  # MissingConfigException
])
def test_hydra_errors_are_recognised_by_type_and_structure_not_message_text(overrides, key):
    """A Hydra upgrade that rewords its messages changes nothing: the same exception type and structure with other
    words maps to the same one-line error."""
    real = _compose_error(overrides)
    expected = explain_hydra_error(real, overrides)
    assert expected is not None and expected.key == key
    reworded = explain_hydra_error(_same_structure_other_text(real), overrides)
    assert reworded is not None and str(reworded) == str(expected)
