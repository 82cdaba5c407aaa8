"""Module-parallel training (lla.pipeline, docs/pipeline.md): N stage processes (gloo) give the same weights as one
process, for the strictly local methods.

Why equality is expected: module k at batch t sees module k-1's output of batch t computed before module k-1's step,
in one process and in a pipeline alike; each module's optimizer, BN statistics and LR schedule see the same sequence.
Float64, BN kept (running stats compared too), several steps over two epochs (the LR schedule steps in between).

One spawn per stage count runs every method (spawning costs seconds, these trainings milliseconds).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lla.backbones import build_backbone
from lla.bench.ddp import spawn
from lla.errors import ConfigError
from lla.pipeline import PipelineStrategy, balance, check_boundaries, check_pipelinable

BS, SIZE, BATCHES, EPOCHS = 4, 16, 3, 2
OPTIM = {"lr": 0.05, "schedule": "cosine", "warmup_epochs": 0}  # the LR changes between the two epochs
METHODS = {  # resnet20, 4 modules (AugLocal: K=8 -> 6 single-layer modules)
    "dgl": ("lla.methods.dgl", "DGL", 4, {}),
    "infopro": ("lla.methods.infopro", "InfoPro", 4, {}),  # the reconstruction loss needs the image on every stage
    "auglocal": ("lla.methods.auglocal", "AugLocal", 8, {}),  # 6 single-layer modules (K - d)
}
BOUNDS = {2: [0, 2], 3: [0, 1, 3]}
DEPTH = 2  # pipeline depth = MAN's EMA delay in steps across a stage boundary (docs/pipeline.md#man)
MAN = ("lla.methods.man", "MAN", 4, {"base": "dgl"})
LEARN_STEPS = 40


def denormalize(x):
    return x * 0.5 + 0.5


def build(method: str, seed: int = 0):
    mod, cls_name, k, kwargs = MAN if method == "man" else METHODS[method]
    cls = getattr(importlib.import_module(mod), cls_name)
    torch.manual_seed(seed)
    return cls(build_backbone("resnet20", 10), k=k, num_classes=10, image_size=SIZE, optim=OPTIM,
               max_epochs=EPOCHS, denormalize=denormalize, **kwargs)


def loader():
    g = torch.Generator().manual_seed(0)
    n = BS * BATCHES - 1  # a smaller last batch
    data = TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=BS, shuffle=False)


def learnable_loader():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    n = 16 * LEARN_STEPS
    y = torch.randint(0, 10, (n,), generator=g)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=SIZE, mode="bilinear")
    x = templates[y] + 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def trainer(**kw):
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=EPOCHS,
                precision="64-true", use_distributed_sampler=False)
    args.update(kw)
    return L.Trainer(**args)


class LossProbe(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _worker(rank: int, world: int, out: str, bounds: list[int]) -> None:
    torch.set_num_threads(1)
    results = {}
    names = list(METHODS) + (["man"] if world == 2 else [])
    for name in names:
        model = build(name, seed=100 + rank)  # rank 1's own init must be replaced by rank 0's at setup
        trainer(devices=world, strategy=PipelineStrategy(stage_boundaries=bounds, depth=DEPTH)).fit(model, loader())
        results[name] = {k: v.clone() for k, v in model.state_dict().items()}
    if world == 2:  # MAN with its delayed EMA still learns: a learnable problem, the last stage's loss falls
        model, probe = build("man", seed=100 + rank), LossProbe()
        trainer(devices=world, strategy=PipelineStrategy(stage_boundaries=bounds, depth=DEPTH), callbacks=[probe],
                max_epochs=1, precision="32-true").fit(model, learnable_loader())
        results["man_learn"] = probe.losses
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def references():
    refs = {}
    for name in METHODS:
        model = build(name, seed=100)
        trainer(devices=1).fit(model, loader())
        refs[name] = model.state_dict()
    return refs


def run_pipeline(tmp_path_factory, world: int):
    out = tmp_path_factory.mktemp(f"pipe{world}")
    start = time.monotonic()
    spawn(_worker, world, (str(out), BOUNDS[world]), timeout_s=300)
    print(f"{world} stages: {time.monotonic() - start:.1f} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_pipeline(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return run_pipeline(tmp_path_factory, 3)


def assert_equal_states(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        diff = (got[key].double() - want[key].double()).abs().max().item() if want[key].numel() else 0.0
        assert diff <= 1e-12, f"{what}: {key} differs by {diff:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_weights_equal_one_process(two, three, references, name, world):
    results = two if world == 2 else three
    for rank in range(world):  # after the fit every stage holds the full trained model
        assert_equal_states(results[rank][name], references[name], f"{name}, {world} stages, rank {rank}")
    init = build(name, seed=100).state_dict()
    moved = max((references[name][k].double() - init[k].double()).abs().max().item() for k in init
                if init[k].is_floating_point())
    assert moved > 1e-3  # training moved the weights: the equality is not trivial
    bn = [k for k in init if k.endswith("running_mean")]
    assert bn and any(not torch.equal(references[name][k], init[k]) for k in bn)  # BN statistics compared too


# ---------------------------------------------------------------------------------------------------- pure helpers
def test_balance_minimises_the_slowest_stage():
    assert balance([1, 1, 1, 1], 2) == [0, 2]
    assert balance([4, 1, 1, 1, 1], 2) == [0, 1]
    assert balance([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [0, 5, 7]  # 15 | 13 | 17: max 17 is optimal
    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    firsts = balance(costs, 3)
    ends = [*firsts[1:], len(costs)]
    worst = max(sum(costs[a:b]) for a, b in zip(firsts, ends))
    import itertools

    best = min(max(sum(costs[a:b]) for a, b in zip((0, i, j), (i, j, len(costs))))
               for i, j in itertools.combinations(range(1, len(costs)), 2))
    assert worst == best


@pytest.mark.parametrize("bad", [[1, 2], [0], [0, 0], [0, 4], [0, 3, 2], "x"])
def test_bad_boundary_lists_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="trainer.stage_boundaries"):
        check_boundaries(bad, 4, 2 if not isinstance(bad, list) or len(bad) != 3 else 3)


def test_what_cannot_be_pipelined_is_refused():
    from lla.methods.e2e import E2E
    from lla.methods.mlaan import MLAAN

    with pytest.raises(ConfigError, match="^trainer: trainer=pipeline needs at least 2 local modules"):
        check_pipelinable(E2E(build_backbone("resnet20", 10), k=1, image_size=SIZE), 2)
    with pytest.raises(ConfigError, match="^trainer.devices:"):
        check_pipelinable(build("dgl"), 5)
    with pytest.raises(ConfigError, match="^method: trainer=pipeline cannot run MLAAN"):
        check_pipelinable(MLAAN(build_backbone("resnet20", 10), k=4, image_size=SIZE, denormalize=denormalize), 2)


# ---------------------------------------------------------------------------------------------------- MAN
def delayed_man(delay: int, boundary_k: int):
    """One process, MAN whose module ``boundary_k`` reads B_next as it was ``delay`` steps earlier than usual (the
    weights after step u-1-delay at update u; the initial weights before that): what docs/pipeline.md#man states for
    the pipeline."""
    from lla.ema import ema_update
    from lla.methods.man import MAN as ManCls

    class DelayedMAN(ManCls):
        def on_train_batch_start(self, batch, batch_idx):
            block = self.backbone.layers[self.next_block_index(boundary_k)]
            self.history.append([p.detach().clone() for p in block.parameters()])  # = after step u-1

        def after_backward(self, k):
            if k != boundary_k:
                return super().after_backward(k)
            u = len(self.history) - 1
            snapshot = self.history[max(0, u - delay)]
            block = copy.deepcopy(self.backbone.layers[self.next_block_index(k)])
            with torch.no_grad():
                for p, v in zip(block.parameters(), snapshot):
                    p.copy_(v)
            ema_update(self.aux[k].ema, block, self.ema_momentum)

    import copy

    torch.manual_seed(100)
    model = DelayedMAN(build_backbone("resnet20", 10), k=4, num_classes=10, image_size=SIZE, optim=OPTIM,
                       max_epochs=EPOCHS, denormalize=denormalize, base="dgl")
    model.history = []
    trainer(devices=1).fit(model, loader())
    return model.state_dict()


@pytest.mark.slow
def test_man_ema_across_a_stage_boundary_is_exactly_depth_steps_stale(two):
    """Pipelined MAN equals a single process whose boundary EMA reads B_next DEPTH steps late, and differs from
    plain single-process MAN (so the delay is real, and exactly the stated one: DEPTH - 1 or DEPTH + 1 would not
    match)."""
    boundary_k = BOUNDS[2][1] - 1
    for rank in range(2):
        assert_equal_states(two[rank]["man"], delayed_man(DEPTH, boundary_k), f"man, rank {rank}")
    for wrong in (0, DEPTH - 1, DEPTH + 1):
        other = delayed_man(wrong, boundary_k)
        assert any(not torch.allclose(two[0]["man"][k], other[k], atol=1e-12) for k in other), wrong


@pytest.mark.slow
def test_man_still_learns_in_a_pipeline(two):
    losses = two[1]["man_learn"]  # the last stage's loss: the classifier's cross-entropy
    assert len(losses) == LEARN_STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


# ---------------------------------------------------------------------------------------------------- preemption
def _signal_worker(rank: int, world: int, out: str, signal_rank: int, at_step: int) -> None:
    import json
    import os
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lla.checkpointing import Preemption

    class SignalAt(L.Callback):  # a signal arriving while batch `at_step` trains, on one stage only
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == signal_rank and trainer.global_step == at_step:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.set_num_threads(1)
    model = build("dgl")
    data = TensorDataset(torch.randn(40 * 4, 3, SIZE, SIZE), torch.randint(0, 10, (40 * 4,)))
    preemption = Preemption()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=PipelineStrategy(stage_boundaries=[0, 2]),
                        max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[SignalAt(), preemption])
    try:
        trainer.fit(model, DataLoader(data, batch_size=4))
        stopped = None
    except SIGTERMException:
        stopped = preemption.stopped_by
    Path(out, f"rank{rank}.json").write_text(json.dumps({"step": trainer.global_step, "stopped": stopped,
                                                          "lag": trainer.strategy.agree_lag}))


@pytest.mark.slow
def test_every_stage_stops_after_the_same_batch(tmp_path, signal_rank=1):
    """A signal during batch 5 on the last stage: the stop round launched at that batch's end is read N + depth batches
    later (so stage 0 is never held back to the last stage's pace), and both stages stop after that same batch;
    the transfers still in flight are matched, so nothing hangs."""
    import json

    spawn(_signal_worker, 2, (str(tmp_path), signal_rank, 5), timeout_s=120, threads=1)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    lag = 2 + DEPTH
    assert results == [{"step": 6 + lag, "stopped": "preempted", "lag": lag}] * 2


# ---------------------------------------------------------------------------------------------------- overlap
def _overlap_worker(rank: int, world: int, out: str) -> None:
    import json

    class SlowLastStage(L.Callback):  # stage 1 takes >= 1 s a batch; stage 0's tiny modules take milliseconds
        def __init__(self):
            self.ends: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == 1:
                time.sleep(1.0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.time())

    torch.set_num_threads(1)
    stamps = SlowLastStage()
    # a plain Trainer, none of lla's callbacks: the strategy alone must keep the stages from pacing each other
    trainer(devices=world, strategy=PipelineStrategy(stage_boundaries=[0, 2], depth=DEPTH), callbacks=[stamps],
            max_epochs=1, precision="32-true").fit(build("dgl"), loader())
    Path(out, f"rank{rank}.json").write_text(json.dumps(stamps.ends))


@pytest.mark.slow
def test_stage_0_runs_ahead_of_a_slow_last_stage(tmp_path):
    """Stage 0 finishes batch 1 (its sends of batches 0 and 1 in flight, depth 2) before the slow last stage has
    finished batch 0: nothing makes the stages meet once per batch (Lightning's own per-batch SIGTERM broadcast did,
    which ran the two stages one after the other)."""
    import json

    spawn(_overlap_worker, 2, (str(tmp_path),), timeout_s=120, threads=1)
    first, last = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert len(first) == len(last) == BATCHES
    assert first[1] < last[0], f"stage 0 ended batch 1 {first[1] - last[0]:+.2f} s after stage 1 ended batch 0"
