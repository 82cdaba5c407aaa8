"""E2E / BP baseline (METHODS.md §5.1): the whole network is one module trained by the classifier's CE.

Implemented cleanly: no BCE-on-logits (MAN ImageNet bug) and the stem keeps its max-pool (MLAAN ImageNet bug).
Whatever K the command line says, E2E has one module; the K label is still recorded.
"""

from __future__ import annotations

from lla.engine import LocalLearner


class E2E(LocalLearner):
    split_family = "e2e"
