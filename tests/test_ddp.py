"""Multi-process training (lla.distributed): 2 CPU processes (gloo) equal one process on the concatenated batch.

One pair of worker processes runs every scenario (spawning costs seconds, training here costs milliseconds); the
assertions then compare each scenario with a single-process reference computed in the test process.

The comparisons train in float64: in float32, convolving 4 images instead of 8 rounds differently (~1e-7), which can
flip one ReLU and move a weight by ~1e-4 within 3 steps, in a correct implementation too. In float64 the two runs
agree to ~1e-16, so the 1e-5 bound has a wide margin and any real error (a missed or doubled all-reduce) shows.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lla.backbones import build_backbone
from lla.bench.ddp import spawn
from lla.distributed import AllReduceBatchNorm, AllReduceSyncBatchNorm, LocalDDPStrategy
from lla.errors import ConfigError
from tests.helpers import strip_bn

ROOT = Path(__file__).resolve().parent.parent
WORLD, BS, STEPS, SIZE = 2, 4, 3, 16
CONST = {"lr": 0.02, "schedule": "constant", "warmup_epochs": 0}
SEED = 100  # rank r builds its model from seed SEED + r: the setup broadcast must make rank 1 start as rank 0
METHODS = {  # K=4 on resnet20; MAN's InfoPro base needs module_index lambdas below K=8 (docs/methods/man.md#lambda-schedule)
    "dgl": ("lla.methods.dgl", "DGL", {}),
    "man": ("lla.methods.man", "MAN", {"base": "dgl"}),
    "man_infopro": ("lla.methods.man", "MAN", {"base": "infopro", "lambda_schedule": "module_index",
                                               "ixx_2": 1.0, "ixy_2": 1.0}),
    "mlaan": ("lla.methods.mlaan", "MLAAN", {}),  # cascade_span 2: loss k reaches modules k-1 and k
}

# name -> (method, batch norm: "none" = BN replaced by Identity | "sync" = trainer.sync_batchnorm, variant)
SCENARIOS = {m: (m, "none", "plain") for m in METHODS}
SCENARIOS.update({"dgl_syncbn": ("dgl", "sync", "plain"), "dgl_nosync": ("dgl", "none", "nosync"),
                  "dgl_channels_last": ("dgl", "none", "channels_last")})  # NHWC weights: gradients keep the layout
LEARN_STEPS = 30


# ---------------------------------------------------------------------------------------------------- models
def denormalize(x):
    return x * 0.5 + 0.5


def build(method: str, seed: int, bn: str = "none", k: int = 4):
    mod, cls_name, kwargs = METHODS[method]
    cls = getattr(importlib.import_module(mod), cls_name)
    torch.manual_seed(seed)
    model = cls(build_backbone("resnet20", 10), k=k, num_classes=10, image_size=SIZE, optim=CONST, max_epochs=1,
                denormalize=denormalize, **kwargs)
    return strip_bn(model) if bn == "none" else model


def dataset(n=WORLD * BS * STEPS, learnable=False):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    if learnable:  # class templates + noise: a problem a few dozen steps can learn
        templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=SIZE, mode="bilinear")
        x = templates[y] + 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    else:
        x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    return TensorDataset(x, y)


def trainer(**kw):
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=STEPS)
    args.update(kw)
    return L.Trainer(**args)


class NoGradSync(LocalDDPStrategy):
    """Negative control: processes and broadcast as usual, but gradients are never averaged."""

    def configure_ddp(self):
        super().configure_ddp()
        self.grad_sync = None


class Probe(L.Callback):
    def __init__(self):
        self.bn_types, self.losses = set(), []

    def on_train_start(self, trainer, pl_module):
        self.bn_types = {type(m).__name__ for m in pl_module.modules() if isinstance(m, _BatchNorm)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


# ---------------------------------------------------------------------------------------------------- workers
def _scenarios_worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for name, (method, bn, variant) in SCENARIOS.items():
        model = build(method, SEED + rank, bn)
        if variant == "channels_last":
            model.use_channels_last()
        probe = Probe()
        strategy = NoGradSync() if variant == "nosync" else LocalDDPStrategy()
        # Lightning's own sampler would shuffle; unshuffled, rank r reads samples r, r+2, ...: together the ranks
        # see exactly the reference's batch of WORLD*BS consecutive samples at every step
        shard = DistributedSampler(dataset(), num_replicas=world, rank=rank, shuffle=False)
        trainer(devices=world, strategy=strategy, sync_batchnorm=bn == "sync", callbacks=[probe],
                use_distributed_sampler=False, precision="64-true").fit(model, DataLoader(dataset(), batch_size=BS, sampler=shard))
        results[name] = {"state": model.state_dict(), "bn_during_fit": probe.bn_types,
                         "bn_after_fit": {type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)}}
    # a learnable problem, sync BN on: the loss falls in data-parallel training
    model, probe = build("dgl", SEED + rank, "sync"), Probe()
    trainer(devices=world, strategy=LocalDDPStrategy(), sync_batchnorm=True, callbacks=[probe],
            max_steps=LEARN_STEPS).fit(model, DataLoader(dataset(WORLD * 8 * LEARN_STEPS, learnable=True),
                                                         batch_size=8, shuffle=True))
    results["learn"] = {"losses": probe.losses}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    # Last, the launcher's failure path (free here, a separate spawn costs seconds): rank 1 fails while rank 0
    # hangs; spawn must name rank 1 and stop rank 0 instead of waiting for it.
    if rank == 1:
        raise RuntimeError("boom on purpose")
    time.sleep(600)


def _sleep_forever(rank: int, world: int) -> None:
    time.sleep(600)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        spawn(_scenarios_worker, WORLD, (str(out),), timeout_s=240)
    files = [out / f"rank{r}.pt" for r in range(WORLD)]
    if not all(f.exists() for f in files):  # a scenario failed for real
        raise AssertionError(str(err.value))
    print(f"2-process scenarios took {time.monotonic() - start:.1f} s")
    return {"results": [torch.load(f, weights_only=False) for f in files], "error": str(err.value),
            "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def ddp_results(ddp_run):
    return ddp_run["results"]


@pytest.fixture(scope="module")
def references():
    """Single process, batch WORLD*BS: the same samples per step as the two ranks together."""
    refs: dict[tuple[str, str, bool], dict] = {}
    for method, bn, variant in SCENARIOS.values():
        key = (method, bn, variant == "channels_last")
        if key not in refs:  # the negative control shares the plain reference
            model = build(method, SEED, bn)
            if key[2]:
                model.use_channels_last()
            trainer(devices=1, precision="64-true").fit(model, DataLoader(dataset(), batch_size=WORLD * BS))
            refs[key] = model.state_dict()
    return {name: refs[method, bn, variant == "channels_last"] for name, (method, bn, variant) in SCENARIOS.items()}


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda n: (a[n].double() - b[n].double()).abs().max().item())
    return (a[worst].double() - b[worst].double()).abs().max().item(), worst


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "dgl_nosync"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(ddp_results, references, name):
    diff, where = max_diff(ddp_results[0][name]["state"], references[name])
    print(f"{name}: max |2 processes - 1 process| = {diff:.1e} ({where})")
    assert diff <= 1e-5, f"{name}: {where} differs by {diff:.2e}"
    init = build(SCENARIOS[name][0], SEED, SCENARIOS[name][1]).state_dict()
    assert max_diff(references[name], init)[0] > 1e-3  # training moved the weights: the equality is not trivial


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_holds_identical_weights_and_ema(ddp_results, name):
    """Same init (broadcast at setup; rank 1 was built from another seed), same averaged gradients -> bitwise equal
    parameters, and so equal EMA copies (MAN, MLAAN); with sync BN the running stats are equal too."""
    a, b = ddp_results[0][name]["state"], ddp_results[1][name]["state"]
    if name == "dgl_nosync":
        assert any(not torch.equal(a[n], b[n]) for n in a)  # without gradient averaging the ranks drift apart
        return
    for n in a:
        assert torch.equal(a[n], b[n]), f"{name}: {n} differs between ranks"
    if SCENARIOS[name][0] != "dgl":
        assert any(".ema." in n for n in a), "the EMA copies are part of the compared state"


def test_without_gradient_averaging_the_comparison_fails(ddp_results, references):
    """The negative control: the equality test above would catch a missing all-reduce."""
    diff, _ = max_diff(ddp_results[0]["dgl_nosync"]["state"], references["dgl_nosync"])
    assert diff > 1e-4


def test_sync_batchnorm_converts_during_fit_and_reverts(ddp_results):
    info = ddp_results[0]["dgl_syncbn"]
    assert info["bn_during_fit"] == {"AllReduceBatchNorm"}  # torch's SyncBatchNorm cannot run on CPU
    assert info["bn_after_fit"] <= {"BatchNorm1d", "BatchNorm2d"} and info["bn_after_fit"]
    state = info["state"]
    assert any(n.endswith("running_var") for n in state)  # running stats were compared with the reference too


def test_data_parallel_training_learns(ddp_results):
    losses = ddp_results[0]["learn"]["losses"]
    assert len(losses) == LEARN_STEPS
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_failing_rank_fails_the_run_with_its_rank_named(tmp_path):
    """Lightning's own launcher (popen, as trainer=ddp uses): rank 1 raises, the run exits non-zero, no hang."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
        import lightning as L
        from lla.backbones import build_backbone
        from lla.distributed import LocalDDPStrategy
        from lla.methods.dgl import DGL

        class Fails(DGL):
            def training_step(self, batch, batch_idx):
                if self.global_rank == 1 and batch_idx == 1:
                    raise RuntimeError("boom on purpose")
                return super().training_step(batch, batch_idx)

        torch.set_num_threads(1)
        model = Fails(build_backbone("resnet20", 10), k=2, num_classes=10, image_size=8, optim={CONST!r})
        data = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
        L.Trainer(accelerator="cpu", devices=2, strategy=LocalDDPStrategy(timeout=600), max_steps=20,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(model, DataLoader(data, batch_size=4))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=90)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "lla: rank 1/2 failed: RuntimeError: boom on purpose" in output, output[-3000:]
    assert time.monotonic() - start < 90


def test_spawn_names_the_failed_rank_and_stops_the_others(ddp_run):
    """Rank 1 raised at the end of the scenario worker while rank 0 slept for 600 s: spawn returned at once."""
    assert "rank 1 of 2 failed" in ddp_run["error"] and "boom on purpose" in ddp_run["error"]
    assert ddp_run["seconds"] < 240


def test_spawn_kills_a_hanging_run_at_its_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still running"):
        spawn(_sleep_forever, 2, timeout_s=2)
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------------------------------- no processes
def test_strategy_is_registered_and_rejects_ddp_wrapper_options():
    t = L.Trainer(strategy="local_ddp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(t.strategy, LocalDDPStrategy) and t.strategy._start_method == "popen"
    assert L.Trainer(strategy="local_ddp_spawn", accelerator="cpu", devices=2, logger=False).strategy._start_method \
        == "spawn"
    with pytest.raises(ConfigError, match="find_unused_parameters"):
        LocalDDPStrategy(find_unused_parameters=True)
    with pytest.raises(ConfigError, match="bucket_cap_mb"):
        LocalDDPStrategy(bucket_cap_mb=0)
    assert LocalDDPStrategy(timeout=90)._timeout.total_seconds() == 90


def test_allreduce_batchnorm_shares_state_falls_back_in_one_process_and_reverts():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5))
    x = torch.randn(6, 3, 8, 8)
    ref = net(x)
    weight = net[1].weight
    AllReduceSyncBatchNorm().apply(net)
    assert isinstance(net[1], AllReduceBatchNorm) and isinstance(net[4], AllReduceBatchNorm)
    assert net[1].weight is weight  # shared, so optimizers built before or after see the same parameter
    torch.testing.assert_close(net(x), ref)  # no process group: plain batch norm
    AllReduceSyncBatchNorm().revert(net)
    assert type(net[1]) is nn.BatchNorm2d and type(net[4]) is nn.BatchNorm1d and net[1].weight is weight
    assert int(net[1].num_batches_tracked) == 2


def test_ddp_trainer_config_builds_the_local_strategy():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer=ddp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, LocalDDPStrategy) and strategy._start_method == "popen"
    assert strategy.bucket_cap_mb == 25 and strategy._timeout.total_seconds() == 1800
    assert cfg.trainer.sync_batchnorm is False and cfg.trainer.use_distributed_sampler is True


@pytest.mark.parametrize("recipe,devices,batch,lr", [("imagenet_ddp8", 8, 128, 0.4), ("imagenet_man1gpu", 1, 128, 0.05)])
def test_imagenet_recipes(recipe, devices, batch, lr):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["dataset=imagenet", f"+recipe={recipe}"])
    assert cfg.trainer.devices * cfg.dataset.batch_size == devices * batch  # batch_size is per process
    assert cfg.trainer.devices == devices and cfg.optim.lr == lr and cfg.trainer.max_epochs == 90
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_epochs == 0
    if devices > 1:
        assert "LocalDDPStrategy" in cfg.trainer.strategy._target_


def test_slurm_launcher_presets_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    names = sorted(p.stem for p in (ROOT / "conf/hydra/launcher").glob("*.yaml"))
    assert names
    for name in names:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"hydra/launcher={name}", "trainer=ddp"],
                          return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher"), name
        assert launcher.tasks_per_node == launcher.gpus_per_node, name  # one process per GPU: Lightning reads SLURM
        assert launcher.timeout_min > 0 and launcher.max_num_timeout >= 0, name


# ---------------------------------------------------------------------------------------------------- channels_last
@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group in the test process (torn down after): ModuleGradSync's all-reduce is then the
    identity on the values, so a step with gradient sync must equal the step without it."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_sync_keeps_each_parameters_layout(one_process_group, fused):
    """trainer=ddp + channels_last: the averaged gradients must come back with their parameters' (NHWC) strides,
    or the SGD update adds gradient element i to weight element j."""
    from lla.distributed import ModuleGradSync

    models = []
    for sync in (False, True):
        model = build("dgl", SEED, "sync")
        model.use_channels_last()
        opt = model.configure_optimizers()
        for o in opt.optimizers:
            for g in o.param_groups:
                g["fused"] = fused
        torch.manual_seed(0)
        x = torch.randn(BS, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (BS,))
        loss = model.local_loss(0, model.forward_module(0, x), (x, y))
        loss.backward()
        if sync:
            grad_sync = ModuleGradSync(world_size=1)
            grad_sync.launch(model, 0)
            grad_sync.wait(model, 0)
            for p in grad_sync.module_params(model, 0):
                assert p.grad.stride() == p.stride(), "gradient layout differs from its parameter's"
        opt.step_module(0)
        models.append(model)
    plain, synced = (dict(m.named_parameters()) for m in models)
    conv = [n for n, p in plain.items() if p.dim() == 4 and not p.is_contiguous()]
    assert conv, "the model has channels_last conv weights"
    for name in plain:
        torch.testing.assert_close(synced[name], plain[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
