"""Paper experiments (experiments/*.yaml), the bare-multirun rule, sweeps, and mode=eval.

Multiruns are expanded the way Hydra's BasicSweeper does it (``hydra.sweeper.params`` first, command-line
overrides after, the later one winning per key), so no process is started. Models are built on the meta device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lla.cli import CONF_DIR, build, train
from lla.errors import ConfigError
from lla.evaluate import apply_overrides, evaluate, find_run_dir, load_run_config

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
CONF = Path(CONF_DIR)
_PARSER = OverridesParser.create()

# K labels whose module count differs from K (docs/splits.md#tables, docs/splits.md#k-labels): (overrides) -> modules
MODULE_COUNTS = [
    (["experiment=man_cifar", "net=resnet32_k16", "row=man_infopro"], 15),
    (["experiment=man_cifar", "net=resnet32_k16", "row=dgl_head_man"], 16),
    (["experiment=mlaan_cifar", "net=resnet110_k55", "row=mlaan_dgl"], 54),
    (["experiment=man_cifar", "net=resnet110_k55", "row=infopro_ce"], 55),
    (["experiment=auglocal_cifar", "net=resnet32_k16", "row=auglocal"], 14),  # K - d, d = 2
    (["experiment=auglocal_cifar", "net=resnet110_k55", "row=auglocal"], 52),  # K - d, d = 3
    (["experiment=auglocal_imagenet", "net=resnet34_k17", "row=auglocal"], 17),  # no K - d on ImageNet
    (["experiment=mlaan_imagenet", "net=resnet101_k33", "row=mlaan_dgl"], 33),
    (["experiment=e2e_cifar", "backbone=resnet110"], 1),
]


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


def compose_job(overrides: list[str]):
    """One job's config, with HydraConfig set so ``${hydra:runtime.choices.dataset}`` resolves (as in a run)."""
    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def expand(overrides: list[str], with_master: bool = False):
    """The job override lists of ``python run.py <overrides> -m``, exactly as BasicSweeper.sweep builds them
    (and the multirun's own config, composed without the sweeps, when asked)."""
    parsed = _PARSER.parse_overrides(overrides)
    master = compose(config_name="config", overrides=[o.input_line for o in parsed if not o.is_sweep_override()],
                     return_hydra_config=True)
    params = [f"{k}={v}" for k, v in master.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(_PARSER.parse_overrides(params + overrides), None)[0]
    return (master, jobs) if with_master else jobs


def choice(job: list[str], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in job if o.split("=", 1)[0] == key), None)


def build_meta(cfg, stub_aux: bool = False, monkeypatch=None):
    """(datamodule, model) on the meta device: shapes and checks, no memory, no init cost on real tensors."""
    if stub_aux:  # only the split and the option checks matter: skip the (slow) aux nets
        from hydra.utils import get_class

        monkeypatch.setattr(get_class(cfg.method._target_), "build_aux", lambda self, k: nn.Identity())
    with torch.device("meta"):
        return build(cfg)


# ---------------------------------------------------------------------------------------------------- experiments
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_expands_as_its_header_says_and_builds(name):
    text = (ROOT / "experiments" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), "an experiment is a global delta"
    assert "Expected" in text and "Rough cost" in text and f"experiment={name}" in text
    assert "COST" not in text
    assert not re.search(r"^\s*root:", text, re.M), "experiments must not pin dataset.root"
    cfg, jobs = expand([f"experiment={name}"], with_master=True)  # cfg = python run.py experiment=<name> --cfg job
    assert OmegaConf.to_container(cfg.dataset)["root"].startswith("${oc.env:LLA_DATA")
    assert cfg.trainer.max_epochs == _expected_epochs(name)  # the paper's recipe
    if "imagenet" not in name:
        assert (cfg.optim.lr, cfg.dataset.batch_size) == (0.8, 1024)  # docs/recipes.md#cifar-recipe CIFAR-10 / SVHN recipe
    runs = re.search(r"experiment=" + name + r" -m\s+#[^\n]*?(\d+) runs", text)
    assert runs, "the header's first command states the number of runs"
    assert len(jobs) == int(runs[1])
    assert len({tuple(sorted(j)) for j in jobs}) == len(jobs)
    for job in jobs:  # every option a job names exists as a config file
        for group in ("dataset", "backbone", "row", "net"):
            if (value := choice(job, group)) is not None:
                assert (CONF / group / f"{value}.yaml").is_file(), f"{group}={value}"
    job = compose_job(jobs[0])
    assert job.label, "every table row carries a label for lla-report and W&B"
    _, model = build_meta(job)
    assert model.num_modules >= 1


def _expected_epochs(name: str) -> int:
    return {"infopro_cifar10": 160, "infopro_svhn_stl10": 160, "infopro_star": 160, "infopro_imagenet": 90,
            "man_imagenet": 90, "mlaan_imagenet": 150, "auglocal_imagenet": 200}.get(name, 400)


# one cheap job per conf/row option (CIFAR rows on small nets, the ImageNet rows on their ImageNet nets)
ROW_BUILDS = {
    "e2e": ["dataset=cifar10", "backbone=resnet32"],
    "greedy_sl": ["dataset=cifar10", "backbone=resnet32", "k=4"],
    "dgl": ["dataset=cifar10", "backbone=resnet32", "k=4"],
    "dgl_head_auglocal": ["dataset=cifar10", "backbone=resnet32", "k=4"],
    "dgl_head_man": ["dataset=stl10", "backbone=resnet32", "k=4"],
    "infopro_contrast": ["dataset=cifar10", "backbone=resnet32", "k=4"],
    "infopro_softmax": ["dataset=stl10", "backbone=resnet110", "k=2"],
    "infopro_star": ["dataset=stl10", "backbone=resnet110", "k=3"],
    "infopro_star_imagenet": ["dataset=imagenet", "backbone=resnet101", "k=2"],
    "infopro_auglocal_baseline": ["dataset=cifar10", "backbone=resnet32", "k=16"],
    "infopro_ce": ["dataset=cifar10", "backbone=resnet32", "k=8"],
    "auglocal": ["dataset=imagenet", "net=vgg13_k10"],
    "man_dgl": ["dataset=cifar10", "backbone=resnet32", "k=8"],
    "man_infopro": ["dataset=imagenet", "backbone=resnet101", "k=2"],
    "mlaan_dgl": ["dataset=cifar10", "backbone=resnet32", "k=8"],
    "mlaan_infopro": ["dataset=stl10", "backbone=resnet32", "k=8"],
    "hpff_dgl": ["dataset=cifar10", "backbone=resnet32", "k=8"],
    "hpff_infopro": ["dataset=svhn", "backbone=resnet32", "k=8"],
}


def test_every_row_is_listed_here_and_used_by_an_experiment():
    rows = {p.stem for p in (CONF / "row").glob("*.yaml")}
    assert set(ROW_BUILDS) == rows
    used = set()
    for name in EXPERIMENTS:  # the row an experiment defaults to and the rows it sweeps
        exp = OmegaConf.load(ROOT / "experiments" / f"{name}.yaml")
        used.update(d["override /row"] for d in exp.defaults if isinstance(d, DictConfig) and "override /row" in d)
        used.update(str(OmegaConf.select(exp, "hydra.sweeper.params.row", default="")).split(","))
    assert rows <= used, f"rows no experiment uses: {rows - used}"


@pytest.mark.parametrize("row", sorted(ROW_BUILDS))
def test_row_builds_with_its_aux_nets(row):
    cfg = compose_job([f"row={row}", *ROW_BUILDS[row]])
    assert cfg.label
    _, model = build_meta(cfg)
    assert model.num_modules == (1 if row == "e2e" else model.split.num_modules) and model.num_modules >= 1


@pytest.mark.parametrize("overrides,modules", MODULE_COUNTS)
def test_paper_k_labels_give_the_papers_module_counts(overrides, modules, monkeypatch):
    cfg = compose_job(overrides)
    _, model = build_meta(cfg, stub_aux=True, monkeypatch=monkeypatch)
    assert model.num_modules == modules


def test_infopro_rows_pick_the_preset_of_their_dataset(monkeypatch):
    cfg = compose_job(["experiment=infopro_star", "dataset=stl10", "k=3"])
    assert cfg.method.preset == "stl10_resnet110_star_k3"
    _, model = build_meta(cfg, stub_aux=True, monkeypatch=monkeypatch)
    assert model.split.boundaries == (9, 20)  # docs/splits.md#resnet110, InfoPro* STL-10 K=3
    cfg = compose_job(["experiment=infopro_svhn_stl10", "dataset=svhn", "k=8", "row=infopro_softmax"])
    assert (cfg.method.preset, cfg.method.loss) == ("svhn_resnet110_k8", "ce")


def test_auglocal_row_takes_the_readme_depth_per_backbone():
    assert compose_job(["row=auglocal", "backbone=resnet32"]).method.depth == 2
    assert compose_job(["row=auglocal", "backbone=resnet110"]).method.depth == 3
    assert compose_job(["row=auglocal", "backbone=resnet110", "method.depth=5"]).method.depth == 5


def run_row(cfg) -> tuple:
    """(label, backbone, dataset, K, flattened resolved config) of a composed job, as lla-report reads them from
    the run's results.json."""
    from lla.report import flatten

    config = cfg.copy()
    with open_dict(config):
        del config["hydra"]  # a run's results.json config has no hydra node
    setting = flatten(OmegaConf.to_container(config, resolve=True))
    return cfg.label, cfg.backbone.name, cfg.hydra.runtime.choices.dataset, int(cfg.k), setting


@pytest.mark.slow
def test_every_job_of_every_experiment_resolves(monkeypatch):
    """All ~220 jobs: composed like Hydra composes them, the split and every option checked (aux nets stubbed).
    And every `published:` entry names a row its own experiment's sweep produces, with the `where` values those
    runs really have, compared as lla-report compares a run; E2E entries of the CIFAR-family tables are matched by
    the E2E experiment at the epochs their `where` names (160 for InfoPro's tables, 400 for MAN's)."""
    from lla.paper import load_published

    seen, produced = set(), {}
    for name in EXPERIMENTS:
        for job in expand([f"experiment={name}"]):
            cfg = compose_job(job)
            produced.setdefault(name, []).append(run_row(cfg))
            key = repr((OmegaConf.to_container(cfg.method, resolve=True), cfg.backbone.name, cfg.k,
                        cfg.dataset._target_))
            if key in seen:
                continue
            seen.add(key)
            _, model = build_meta(cfg, stub_aux=True, monkeypatch=monkeypatch)
            assert model.num_modules >= 1, job
    e2e = [run_row(compose_job(job))
           for job in expand(["experiment=e2e_cifar", "dataset=cifar10,svhn,stl10", "trainer.max_epochs=160,400"])]
    for p in load_published(ROOT / "experiments"):
        runs = e2e if p.label == "E2E" and p.dataset != "imagenet" else produced[p.experiment]
        assert any(p.matches(label, bb, ds, k, [setting]) for label, bb, ds, k, setting in runs), p


# ---------------------------------------------------------------------------------------------------- bare multirun
def test_bare_multirun_sweeps_the_cifar_family_each_with_its_recipe():
    jobs = expand(["method=mlaan", "backbone=resnet110", "k=55"])
    assert sorted(choice(j, "dataset") for j in jobs) == ["cifar10", "stl10", "svhn"]
    recipes = {}
    for job in jobs:
        cfg = compose_job(job)
        assert (cfg.backbone.name, cfg.k, cfg.hydra.runtime.choices.method) == ("resnet110", 55, "mlaan")
        recipes[choice(job, "dataset")] = (cfg.optim.lr, cfg.dataset.batch_size, cfg.trainer.max_epochs)
    # docs/recipes.md#cifar-recipe: LR / batch per dataset, MLAAN's 400 epochs
    assert recipes == {"cifar10": (0.8, 1024, 400), "svhn": (0.8, 1024, 400), "stl10": (0.1, 128, 400)}


def test_a_dataset_on_the_command_line_narrows_the_multirun():
    assert expand(["method=mlaan", "dataset=svhn"]) == [["dataset=svhn", "method=mlaan"]]
    jobs = expand(["method=dgl,man", "dataset=svhn,stl10"])
    assert len(jobs) == 4 and {choice(j, "dataset") for j in jobs} == {"svhn", "stl10"}
    jobs = expand(["experiment=man_cifar", "dataset=cifar10", "row=man_dgl"])
    assert len(jobs) == 4 and all(choice(j, "row") == "man_dgl" for j in jobs)


def test_single_runs_are_unaffected_and_the_dataset_recipe_wins():
    cfg = compose_job([])  # make demo / python run.py: digits, its 15 epochs
    assert (cfg.hydra.runtime.choices.dataset, cfg.trainer.max_epochs) == ("digits", 15)
    assert compose_job(["dataset=cifar10"]).trainer.max_epochs == 160  # not trainer/default.yaml's 15
    assert compose_job(["dataset=cifar10", "method=man"]).trainer.max_epochs == 400  # MAN's recipe (docs/recipes.md#cifar-recipe)
    assert compose_job(["dataset=cifar10", "method=man", "trainer.max_epochs=7"]).trainer.max_epochs == 7
    assert compose_job(["dataset=digits", "method=man"]).trainer.max_epochs == 15


def test_imagenet_runs_get_their_methods_imagenet_epochs_without_an_experiment():
    epochs = {m: compose_job(["dataset=imagenet", f"method={m}"]).trainer.max_epochs
              for m in ("auglocal", "mlaan", "man", "infopro", "dgl", "e2e")}
    assert epochs == {"auglocal": 200, "mlaan": 150, "man": 90, "infopro": 90, "dgl": 90, "e2e": 90}
    ddp = compose_job(["dataset=imagenet", "method=auglocal", "+recipe=imagenet_ddp8"])
    assert (ddp.trainer.max_epochs, ddp.optim.lr, ddp.trainer.devices) == (200, 0.4, 8)  # the recipe keeps them
    assert compose_job(["dataset=imagenet", "method=mlaan", "trainer.max_epochs=7"]).trainer.max_epochs == 7
    assert compose_job(["dataset=cifar10", "method=mlaan"]).trainer.max_epochs == 400


# ---------------------------------------------------------------------------------------------------- sweeps
def test_ema_momentum_sweep_expands_to_five_jobs():
    jobs = expand(["method=man", "dataset=synthetic", "sweep=ema_momentum"])
    assert [float(choice(j, "method.ema_momentum")) for j in jobs] == [0.9, 0.99, 0.995, 0.998, 0.999]
    assert compose_job(jobs[-1]).method.ema_momentum == 0.999
    assert len(expand(["experiment=man_ema_momentum"])) == 5


def test_seeds_sweep_includes_seed_zero():
    for overrides in (["seed=0,1,2"], ["sweep=seeds"]):
        jobs = expand(["method=dgl", "dataset=synthetic", *overrides])
        assert [int(choice(j, "seed")) for j in jobs] == [0, 1, 2]
        assert compose_job(jobs[0]).seed == 0


def test_k_sweep_follows_the_backbone():
    ks = {bb: [int(choice(j, "k")) for j in expand(["dataset=cifar10", f"backbone={bb}", "sweep=k"])]
          for bb in ("resnet32", "resnet110")}
    assert ks == {"resnet32": [2, 4, 8, 16], "resnet110": [2, 4, 8, 16, 32, 55]}
    assert len(expand(["dataset=cifar10", "backbone=resnet32", "sweep=k", "k=4,8"])) == 2


# ---------------------------------------------------------------------------------------------------- eval
def test_eval_mode_reproduces_the_runs_accuracy_from_its_checkpoint(tmp_path):
    overrides = ["dataset=synthetic", "dataset.image_size=16", "dataset.num_samples=256", "dataset.num_val=128",
                 "dataset.noise=0.1", "backbone=resnet20", "method=dgl", "k=2", "logger=none", "trainer=cpu",
                 "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "optim.lr=0.05"]
    cfg = compose_job(overrides)
    run = tmp_path / "run"
    with open_dict(cfg):
        del cfg["hydra"]
    result = train(cfg, run, {"method": "dgl", "dataset": "synthetic"}, overrides)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    assert result["val_acc"] > 0.3, "the run must learn, or a model that ignored the checkpoint would also match"

    eval_cfg = compose_job(["mode=eval", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "dataset.num_workers=0"])
    out = evaluate(eval_cfg, tmp_path / "eval", ["mode=eval", "dataset.num_workers=0"], {"dataset": "digits"})
    assert out["val_acc"] == pytest.approx(result["val_acc"], abs=1e-6)  # the run's config, not today's defaults
    assert out["modules"] == 2 and out["dataset"] == "synthetic"
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["val_acc"] == out["val_acc"]
    assert json.loads((run / "eval_last.json").read_text())["ckpt_path"].endswith("last.ckpt")
    assert find_run_dir(run / "checkpoints" / "best.ckpt") == run

    with pytest.raises(ConfigError, match="ckpt_path"):
        evaluate(compose_job(["mode=eval", f"ckpt_path={tmp_path / 'nope.ckpt'}"]), tmp_path, [], {})


def test_eval_resolves_hydra_interpolations_against_the_training_job(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "config.yaml").write_text("method:\n  preset: ${hydra:runtime.choices.dataset}_resnet110_k2\n")
    (tmp_path / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      dataset: stl10\n")
    assert load_run_config(tmp_path).method.preset == "stl10_resnet110_k2"


def test_eval_overrides_apply_on_top_of_the_saved_config():
    saved = OmegaConf.create({"dataset": {"root": "/old", "batch_size": 4}, "trainer": {"devices": 8}})
    current = compose_job(["mode=eval", "dataset.root=/new", "trainer=cpu", "row=dgl"])
    out, ignored = apply_overrides(saved, current, ["mode=eval", "dataset.root=/new", "trainer=cpu", "row=dgl"],
                                   set(current.hydra.runtime.choices))
    assert out.dataset.root == "/new" and out.dataset.batch_size == 4
    assert out.trainer.accelerator == "cpu"
    assert ignored == ["row=dgl"]

