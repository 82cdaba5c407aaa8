"""Shared test setup: one intra-op thread (tiny tensors run faster without cross-thread sync on 2 cores)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every test module starts at one thread, whatever a previous module set (lla-bench sets its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are collected everywhere and skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make gpu-check` on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names too
            item.add_marker(skip)
