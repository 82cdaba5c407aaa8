"""Saved-for-backward bytes: a device-independent measure of activation memory (runtime: the training callbacks use it;
``lla.bench.memory`` builds its training meter on it).

A saved-tensor hook sees every tensor the graph keeps for backward. Each storage is counted once (views and tensors
saved by several ops share it) and released when the last saved reference to it is dropped, i.e. when the graph that
held it is freed by backward. Parameters and buffers are excluded: they are weights, not activations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class _Saved:
    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: Tensor, meter: SavedTensorMeter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


def _storage_key(t: Tensor):
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()


class SavedTensorMeter:
    """Context manager tracking live and peak bytes of saved-for-backward tensors.

    >>> with SavedTensorMeter(exclude=model.parameters()) as meter:
    ...     loss = model(x).sum(); loss.backward()
    >>> meter.peak_bytes
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self._exclude = {_storage_key(t)[0] for t in exclude}
        self._refs: dict = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._ctx = None

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _grew(self) -> None:
        """Called after live bytes went up (subclasses track joint peaks here)."""

    def _pack(self, t: Tensor):
        if t.is_sparse or t.layout != torch.strided:
            return t
        key, nbytes = _storage_key(t)
        if key in self._exclude or key[2] == 0:
            return t
        entry = self._refs.get(key)
        if entry is None:
            self._refs[key] = [1, nbytes, t.shape, t.dtype]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self._grew()
        else:
            entry[0] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._refs[key]

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._ctx = None

    @property
    def active(self) -> bool:
        """Whether the saved-tensor hooks are installed (inside ``with meter:``)."""
        return self._ctx is not None
