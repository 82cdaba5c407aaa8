"""Shared test setup: one intra-op thread (tiny tensors run faster without cross-thread sync on 2 cores)."""

import os

import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
