"""Checks that turn missing or broken dataset files into one-line ConfigErrors before any training starts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from torchvision.datasets.utils import calculate_md5

from lla.errors import ConfigError


def missing(what: str, root: Path, expected: str, how: str) -> ConfigError:
    """Data not found: say where we looked, what we expected there, and how to get it."""
    return ConfigError(
        "dataset.root",
        f"{what} not found: expected {expected} under {root.resolve()}; {how}",
        "a folder that holds the files (set dataset.root or $LLA_DATA)",
    )


def corrupt(
    path: Path | str, reason: str, fix: str = "delete it and fetch it again (dataset.download=true)"
) -> ConfigError:
    """A file that exists but cannot be what it should be: name it."""
    return ConfigError("dataset.root", f"{path} is truncated or corrupt ({reason}); {fix}")


def require_files(what: str, root: Path, folder: Path, names: Iterable[str], how: str) -> list[Path]:
    """The paths of `names` inside `folder`, or a `missing` error naming the first absent one."""
    paths = [folder / n for n in names]
    if not folder.is_dir():
        raise missing(what, root, f"{folder.relative_to(root)}/", how)
    for p in paths:
        if not p.is_file():
            raise missing(what, root, str(p.relative_to(root)), how)
        if p.stat().st_size == 0:
            raise corrupt(p, "empty file")
    return paths


def check_md5(paths: Iterable[Path], known: dict[str, str]) -> None:
    """Compare files against torchvision's published md5s (opt-in: it reads every byte, ~1 s per GB)."""
    for p in paths:
        if p.name in known and calculate_md5(p) != known[p.name]:
            raise corrupt(p, f"md5 differs from the published {known[p.name]}")


def fetch(what: str, url: str, run: Callable[[], object]) -> None:
    """Run a torchvision download; turn a network failure into a one-line error that says what to do by hand."""
    try:
        run()
    # URLError is an OSError; torchvision raises RuntimeError on a bad md5
    except (OSError, RuntimeError) as err:
        raise ConfigError(
            "dataset.download",
            f"could not download {what} from {url} ({err}); fetch it by hand and point dataset.root at it",
        ) from err
