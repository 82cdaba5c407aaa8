"""One test per private torch / Lightning / Hydra name lla relies on (all of them live in lla/compat.py).

Each test checks that the name still exists and still does what lla needs, so that an upgrade which changes one
fails here, naming the installed version, instead of somewhere inside a training run.
"""

from __future__ import annotations

import inspect

import hydra
import lightning
import lightning as L
import pytest
import torch
from torch import nn

from lla import compat
from lla.optim import ModuleOptimizers, OptimConfig

VERSIONS = f"torch {torch.__version__}, lightning {lightning.__version__}, hydra-core {hydra.__version__}"


def changed(what: str) -> str:
    return f"{what} changed under {VERSIONS}: update lla/compat.py"


# ----------------------------------------------------------------------------------------------------------- torch
def test_batchnorm_base_class():
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        assert issubclass(cls, compat.BatchNorm), changed(f"torch.nn.modules.batchnorm._BatchNorm (base of {cls})")
    bn = compat.BatchNorm(4)  # lla's AllReduceBatchNorm calls its constructor and _check_input_dim
    assert bn.running_mean.shape == (4,) and hasattr(bn, "_check_input_dim"), changed("_BatchNorm's constructor")


def test_dropout_base_class():
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
        assert issubclass(cls, compat.DropoutNd), changed(f"torch.nn.modules.dropout._DropoutNd (base of {cls})")
    assert compat.DropoutNd(0.3).p == 0.3, changed("_DropoutNd.p")


def test_foreach_ops_match_the_per_tensor_ops():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    b = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    x = [t.clone() for t in a]
    compat.foreach_mul_(x, 0.5)
    assert all(torch.equal(u, v * 0.5) for u, v in zip(x, a)), changed("torch._foreach_mul_")
    x = [t.clone() for t in a]
    compat.foreach_lerp_(x, b, 0.25)
    assert all(torch.allclose(u, torch.lerp(v, w, 0.25)) for u, v, w in zip(x, a, b)), changed("torch._foreach_lerp_")
    x = [t.clone() for t in a]
    compat.foreach_copy_(x, b)
    assert all(torch.equal(u, w) for u, w in zip(x, b)), changed("torch._foreach_copy_")


def test_fused_kernel_devices_are_those_fused_sgd_runs_on():
    devices = compat.fused_kernel_devices()
    assert isinstance(devices, tuple) and all(isinstance(d, str) for d in devices) and "cuda" in devices, \
        changed("torch.utils._foreach_utils._get_fused_kernels_supported_devices")
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    if "cpu" in devices:  # the list says the CPU has the kernel: fused SGD must run there
        torch.optim.SGD([p], lr=0.1, fused=True).step()
        assert torch.allclose(p.detach(), torch.full((3,), 0.9)), changed("fused SGD on the listed devices")
    else:
        with pytest.raises(RuntimeError):
            torch.optim.SGD([p], lr=0.1, fused=True)


def test_privateuse1_backend_name():
    name = compat.privateuse1_backend_name()
    assert isinstance(name, str) and name, changed("torch._C._get_privateuse1_backend_name")


def test_flatten_and_unflatten_dense_tensors_round_trip():
    tensors = [torch.arange(3.0), torch.arange(4.0).view(2, 2)]
    flat = compat.flatten_dense_tensors(tensors)
    assert flat.shape == (7,) and torch.equal(flat, torch.cat([t.flatten() for t in tensors])), \
        changed("torch._utils._flatten_dense_tensors")
    back = compat.unflatten_dense_tensors(flat, tensors)
    assert [tuple(t.shape) for t in back] == [(3,), (2, 2)] and all(torch.equal(u, v) for u, v in zip(back, tensors)), \
        changed("torch._utils._unflatten_dense_tensors")


def test_non_persistent_buffer_names():
    m = nn.Module()
    m.register_buffer("kept", torch.zeros(1))
    m.register_buffer("scratch", torch.zeros(1), persistent=False)
    names = compat.non_persistent_buffer_names(m)
    assert names == {"scratch"} and "scratch" not in m.state_dict(), changed("nn.Module._non_persistent_buffers_set")


def test_steps_with_amp_scaling_makes_grad_scaler_hand_the_step_over():
    """GradScaler.step skips an optimizer whose gradients hold inf, unless the optimizer handles scaling itself."""
    calls = []

    class Plain(torch.optim.SGD):
        def step(self, closure=None, **kwargs):
            calls.append(type(self).__name__)

    @compat.steps_with_amp_scaling
    class Marked(Plain):
        pass

    for cls in (Plain, Marked):
        p = nn.Parameter(torch.ones(2))
        p.grad = torch.tensor([float("inf"), 1.0])
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))  # (creates the scale)
        scaler.step(cls([p], lr=0.1))
    assert calls == ["Marked"], changed("GradScaler.step's `_step_supports_amp_scaling`")
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    assert _optimizer_handles_unscaling(Marked([nn.Parameter(torch.ones(1))], lr=0.1)), \
        changed("Lightning's MixedPrecision reading `_step_supports_amp_scaling`")
    assert _optimizer_handles_unscaling(ModuleOptimizers([[nn.Parameter(torch.ones(1))]], OptimConfig(), 1))


# ------------------------------------------------------------------------------------------------------- lightning
def _ddp_strategy(cls=None):
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    cls = cls or DDPStrategy
    return cls(parallel_devices=[torch.device("cpu")] * 2, cluster_environment=LightningEnvironment(),
               start_method="popen")


def test_popen_launcher_class_and_launcher_attribute():
    strategy = _ddp_strategy()
    strategy._configure_launcher()  # the private hook lla.distributed.LocalDDPStrategy overrides
    assert isinstance(compat.strategy_launcher(strategy), compat.SubprocessScriptLauncher), \
        changed("DDPStrategy._configure_launcher / Strategy._launcher / _SubprocessScriptLauncher")
    from lla.distributed import LocalDDPStrategy, LocalLauncher

    ours = _ddp_strategy(LocalDDPStrategy)
    ours._configure_launcher()
    assert isinstance(compat.strategy_launcher(ours), LocalLauncher), changed("Strategy._launcher")
    compat.set_strategy_launcher(ours, None)
    assert ours.launcher is None, changed("Strategy.launcher reading Strategy._launcher")


def test_call_children_scripts():
    method = getattr(compat.SubprocessScriptLauncher, "_call_children_scripts", None)
    assert callable(method) and list(inspect.signature(method).parameters) == ["self"], \
        changed("_SubprocessScriptLauncher._call_children_scripts()")
    assert "procs" in inspect.getsource(method), changed("_SubprocessScriptLauncher._call_children_scripts filling procs")


def test_strategy_layer_sync_is_what_the_trainer_sets_and_setup_applies():
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
    from lightning.pytorch.strategies import DDPStrategy

    from lla.distributed import LocalDDPStrategy

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=LocalDDPStrategy(), sync_batchnorm=True,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(compat.strategy_layer_sync(trainer.strategy), TorchSyncBatchNorm), \
        changed("ParallelStrategy._layer_sync set from Trainer(sync_batchnorm=True)")
    compat.set_strategy_layer_sync(trainer.strategy, None)
    assert compat.strategy_layer_sync(trainer.strategy) is None
    assert "self._layer_sync.apply(self.model)" in inspect.getsource(DDPStrategy.setup), \
        changed("DDPStrategy.setup applying _layer_sync")


def test_attached_trainer():
    module = L.LightningModule()
    assert compat.attached_trainer(module) is None, changed("LightningModule._trainer")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer, changed("LightningModule._trainer")


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.ones(8, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)


def _fit(callback, max_steps=3):
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(_Tiny())
    return trainer


def test_fit_data_fetcher_rebuilds_the_training_iterator():
    from lightning.pytorch.loops.fetchers import _DataFetcher

    seen = {}

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            fetcher = compat.fit_data_fetcher(trainer)
            seen["fetcher"] = fetcher
            iter(fetcher)  # what lla.checkpointing does after reseeding the sampler

    trainer = _fit(Look())
    assert isinstance(seen["fetcher"], _DataFetcher), changed("FitLoop._data_fetcher")
    assert trainer.global_step == 3, changed("iter(FitLoop._data_fetcher) before the first batch")


def test_disable_sigterm_broadcast_replaces_the_per_batch_broadcast():
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(_TrainingEpochLoop.advance), \
        changed("_TrainingEpochLoop.advance calling _broadcast_sigterm_tensor")
    seen = {}

    class Disable(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["disabled"] = compat.disable_sigterm_broadcast(trainer)
            seen["now"] = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()

    _fit(Disable(), max_steps=1)
    assert seen == {"disabled": True, "now": None}, changed("_TrainingEpochLoop._broadcast_sigterm_tensor")


def test_request_sigterm_stop_stops_after_the_batch():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    seen = {}

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen["requested"] = compat.request_sigterm_stop(trainer)

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Stop()])
    with pytest.raises(SIGTERMException):
        trainer.fit(_Tiny())
    assert seen == {"requested": True} and trainer.global_step == 1, \
        changed("Trainer._signal_connector.received_sigterm")


def test_logger_experiment_attribute(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    assert not compat.logger_experiment_started(logger) and compat.started_experiment(logger) is None, \
        changed("Logger._experiment before the experiment starts")
    experiment = logger.experiment
    assert compat.logger_experiment_started(logger) and compat.started_experiment(logger) is experiment, \
        changed("Logger._experiment")


def test_wandb_init_kwargs(tmp_path):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    logger = WandbLogger(project="p", name="n", save_dir=str(tmp_path), offline=True, anonymous=False)
    init = compat.wandb_init_kwargs(logger)
    assert isinstance(init, dict) and init.get("project") == "p" and init.get("name") == "n", \
        changed("WandbLogger._wandb_init")
    assert compat.wandb_init_kwargs(CSVLogger(tmp_path)) is None


# ----------------------------------------------------------------------------------------------------------- hydra
def test_hydra_args_parser_reads_overrides_and_flags():
    args, _ = compat.hydra_args_parser().parse_known_args(["method=dgl", "k=4", "-m"])
    assert args.overrides == ["method=dgl", "k=4"] and args.multirun, changed("hydra._internal.utils.get_args_parser")


# -------------------------------------------------------------------------------- the optimizer container is real
def test_module_optimizers_is_a_real_optimizer_over_the_inner_groups():
    """Optimizer.__init__ ran (step hooks fire), the groups are the inner optimizers' own dicts, the state reads
    through to theirs, and both stay linked after load_state_dict (which gives the inner optimizers new groups)."""
    torch.manual_seed(0)
    params = [[nn.Parameter(torch.randn(3))], [nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))]]
    opt = ModuleOptimizers(params, OptimConfig(lr=0.1, fused=False), epochs=2)
    hooked = []
    opt.register_step_post_hook(lambda o, args, kwargs: hooked.append(o))
    for p in (p for ps in params for p in ps):
        p.grad = torch.ones_like(p)
    opt.step()
    assert hooked == [opt]
    assert [id(g) for g in opt.param_groups] == [id(g) for o in opt.optimizers for g in o.param_groups]
    assert all(opt.state[p] is o.state[p] for o, ps in zip(opt.optimizers, params) for p in ps)
    assert set(opt.state) == {p for ps in params for p in ps}
    assert all(set(o.state) == set(ps) for o, ps in zip(opt.optimizers, params))  # no entry leaked across modules

    other = ModuleOptimizers(params, OptimConfig(lr=0.1, fused=False), epochs=2)
    other.load_state_dict(opt.state_dict())
    for g in other.param_groups:
        g["lr"] = 0.5
    assert [g["lr"] for o in other.optimizers for g in o.param_groups] == [0.5, 0.5]
    assert all(torch.equal(other.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
               for ps in params for p in ps)


# ----------------------------------------------------------------------------------------------- torch.compile
def test_recompile_limit_is_raised_never_lowered():
    import torch._dynamo.config as dynamo_config

    saved = dynamo_config.recompile_limit
    try:
        compat.set_recompile_limit(saved + 5)
        assert dynamo_config.recompile_limit == saved + 5, changed("torch._dynamo.config.recompile_limit")
        compat.set_recompile_limit(1)
        assert dynamo_config.recompile_limit == saved + 5
    finally:
        dynamo_config.recompile_limit = saved


def test_graph_count_and_compile_seconds_follow_a_compile():
    """One Inductor compile of a tiny function with a backward: one more graph, and the forward and backward
    compile times both recorded under the names compile_seconds sums."""
    from torch._dynamo.utils import compilation_time_metrics
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    torch.compiler.reset()
    graphs, seconds = compat.compiled_graph_count(), compat.compile_seconds()
    fn = torch.compile(lambda x: (x * 2 + 1).relu(), dynamic=False)
    x = torch.randn(5, requires_grad=True)
    # a warm on-disk cache (an earlier run) would load both graphs without calling the compilers: compile for real
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        fn(x).sum().backward()
    assert compat.compiled_graph_count() == graphs + 1, changed('counters["stats"]["unique_graphs"]')
    for key in compat.COMPILE_TIME_KEYS:
        assert compilation_time_metrics.get(key), changed(f"compilation_time_metrics[{key!r}]")
    assert compat.compile_seconds() > seconds
    fn(x).sum().backward()  # cached: nothing compiled
    assert compat.compiled_graph_count() == graphs + 1
    torch.compiler.reset()


def test_cudagraph_skips_counter_is_the_one_inductor_increments():
    from torch._inductor import cudagraph_utils

    assert 'counters["inductor"]["cudagraph_skips"]' in inspect.getsource(cudagraph_utils), \
        changed('counters["inductor"]["cudagraph_skips"]')
    assert isinstance(compat.cudagraph_skips(), int)
