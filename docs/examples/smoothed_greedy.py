"""Smoothed greedy learning: each local module trains a small pooled MLP with label-smoothed cross-entropy.

A worked example for docs/guides/add-a-method.md. Saved as ``lla/methods/smoothed_greedy.py`` it is a complete lla
method; the docs test (tests/test_docs.py) loads this very file and trains it through the real engine.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lla.engine import LocalLearner
from lla.errors import ConfigError


class SmoothedGreedy(LocalLearner):
    """Greedy local CE with label smoothing on an MLP head; the last module keeps the engine's plain CE."""

    # Which K-label table the method reads (lla/splits/tables/<backbone>.yaml, families: infopro).
    split_family = "infopro"

    def __init__(self, *args, hidden: int = 64, smoothing: float = 0.1, **kwargs):
        # Options are checked before super().__init__, which calls build_aux once per local module.
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError("method.smoothing", f"got {smoothing}", "a number in [0, 1)")
        self.hidden, self.smoothing = int(hidden), float(smoothing)
        super().__init__(*args, **kwargs)

    def build_aux(self, k: int) -> nn.Module:
        """The aux net of module k < K-1, sized from the backbone's layer metadata."""
        channels, _spatial = self.module_output_shape(k)
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, self.hidden), nn.ReLU(inplace=True),
            nn.Linear(self.hidden, self.num_classes),
        )

    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        """Loss of module k on its own output h; the engine back-propagates it and steps module k."""
        logits = self.aux[k](h)
        return F.cross_entropy(logits, batch[1], label_smoothing=self.smoothing)

    def describe(self) -> dict:
        """What results.json records about the run, plus this method's own option."""
        return {**super().describe(), "smoothing": self.smoothing}
