"""The interface of a local rule: an aux net plus its loss on one feature map (lla.aux.rules builds them)."""

from __future__ import annotations

from torch import Tensor, nn


class LocalRule(nn.Module):
    """``forward(h, y, x01) -> loss``; ``x01`` (the [0,1] image) is passed only when ``needs_x01``."""

    needs_x01: bool = False

    def forward(self, h: Tensor, y: Tensor, x01: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError
