"""``compile=true`` (lla.compile, docs/compile.md): torch.compile per local module and per aux net.

* every method: 3 compiled SGD steps give the same weights and BN statistics as 3 eager steps (float32, tolerance
  measured below), and graphs were really compiled;
* recompiles over 20 steps of a real Trainer run (two epochs, each ending in a smaller batch) are exactly one per
  graph, at the first smaller batch, and none after;
* the config keys: compile=true builds a compiled model with unchanged state-dict keys; bad values are one-line
  errors;
* on CUDA (marker ``gpu``): compile_mode=reduce-overhead (CUDA graphs) equals eager.

Compiling is slow on a 2-core CPU (Inductor writes and builds C++), so everything is tiny: ResNet-20, K=2 (AugLocal 4),
8x8 images, batch 16. torch.compiler.reset() before each test makes every test compile its own graphs (Inductor's disk
cache still makes a rerun faster).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lla.backbones import build_backbone
from lla.bench.interleaved import detach_from_trainer
from lla.compile import compile_model, count_compiles, is_compiled
from lla.errors import ConfigError
from lla.methods.auglocal import AugLocal
from lla.methods.dgl import DGL
from lla.methods.e2e import E2E
from lla.methods.infopro import InfoPro
from lla.methods.man import MAN
from lla.methods.mlaan import MLAAN
from tests.helpers import trainer

CONST = {"lr": 0.05, "schedule": "constant", "warmup_epochs": 0}
SMALL_K = {"lambda_schedule": "module_index", "ixx_2": 1.0, "ixy_2": 1.0}  # MAN's stage schedule needs K >= 8
METHODS = {
    "e2e": (E2E, {}),
    "dgl": (DGL, {}),
    "infopro": (InfoPro, {}),
    "auglocal": (AugLocal, {"depth": 1}),
    "man": (MAN, {"base": "infopro", **SMALL_K}),
    "mlaan": (MLAAN, {"base": "dgl"}),
}
K, SIZE, BATCH = 2, 8, 16
# K=2 keeps the graphs few (a cold Inductor cache compiles each); AugLocal at K=2 would build an aux net with the same
# code and shapes as module 1, which Inductor reuses instead of compiling a graph of its own
K_OF = {"auglocal": 4}

# ||w_compiled - w_eager|| / ||w_eager - w_init|| over every float parameter and buffer after 3 steps. Measured on the
# 2-core CPU (torch 2.14, Inductor C++): 2e-7 .. 3e-6 for E2E, InfoPro, AugLocal, MAN, MLAAN; the same set-up in
# float32 against float64 (eager) differs by 3e-7 .. 2e-6, so Inductor only re-orders roundings (and in float64,
# compiled DGL equals eager DGL to 6e-15 over 4 steps). DGL in float32 jumps to 2.4e-3 at step 3, and so does EAGER
# DGL whose weights were perturbed by 1e-6 (relative): a rounding-level difference crosses a discontinuity there and
# is amplified ~1000-fold. So the bound is REL_TOL or 3x what such a 1e-6 perturbation of the eager run gives,
# whichever is larger: it still catches a skipped or doubled update (~1) or a wrong gradient.
REL_TOL = 1e-4
PERTURB = 1e-6


def to01(x):
    return (x * 0.25 + 0.5).clamp(0, 1)


def make(name: str):
    cls, kw = METHODS[name]
    torch.manual_seed(0)
    return cls(build_backbone("resnet20", 10), k=K_OF.get(name, K), num_classes=10, image_size=SIZE, optim=CONST,
               max_epochs=1, denormalize=to01, **kw)


def batches(n: int, batch: int = BATCH):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def relative_distance(a: dict, b: dict, init: dict) -> float:
    keys = [n for n in init if init[n].is_floating_point()]
    num = sum(((a[n].double() - b[n].double()) ** 2).sum() for n in keys)
    den = sum(((b[n].double() - init[n].double()) ** 2).sum() for n in keys)
    return float((num / den).sqrt())


def perturbed_eager_distance(name: str, init: dict, eager_state: dict) -> float:
    """How far 3 eager float32 steps move when every weight starts 1e-6 (relative, random) off: the float32
    sensitivity of this set-up, which no implementation can be held below."""
    model = make(name)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + PERTURB * torch.randn(p.shape, generator=g))
    detach_from_trainer(model)
    for i, batch in enumerate(batches(3)):
        model.training_step(batch, i)
    return relative_distance(model.state_dict(), eager_state, init)


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_compiled_steps_equal_eager_steps(name):
    eager, compiled = make(name), make(name)
    init = {n: t.detach().clone() for n, t in eager.state_dict().items()}
    compile_model(compiled)
    assert is_compiled(compiled) and not is_compiled(eager)
    for model in (eager, compiled):
        detach_from_trainer(model)
    with count_compiles() as c:
        for i, batch in enumerate(batches(3)):
            eager.training_step(batch, i)
            compiled.training_step(batch, i)
    # graphs really compiled: E2E its one module + the head, a local method its modules, aux nets and the head
    assert c["graphs"] >= (2 if name == "e2e" else 3), c
    a, b = compiled.state_dict(), eager.state_dict()
    assert list(a) == list(b)  # same keys: checkpoints of compiled and eager runs are interchangeable
    dist = relative_distance(a, b, init)
    tol = max(REL_TOL, 3 * perturbed_eager_distance(name, init, b))
    print(f"{name}: compiled vs eager after 3 steps: relative distance {dist:.2e} (bound {tol:.1e}), "
          f"{c['graphs']} graphs, {c['seconds']:.0f} s compiling")
    assert dist <= tol, f"{name}: compiled weights are {dist:.2e} away from eager ones (bound {tol:.1e})"
    moved = max((b[n].float() - init[n].float()).abs().max().item() for n in init if init[n].is_floating_point())
    assert moved > 1e-3  # the steps did train


class GraphCounts:
    """Graphs compiled so far, read after every training batch (the recompile count per step)."""

    def __init__(self):
        from lla.compat import compiled_graph_count

        self.read = compiled_graph_count
        self.after: list[int] = []
        self.sizes: list[int] = []

    def callback(self):
        import lightning as L

        probe = self

        class Probe(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                probe.after.append(probe.read())
                probe.sizes.append(len(batch[1]))

        return Probe()


@pytest.mark.slow
def test_recompiles_over_20_steps_are_one_per_graph_at_the_smaller_last_batch():
    """Two epochs of 10 batches, the 10th of each holding 8 samples instead of 16: 20 steps. With compile_dynamic=
    false each graph is compiled at step 1 (batch 16), once more at the first batch of 8, and never again."""
    model = compile_model(make("dgl"))
    n = 9 * BATCH + BATCH // 2
    xs, ys = zip(*batches(10))
    data = TensorDataset(torch.cat(xs)[:n], torch.cat(ys)[:n])
    counts = GraphCounts()
    from lla.compat import compiled_graph_count

    start = compiled_graph_count()
    trainer(max_epochs=2, callbacks=[counts.callback()]).fit(model, DataLoader(data, batch_size=BATCH))
    sizes, after = counts.sizes, [a - start for a in counts.after]
    assert len(sizes) == 20 and sizes[9] == sizes[19] == BATCH // 2 and set(sizes[:9]) == {BATCH}
    per_step = [after[0]] + [b - a for a, b in zip(after, after[1:])]
    first = per_step[0]
    # module runners (K), aux nets (K-1, one class: shared graphs where shapes agree) and the head
    assert 3 <= first <= 2 * K, per_step
    assert per_step[1:9] == [0] * 8, f"recompiles on full batches: {per_step}"
    assert per_step[9] == first, f"the smaller last batch should compile each graph exactly once more: {per_step}"
    assert per_step[10:] == [0] * 10, f"recompiles in the second epoch: {per_step}"


def test_config_compile_builds_a_compiled_model_with_the_same_state_dict_keys():
    from hydra import compose, initialize_config_dir

    from lla.build import CONF_DIR, build

    overrides = ["method=dgl", "dataset=synthetic", "backbone=resnet20", "k=4", "logger=none"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        plain = compose(config_name="config", overrides=overrides)
        cfg = compose(config_name="config", overrides=[*overrides, "compile=true", "compile_mode=max-autotune"])
    _, eager = build(plain)
    _, model = build(cfg)
    assert not is_compiled(eager) and is_compiled(model)
    assert len(model.compiled_modules) == model.num_modules
    assert model.compile_options == {"mode": "max-autotune", "dynamic": False, "fullgraph": False}
    assert list(model.state_dict()) == list(eager.state_dict())


@pytest.mark.parametrize("override, key", [("compile=yes", "compile"), ("compile_mode=fastest", "compile_mode"),
                                            ("compile_dynamic=3", "compile_dynamic")])
def test_bad_compile_options_are_one_line_errors(override, key):
    from hydra import compose, initialize_config_dir

    from lla.build import CONF_DIR, build

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["dataset=synthetic", "logger=none", "compile=true", override])
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert str(err.value).startswith(f"{key}:")


@pytest.mark.slow
def test_interleaved_bench_reports_compile_time_apart_from_step_time():
    """lla.bench.interleaved --compile: every row eagerly (the yardsticks), then E2E and the method compiled; the
    compile happens in warm-up steps of each compiled row, reported as compile_s, and no timed step holds it. Each
    compiled row is also divided by its own eager twin (does compiling pay?)."""
    from lla.bench.interleaved import compiled_markdown, measure
    from lla.bench.runner import BenchConfig

    rows = measure([BenchConfig("e2e", "resnet20", K, BATCH, SIZE), BenchConfig("dgl", "resnet20", K, BATCH, SIZE)],
                   rounds=2, warmup=0, device="cpu", compile_mode="default", compile_warmup=2)
    assert [(r["method"], r["compiled"]) for r in rows] == [("e2e", False), ("dgl", False), ("e2e", True),
                                                            ("dgl", True)]
    eager_e2e, eager_dgl, e2e, dgl = rows
    assert eager_e2e["compile_s"] is None and eager_e2e["compile_graphs"] is None and eager_dgl["vs_eager"] is None
    for r in (e2e, dgl):
        assert r["compile_graphs"] >= 2 and r["compile_s"] > 0, r
        assert len(r["step_times_s"]) == 2 and max(r["step_times_s"]) < r["compile_s"]  # compiling is not timed
    assert dgl["time_vs_e2e"] == pytest.approx(dgl["step_time_s"] / e2e["step_time_s"])
    assert dgl["time_vs_plain_e2e"] == pytest.approx(dgl["step_time_s"] / eager_e2e["step_time_s"])
    assert dgl["vs_eager"] == pytest.approx(dgl["step_time_s"] / eager_dgl["step_time_s"])
    assert e2e["vs_eager"] == pytest.approx(e2e["step_time_s"] / eager_e2e["step_time_s"])
    text = compiled_markdown(rows, "test")
    assert "compile_mode=default" in text and text.count("\n| ") == 5  # header + 4 rows


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["e2e", "dgl", "mlaan"])
def test_reduce_overhead_on_cuda_equals_eager(name):
    """compile_mode=reduce-overhead: each module's forward and backward replay as CUDA graphs (no skipped graph),
    and 3 steps give the eager weights (TF32 off). Written without a GPU to run it on: the first GPU run confirms
    the tolerance."""
    from lla.compat import cudagraph_skips

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager, compiled = make(name).cuda(), make(name).cuda()
        init = {n: t.detach().clone() for n, t in eager.state_dict().items()}
        compile_model(compiled, mode="reduce-overhead")
        for model in (eager, compiled):
            detach_from_trainer(model)
        skips = cudagraph_skips()
        for i, (x, y) in enumerate(batches(3)):
            eager.training_step((x.cuda(), y.cuda()), i)
            compiled.training_step((x.cuda(), y.cuda()), i)
        torch.cuda.synchronize()
        assert cudagraph_skips() == skips, "some graphs ran without CUDA graphs"
        dist = relative_distance(compiled.state_dict(), eager.state_dict(), init)
        assert dist <= REL_TOL, f"{name}: reduce-overhead weights are {dist:.2e} away from eager ones"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
