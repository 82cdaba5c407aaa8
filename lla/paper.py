"""The papers' published numbers beside ours: ``lla-report`` prints them, ``lla-report --check`` tests them.

Each experiment (``experiments/<name>.yaml``) carries a ``published`` list, one entry per table row whose value is
known::

    published:
      - {label: InfoPro*, backbone: resnet101, dataset: imagenet, k: 2, top1_error: 21.85, top5_error: 5.89,
         memory_gb: 12.06, source: "...", memory_source: "...", unverified: true}

``label`` is the row label the run records (conf/row sets it); ``k: null`` matches every K (E2E has none). A value
is ``accuracy`` or ``top1_error`` (in %); ``unverified: true`` marks a row whose values were not read from the
paper itself (a README, a summary of the paper). ``where`` (optional) names config values every run of the row must
have, e.g. ``{trainer.max_epochs: 400}`` or ``{method.head: man}``: it tells apart two papers' numbers for the same
(label, backbone, dataset, K), such as MAN's DGL baseline and InfoPro's. Without ``--paper`` every experiment's list
is searched and the first entry that matches (experiments in file-name order) is shown; ``lla-report --paper
man_cifar`` compares with that one experiment's list only.

A report row is (label, backbone, dataset, K) over seeds. It is *finished* when at least one of its runs completed
(results.json ``status: completed``); only completed runs count, and rows without one are listed as unfinished and
never fail ``--check``. ``--check`` fails (exit 1) when a finished row's mean accuracy is more than ``margin``
points below the paper's.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@dataclass(frozen=True)
class Published:
    """One published table row."""

    experiment: str
    label: str
    backbone: str
    dataset: str
    k: int | None
    accuracy: float | None  # top-1 test accuracy, %
    memory_gb: float | None
    source: str
    unverified: bool
    where: tuple[tuple[str, Any], ...] = ()  # (flattened config key, value) pairs every run of the row must have

    def matches(self, label: str, backbone: str, dataset: str, k: int,
                settings: Iterable[dict[str, Any]] = ()) -> bool:
        """Same row (label, backbone, dataset, K) and, for each run's flattened config in ``settings``, the
        ``where`` values."""
        if (self.label, self.backbone, self.dataset) != (label, backbone, dataset) or self.k not in (None, k):
            return False
        return all(s.get(key) == value for s in settings for key, value in self.where)


@dataclass
class Comparison:
    """One report row beside its published value."""

    label: str
    backbone: str
    dataset: str
    k: int
    ours: list[float]  # accuracy (%) of each completed run
    published: Published | None
    unfinished: int  # runs of this row that did not complete

    @property
    def n(self) -> int:
        return len(self.ours)

    @property
    def finished(self) -> bool:
        return bool(self.ours)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.ours) if self.ours else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.ours) if len(self.ours) > 1 else None

    @property
    def diff(self) -> float | None:
        """Ours minus the paper's, in accuracy points (negative: below the paper)."""
        if self.mean is None or self.published is None or self.published.accuracy is None:
            return None
        return self.mean - self.published.accuracy


# ---------------------------------------------------------------------------------------------------- loading
def _accuracy(entry: dict, where: str) -> float | None:
    if entry.get("accuracy") is not None and entry.get("top1_error") is not None:
        raise ValueError(f"{where}: give accuracy or top1_error, not both")
    if entry.get("accuracy") is not None:
        return float(entry["accuracy"])
    return None if entry.get("top1_error") is None else 100.0 - float(entry["top1_error"])


def load_published(root: str | Path | None = None) -> list[Published]:
    """Every ``published`` entry of the experiments under ``root`` (a folder or one YAML file; default: the
    repository's experiments/)."""
    root = Path(EXPERIMENTS if root is None else root)
    files = [root] if root.is_file() else sorted(root.glob("*.yaml"))
    rows = []
    for path in files:
        for i, entry in enumerate((yaml.safe_load(path.read_text()) or {}).get("published") or []):
            where = f"{path.name}: published[{i}]"
            missing = {"label", "backbone", "dataset", "source"} - set(entry)
            if missing:
                raise ValueError(f"{where}: missing {sorted(missing)}")
            if not isinstance(entry.get("where") or {}, dict):
                raise ValueError(f"{where}: where must map config keys to values")
            rows.append(Published(
                experiment=path.stem, label=str(entry["label"]), backbone=str(entry["backbone"]),
                dataset=str(entry["dataset"]), k=None if entry.get("k") is None else int(entry["k"]),
                accuracy=_accuracy(entry, where),
                memory_gb=None if entry.get("memory_gb") is None else float(entry["memory_gb"]),
                source=str(entry["source"]), unverified=bool(entry.get("unverified", False)),
                where=tuple(sorted((entry.get("where") or {}).items()))))
    return rows


def experiment_file(name: str) -> Path:
    """``--paper NAME``: experiments/NAME.yaml, or NAME itself when it is a YAML file."""
    path = Path(name)
    if path.suffix == ".yaml" and path.is_file():
        return path
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        from lla.errors import ConfigError

        raise ConfigError("--paper", f"no experiment {name!r}",
                          ", ".join(sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))))
    return path


# ---------------------------------------------------------------------------------------------------- matching
def compare(runs: Iterable[Any], published: Sequence[Published], metric: str = "best") -> list[Comparison]:
    """Report rows (label, backbone, dataset, K; ``runs`` are ``lla.report.Run``) with their published values.

    A run counts when lla-report holds it complete (``Run.incomplete`` is None: status completed, or no status in a
    results.json from before it existed, and not a one-batch debug run)."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for run in runs:
        groups[(run.base_label, run.backbone, run.dataset, run.k)].append(run)
    out = []
    for (label, backbone, dataset, k), group in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        done = [r for r in group if getattr(r, "incomplete", None) is None and r.acc(metric) is not None]
        settings = [getattr(r, "setting", None) or {} for r in group]
        match = next((p for p in published if p.matches(label, backbone, dataset, k, settings)), None)
        out.append(Comparison(label, backbone, dataset, k, [100.0 * r.acc(metric) for r in done], match,
                              len(group) - len(done)))
    return out


def failures(rows: Sequence[Comparison], margin: float) -> list[Comparison]:
    """Finished rows more than ``margin`` accuracy points below their published value."""
    return [r for r in rows if r.finished and r.diff is not None and r.diff < -margin]


# ---------------------------------------------------------------------------------------------------- output
def _num(x: float | None, error: bool) -> str:
    return "" if x is None else f"{100.0 - x if error else x:.2f}"


def markdown(rows: Sequence[Comparison], error: bool = False) -> str:
    """One line per row: ours (mean ± std), paper, ours - paper, seeds; error rates when ``error``."""
    what = "top-1 error" if error else "top-1 accuracy"
    lines = [f"### Published results beside ours ({what}, %; diff = ours - paper)", "",
             "| row | backbone | dataset | K | ours | paper | diff | seeds | paper source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = _num(r.mean, error) + (f" ± {r.std:.2f}" if r.std is not None else "")
        if not r.finished:
            ours = "unfinished"
        elif r.unfinished:
            ours += f" (+{r.unfinished} unfinished)"
        p = r.published
        paper = "" if p is None or p.accuracy is None else _num(p.accuracy, error)
        diff = "" if r.diff is None else f"{-r.diff if error else r.diff:+.2f}"
        source = "" if p is None else p.source + (" (unverified)" if p.unverified else "")
        lines.append(f"| {r.label} | {r.backbone} | {r.dataset} | {r.k} | {ours} | {paper} | {diff} | {r.n} | "
                     f"{source} |")
    return "\n".join(lines) + "\n"


def report_and_check(runs: Sequence[Any], *, metric: str = "best", error: bool = False, check: bool = False,
                     margin: float = 1.0, out: str | Path | None = None,
                     experiments: str | Path | None = None) -> int:
    """Print every row beside its published value, if any (and write ``paper.md`` into ``out``); with ``check``,
    return 1 when a finished row is more than ``margin`` points below the paper, else 0."""
    rows = compare(runs, load_published(EXPERIMENTS if experiments is None else experiments), metric)
    text = markdown(rows, error)
    if check or experiments is not None or any(r.published is not None for r in rows):
        print(text)
    else:  # e.g. digits runs: a table of empty paper columns says nothing
        print("lla-report: no published value matches these rows (experiments/*.yaml, `published:`)")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "paper.md").write_text(text)
    if not check:
        return 0
    bad = failures(rows, margin)
    for r in bad:
        print(f"lla-report --check: {r.label} {r.backbone} {r.dataset} K={r.k}: {r.mean:.2f} is {-r.diff:.2f} points "
              f"below the paper's {r.published.accuracy:.2f} (margin {margin:g})")
    finished = sum(r.finished and r.diff is not None for r in rows)
    print(f"lla-report --check: {len(bad)} of {finished} finished rows with a published value fall more than "
          f"{margin:g} points below it")
    return 1 if bad else 0
