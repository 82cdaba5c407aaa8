"""Tiny datasets in the real on-disk formats, for tests that must go through the real loading code.

The writers live in `lla.data.fake` (the loader benchmark uses them too); this module re-exports them and adds the
ways tests break files.
"""

from __future__ import annotations

from pathlib import Path

from lla.data.fake import write_cifar10, write_imagefolder, write_stl10, write_svhn

__all__ = ["truncate", "write_cifar10", "write_imagefolder", "write_stl10", "write_svhn"]


def truncate(path: str | Path, keep: float | int = 0.5) -> Path:
    """Cut a file short: keep a fraction (float) of its bytes, or drop `-keep` bytes from its end (negative int)."""
    path = Path(path)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else len(data) + keep
    path.write_bytes(data[:n])
    return path
