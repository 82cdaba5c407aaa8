"""Gradient accumulation under trainer=ddp (2 gloo processes): equal to one process on the concatenated batches of
a window, and a module's all-reduce is launched only on the batches where it steps."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lla.bench.ddp import spawn
from lla.distributed import LocalDDPStrategy
from tests.test_module_steps import build

WORLD, BS, N, BATCHES = 2, 4, 2, 4  # per rank: 4 batches of 4, accumulated in windows of 2 -> 2 steps
METHODS = ["dgl", "mlaan"]


def dataset():
    g = torch.Generator().manual_seed(0)
    n = WORLD * BS * BATCHES
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
                         torch.randint(0, 10, (n,), generator=g))


def trainer(**kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=1,
                     precision="64-true", **kw)


def _worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    launches = {"in_step": False, "n": 0}
    real = dist.all_reduce

    def counting(*args, **kwargs):
        if launches["in_step"]:
            launches["n"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    results = {}
    for method in METHODS:
        model = build(method)
        model.configure_module_steps(N)
        step = model.training_step

        def counted_step(batch, batch_idx, step=step):
            launches["in_step"] = True
            try:
                return step(batch, batch_idx)
            finally:
                launches["in_step"] = False

        model.training_step = counted_step
        launches["n"] = 0
        # unshuffled: rank r reads samples r, r+2, ...; a window of 2 batches on 2 ranks = 16 consecutive samples
        shard = DistributedSampler(dataset(), num_replicas=world, rank=rank, shuffle=False)
        t = trainer(devices=world, strategy=LocalDDPStrategy(), use_distributed_sampler=False)
        t.fit(model, DataLoader(dataset(), batch_size=BS, sampler=shard))
        results[method] = {"state": model.state_dict(), "launches": launches["n"], "steps": t.global_step,
                           "modules": model.num_modules}
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_accumulate")
    start = time.monotonic()
    spawn(_worker, WORLD, (str(out),), timeout_s=240)
    print(f"2-process accumulation took {time.monotonic() - start:.1f} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_under_ddp_equals_one_process_on_the_window(ddp_results, method):
    ref = build(method)
    trainer(devices=1).fit(ref, DataLoader(dataset(), batch_size=WORLD * BS * N))  # 2 batches of 16 -> 2 steps
    ours = ddp_results[0][method]
    assert ours["steps"] == 2
    expected = ref.state_dict()
    for name, value in ours["state"].items():
        torch.testing.assert_close(value, expected[name], atol=1e-10, rtol=1e-8, msg=name)
        assert torch.equal(value, ddp_results[1][method]["state"][name]), name  # ranks stay bitwise equal
    init = build(method).state_dict()
    assert max((expected[n].double() - init[n].double()).abs().max() for n in init) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_all_reduce_only_on_stepping_batches(ddp_results, method):
    for rank in range(WORLD):
        r = ddp_results[rank][method]
        # one bucket per module (each is far below bucket_cap_mb): stepping batches x modules, not batches x modules
        assert r["launches"] == r["steps"] * r["modules"] == (BATCHES // N) * r["modules"], r
