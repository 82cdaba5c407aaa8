"""E2E / BP baseline (docs/methods/e2e.md): the whole network is one module trained by the classifier's CE.

Implemented cleanly: no BCE-on-logits (MAN ImageNet bug) and the stem keeps its max-pool (MLAAN ImageNet bug).
Whatever K the command line says, E2E has one module; the K label is still recorded.
"""

from __future__ import annotations

from lla.engine import LocalLearner
from lla.methods.modes import resolve_mode

PAPER_MODE: dict = {}
REFERENCE_MODE: dict = {}  # nothing to switch: the reference E2E branches' bugs are not kept (see above)


class E2E(LocalLearner):
    split_family = "e2e"

    def __init__(self, *args, mode: str = "paper", **kwargs):
        self.mode, self.switches = mode, resolve_mode(mode, {}, PAPER_MODE, REFERENCE_MODE)
        super().__init__(*args, **kwargs)
