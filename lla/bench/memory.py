"""Device-independent training memory: bytes autograd saves for backward, plus parameter gradients.

:class:`~lla.memory.SavedTensorMeter` (a runtime module: the training callbacks use it) counts saved tensors: a
saved-tensor hook sees every tensor the graph keeps for backward. Each storage is counted once (views and tensors
saved by several ops share it) and released when the last saved reference to it is dropped, i.e. when the graph that
held it is freed by backward. Parameters and buffers are excluded: they are weights, not activations.

:class:`TrainingMemoryMeter` adds the other half of what a local step frees early, the parameter gradients
(post-accumulate-grad hooks add them; a gradient set to ``None`` by ``zero_grad`` is noticed at the next event), and
splits the step into *segments*, one per local loss, so a benchmark can tell "this module needs X bytes" from "X
bytes were still alive when this module started" (a graph or gradient kept past its module's step).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from lla.memory import SavedTensorMeter

__all__ = ["SavedTensorMeter", "Segment", "TrainingMemoryMeter"]


@dataclass
class Segment:
    """One local loss's share of a step: from its module's forward to the end of its backward."""

    index: int
    carried_activation_bytes: int  # saved tensors alive when the segment began (0 if earlier graphs were freed)
    carried_grad_bytes: int  # parameter gradients alive when it began (0 if earlier modules stepped and freed)
    activation_bytes: int  # peak saved bytes during the segment minus what was carried in
    total_bytes: int  # peak (saved + gradients) during the segment minus what was carried in


class TrainingMemoryMeter(SavedTensorMeter):
    """Saved activations and parameter gradients, live and jointly at peak, plus per-segment figures.

    ``peak_total_bytes`` is the peak of (saved activations + gradients) at the same instant: what a step needs on
    top of the parameters and the optimizer state. Peaks are sampled whenever either quantity grows, so they are
    exact up to the granularity of one saved tensor or one gradient.

    >>> with TrainingMemoryMeter(exclude=weights, params=model.parameters()) as m:
    ...     m.begin_segment(0); loss = model(x).sum(); loss.backward(); m.end_segment()
    >>> m.peak_total_bytes, m.segments[0].activation_bytes
    """

    def __init__(self, exclude: Iterable[Tensor] = (), params: Iterable[nn.Parameter] = (),
                 record_peak: bool = False):
        super().__init__(exclude)
        self.record_peak = record_peak
        self.peak_composition: list[tuple[int, tuple[int, ...], str]] = []  # (bytes, shape, dtype) at the peak
        self._params = [p for p in params if p.requires_grad]
        self._grads: dict[int, tuple[nn.Parameter, int]] = {}
        self._handles: list = []
        self.grad_bytes = 0
        self.peak_grad_bytes = 0
        self.peak_total_bytes = 0
        self.segments: list[Segment] = []
        self._seg: list[int] | None = None  # [index, base_saved, base_grads, peak_saved, peak_total]

    # -- gradients -----------------------------------------------------------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        if p.grad is None:
            return
        nbytes = p.grad.untyped_storage().nbytes()
        old = self._grads.get(id(p))
        self.grad_bytes += nbytes - (old[1] if old else 0)
        self._grads[id(p)] = (p, nbytes)
        self._observe()

    def _prune(self) -> None:
        """Forget gradients set to None since the last event (``zero_grad(set_to_none=True)`` has no hook)."""
        for key, (p, nbytes) in list(self._grads.items()):
            if p.grad is None:
                self.grad_bytes -= nbytes
                del self._grads[key]

    def _observe(self) -> None:
        self._prune()
        total = self.live_bytes + self.grad_bytes
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.grad_bytes)
        self.peak_total_bytes = max(self.peak_total_bytes, total)
        if self._seg is not None:
            self._seg[3] = max(self._seg[3], self.live_bytes)
            self._seg[4] = max(self._seg[4], total)

    def _grew(self) -> None:
        if self.record_peak and self.live_bytes == self.peak_bytes:  # a new activation peak: what is alive now?
            self.peak_composition = [(e[1], tuple(e[2]), str(e[3]).replace("torch.", "")) for e in self._refs.values()]
        self._observe()

    # -- segments ------------------------------------------------------------------------------------------------
    @property
    def in_segment(self) -> bool:
        return self._seg is not None

    def begin_segment(self, index: int) -> None:
        self._prune()
        total = self.live_bytes + self.grad_bytes
        self._seg = [index, self.live_bytes, self.grad_bytes, self.live_bytes, total]

    def end_segment(self) -> Segment | None:
        if self._seg is None:
            return None
        index, base_saved, base_grads, peak_saved, peak_total = self._seg
        seg = Segment(index, base_saved, base_grads, peak_saved - base_saved, peak_total - base_saved - base_grads)
        self.segments.append(seg)
        self._seg = None
        return seg

    # -- context -------------------------------------------------------------------------------------------------
    def __enter__(self) -> TrainingMemoryMeter:
        for p in self._params:
            if p.grad is not None:  # gradients left over from before the meter started still occupy memory
                self._grads[id(p)] = (p, p.grad.untyped_storage().nbytes())
                self.grad_bytes += self._grads[id(p)][1]
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        super().__enter__()
        self._observe()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
