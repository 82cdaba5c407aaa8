"""``lla-report <dirs...>``: results.json files -> paper-style tables (Markdown, CSV) and PNG plots.

Tables: one per backbone (split further when asked); rows = methods, columns = datasets, K, or both; each cell is
the mean ± sample std over seeds of the best-epoch test accuracy (what every reference script reports,
docs/recipes.md#test-as-validation; ``--metric final`` for the last epoch, ``--error`` for test error as the papers print it). Runs that differ
in anything but the seed (say ``trainer.max_epochs`` or ``method.ema_momentum``) never share a cell: their row label
names the differing keys. E2E (one module) has no K, so its value appears under every K of its dataset. Under each
table, the same cells' peak memory (MB, mean over seeds; CUDA peaks when every run has one, else saved activations).

Plots: accuracy vs K per method, accuracy vs peak memory (CUDA ``max_memory_allocated`` when every run has it,
otherwise lla's device-independent peak of saved activations), accuracy vs EMA momentum (MAN / MLAAN runs).

Only results.json is read, never W&B: a report works offline and after W&B runs are deleted.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lla.naming import is_non_experiment, method_label

#: keys that never make two runs different settings: lla.naming's list (paths, logging, checkpoint cadence: the keys
#: run-folder names leave out too), plus the seed that the mean runs over and the mode (always train in results.json)
REPORT_ONLY_KEYS = ("seed", "dataset.seed", "mode")


def ignored_key(key: str) -> bool:
    return is_non_experiment(key, REPORT_ONLY_KEYS)


DATASET_ORDER = ("cifar10", "svhn", "stl10", "imagenet")
DATASET_NAMES = {"cifar10": "CIFAR-10", "svhn": "SVHN", "stl10": "STL-10", "imagenet": "ImageNet"}
METHOD_ORDER = ("e2e", "dgl", "infopro", "auglocal", "man", "mlaan", "hpff")


@dataclass
class Run:
    """One results.json, reduced to what the tables and plots need."""

    path: Path
    method: str
    base_label: str
    dataset: str
    backbone: str
    k: int
    modules: int
    seed: int
    acc_best: float | None
    acc_final: float | None
    peak_activation_mb: float | None
    peak_cuda_mb: float | None
    train_time_s: float | None
    ema_momentum: float | None
    setting: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    label_order: tuple = ()  # sorts rows of one base label by their values (0.9 before 0.99), not as text
    status: str = "completed"
    incomplete: str | None = None  # why the run is not a result (preempted, diverged, a one-batch debug run, ...)

    def acc(self, metric: str) -> float | None:
        return self.acc_best if metric == "best" else self.acc_final


# ---------------------------------------------------------------------------------------------------- loading
def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every results.json under the given folders (or the files themselves), each once, in a stable order."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            found.add(p.resolve())
        elif p.is_dir():
            found.update(f.resolve() for f in p.rglob("results.json"))
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return sorted(found)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples so they can be compared and hashed."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


def derived_label(method: str, method_cfg: dict) -> str:
    """``dgl+man`` for a plug-in on a base rule, else the method's name (what a bare ``method=`` run shows)."""
    return method_label(method, method_cfg)


def incomplete_reason(result: dict) -> str | None:
    """Why a results.json is not a result to report: its status (preempted, interrupted, diverged, failed) with the
    error, a one-batch debug run (``trainer.fast_dev_run``), or no accuracy; None for a finished run."""
    status = result.get("status") or "completed"  # results.json before statuses existed: finished runs only
    if status not in ("completed", "finished"):
        error = result.get("error")
        return f"{status}: {error}" if error else status
    trainer = (result.get("config") or {}).get("trainer") or {}
    if trainer.get("fast_dev_run"):
        return "debug run (trainer.fast_dev_run: one batch)"
    if result.get("val_acc_best") is None and result.get("val_acc") is None:
        return "no accuracy recorded"
    return None


def _float(x: Any) -> float | None:
    try:
        return None if x is None or not math.isfinite(float(x)) else float(x)
    except (TypeError, ValueError):
        return None


def load_run(path: Path) -> Run:
    r = json.loads(Path(path).read_text())
    reason = incomplete_reason(r)
    try:
        run = _load_run(path, r)
    except (TypeError, ValueError):  # a job that failed before training wrote little
        if reason is None:
            raise
        run = Run(Path(path), str(r.get("method") or "?"), str(r.get("method") or "?"), str(r.get("dataset") or "?"),
                  str(r.get("backbone") or "?"), 0, 0, 0, None, None, None, None, None, None)
    run.status, run.incomplete = str(r.get("status") or "completed"), reason
    return run


def _load_run(path: Path, r: dict) -> Run:
    cfg = r.get("config") or {}
    method_cfg = cfg.get("method") or {}
    method = r.get("method") or str(method_cfg.get("_target_", "?")).rsplit(".", 1)[-1].lower()
    setting = {k: v for k, v in flatten(cfg).items() if not ignored_key(k)}
    return Run(
        path=Path(path),
        method=method,
        base_label=cfg.get("label") or derived_label(method, method_cfg),
        dataset=r.get("dataset") or "?",
        backbone=r.get("backbone") or (cfg.get("backbone") or {}).get("name", "?"),
        k=int(r.get("k_label") if r.get("k_label") is not None else cfg.get("k", 1)),
        modules=int(r.get("modules") or 1),
        seed=int(r.get("seed", cfg.get("seed", 0))),
        acc_best=_float(r.get("val_acc_best")),
        acc_final=_float(r.get("val_acc")),
        peak_activation_mb=_float(r.get("peak_activation_mb")),
        peak_cuda_mb=_float(r.get("peak_cuda_mb")),
        train_time_s=_float(r.get("train_time_s")),
        ema_momentum=_float(method_cfg.get("ema_momentum")),
        setting=setting,
    )


def load_runs(paths: Iterable[str | Path], include_incomplete: bool = False) -> list[Run]:
    """The runs to report: finished ones (every run with ``include_incomplete``); see :func:`load_all`."""
    complete, incomplete = load_all(paths)
    runs = complete + incomplete if include_incomplete else complete
    assign_labels(runs)
    return runs


def load_all(paths: Iterable[str | Path]) -> tuple[list[Run], list[Run]]:
    """(finished runs, the others: preempted, interrupted, diverged, failed, one-batch debug runs)."""
    runs = [load_run(p) for p in find_results(paths)]
    return [r for r in runs if r.incomplete is None], [r for r in runs if r.incomplete is not None]


# ---------------------------------------------------------------------------------------------------- labels
def _short(key: str) -> str:
    return key.removeprefix("method.")


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sortable(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def varying_keys(runs: Sequence[Run], exclude: Iterable[str] = ()) -> list[str]:
    """Setting keys that differ between runs of the same label and cell: they must show in the row label."""
    skip = set(exclude)
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        cells[(r.base_label, r.backbone, r.dataset, r.k)].append(r)
    keys: set[str] = set()
    for group in cells.values():
        for key in set().union(*(r.setting for r in group)) - skip:
            if len({repr(r.setting.get(key)) for r in group}) > 1:
                keys.add(key)
    return sorted(keys)


def assign_labels(runs: Sequence[Run], exclude: Iterable[str] = ()) -> None:
    """Row label = the base label plus ``[key=value, ...]`` for the keys that separate its runs (per base label)."""
    by_label: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_label[r.base_label].append(r)
    for base, group in by_label.items():
        keys = varying_keys(group, exclude)
        for r in group:
            extra = ", ".join(f"{_short(k)}={_fmt_value(r.setting.get(k))}" for k in keys)
            r.label = f"{base} [{extra}]" if extra else base
            r.label_order = (base, tuple(_sortable(r.setting.get(k)) for k in keys))


# ---------------------------------------------------------------------------------------------------- tables
def nice_dataset(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def nice_backbone(name: str) -> str:
    if m := re.fullmatch(r"resnet(\d+)", name):
        return f"ResNet-{m[1]}"
    if m := re.fullmatch(r"resnext(\d+)_(\w+)", name):
        return f"ResNeXt-{m[1]} {m[2]}"
    if m := re.fullmatch(r"vgg(\d+)", name):
        return f"VGG-{m[1]}"
    return name


def _dataset_key(name: str) -> tuple:
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def _method_key(run: Run) -> tuple:
    return (METHOD_ORDER.index(run.method) if run.method in METHOD_ORDER else len(METHOD_ORDER), run.label_order,
            run.label)


@dataclass
class Cell:
    values: list[float]
    runs: list[Run]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def memory_mb(self) -> float | None:
        cuda = [r.peak_cuda_mb for r in self.runs]
        vals = cuda if all(v is not None for v in cuda) else [r.peak_activation_mb for r in self.runs]
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    def time_s(self) -> float | None:
        vals = [r.train_time_s for r in self.runs if r.train_time_s is not None]
        return statistics.fmean(vals) if vals else None


@dataclass
class Table:
    title: str
    rows: list[str]
    columns: list[tuple[str, int]]  # (dataset, K)
    column_names: list[str]
    cells: dict[tuple[str, tuple[str, int]], Cell]
    key: str


def column_mode(runs: Sequence[Run], columns: str) -> str:
    """auto: K when the table has one dataset, datasets when it has one K, else both."""
    if columns != "auto":
        return columns
    local = [r for r in runs if r.modules > 1] or list(runs)
    if len({r.dataset for r in local}) == 1:
        return "k"
    if len({r.k for r in local}) == 1:
        return "dataset"
    return "both"


def build_tables(runs: Sequence[Run], metric: str = "best", error: bool = False, columns: str = "auto") -> list[Table]:
    """Group runs into tables (one per backbone; per K / per dataset when the columns say so) and cells."""
    tables = []
    for backbone in sorted({r.backbone for r in runs}):
        group = [r for r in runs if r.backbone == backbone]
        mode = column_mode(group, columns)
        if mode == "dataset":  # a table per K (E2E goes with every one)
            ks = sorted({r.k for r in group if r.modules > 1}) or sorted({r.k for r in group})
            splits = [(f"K={k}", [r for r in group if r.k == k or r.modules == 1]) for k in ks]
        elif mode == "k":  # a table per dataset
            splits = [(nice_dataset(d), [r for r in group if r.dataset == d])
                      for d in sorted({r.dataset for r in group}, key=_dataset_key)]
        else:
            splits = [("", group)]
        for suffix, subset in splits:
            tables.append(_table(backbone, suffix, subset, mode, metric, error, len(splits) > 1))
    return tables


def _table(backbone: str, suffix: str, runs: Sequence[Run], mode: str, metric: str, error: bool,
           split: bool) -> Table:
    ks_by_dataset: dict[str, set[int]] = defaultdict(set)
    for r in runs:
        if r.modules > 1:
            ks_by_dataset[r.dataset].add(r.k)
    cells: dict[tuple[str, tuple[str, int]], Cell] = {}
    for r in sorted(runs, key=lambda r: (r.seed, str(r.path))):
        # E2E has no K: its value stands under every K of its dataset (its own K if the table has no other)
        targets = sorted(ks_by_dataset.get(r.dataset) or {r.k}) if r.modules == 1 else [r.k]
        if mode == "dataset":
            targets = [t for t in targets if f"K={t}" == suffix] or targets[:1]
        value = r.acc(metric)
        for k in targets:
            cell = cells.setdefault((r.label, (r.dataset, k)), Cell([], []))
            cell.runs.append(r)
            if value is not None:
                cell.values.append(100.0 * (1.0 - value) if error else 100.0 * value)
    cols = sorted({c for _, c in cells}, key=lambda c: (_dataset_key(c[0]), c[1]))
    if mode == "dataset":
        names = [nice_dataset(d) for d, _ in cols]
    elif mode == "k":
        names = [f"K={k}" for _, k in cols]
    else:
        names = [f"{nice_dataset(d)} K={k}" for d, k in cols]
    order = sorted({r.label: r for r in runs}.values(), key=_method_key)
    what = ("test error" if error else "test accuracy") + (" (best epoch)" if metric == "best" else " (last epoch)")
    title = f"{nice_backbone(backbone)}{', ' + suffix if suffix else ''}: {what}, %, mean ± std over seeds"
    key = "_".join(p for p in (backbone, re.sub(r"[^A-Za-z0-9]+", "", suffix).lower()) if p) if split else backbone
    return Table(title, [r.label for r in order], cols, names, cells, key)


def format_cell(cell: Cell | None) -> str:
    if cell is None:
        return ""
    if cell.mean is None:
        return "n/a"
    text = f"{cell.mean:.2f}"
    if cell.std is not None:
        text += f" ± {cell.std:.2f}"
    if cell.n > 1:
        text += f" (n={cell.n})"
    return text


def table_rows(table: Table) -> list[list[str]]:
    return [[row] + [format_cell(table.cells.get((row, c))) for c in table.columns] for row in table.rows]


def memory_kind(runs: Sequence[Run]) -> tuple[str, Callable[[Run], float | None]]:
    """One memory figure for a set of runs that are compared: CUDA ``max_memory_allocated`` when every run has it,
    else lla's device-independent peak of saved activations for all. Returns (its name, a getter)."""
    if runs and all(r.peak_cuda_mb is not None for r in runs):
        return "peak CUDA memory (max_memory_allocated)", lambda r: r.peak_cuda_mb
    return "peak saved activations", lambda r: r.peak_activation_mb


def memory_rows(table: Table) -> tuple[str, list[list[str]]] | None:
    """The table's peak memory per cell, MB, mean over seeds (:func:`memory_kind`, one kind per table); None when no
    run has either figure."""
    what, mem = memory_kind([r for cell in table.cells.values() for r in cell.runs])

    def value(cell: Cell | None) -> str:
        vals = [] if cell is None else [v for r in cell.runs if (v := mem(r)) is not None]
        return f"{statistics.fmean(vals):.1f}" if vals else ""

    rows = [[row] + [value(table.cells.get((row, c))) for c in table.columns] for row in table.rows]
    return (what, rows) if any(v for row in rows for v in row[1:]) else None


def markdown(tables: Sequence[Table]) -> str:
    """Each accuracy table, then the same rows and columns with the runs' peak memory (when the runs recorded it)."""
    parts = []
    for t in tables:
        head = ["method", *t.column_names]
        lines = [f"### {t.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(t)]
        if (memory := memory_rows(t)) is not None:
            what, rows = memory
            lines += ["", f"#### {t.title.split(':')[0]}: {what}, MB, mean over seeds", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_csv(path: Path, table: Table) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *table.column_names])
        w.writerows(table_rows(table))


def write_summary_csv(path: Path, tables: Sequence[Table]) -> None:
    """One line per cell with the numbers (for spreadsheets): mean, std, n, memory, time."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "method", "dataset", "k", "modules", "mean", "std", "n", "memory_mb", "train_time_s"])
        for t in tables:  # in the table's order: rows numerically (0.9, 0.99, 0.995), columns by dataset and K
            for row in t.rows:
                for dataset, k in t.columns:
                    if (cell := t.cells.get((row, (dataset, k)))) is None:
                        continue
                    w.writerow([t.key, row, dataset, k, cell.runs[0].modules, cell.mean, cell.std, cell.n,
                               cell.memory_mb(), cell.time_s()])


# ---------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(runs: Sequence[Run]) -> list[tuple[str, str]]:
    return sorted({(r.backbone, r.dataset) for r in runs}, key=lambda p: (p[0], _dataset_key(p[1])))


def _mean_by(runs: Iterable[Run], key, metric: str, error: bool) -> dict:
    """{key(run): (mean, std)} of the accuracy (%) over seeds."""
    groups: dict = defaultdict(list)
    for r in runs:
        if (v := r.acc(metric)) is not None:
            groups[key(r)].append(100.0 * (1.0 - v) if error else 100.0 * v)
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in groups.items()}


def _figure(n: int):
    plt = _plt()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value_ticks(ax, values: list, log: bool = False, logit: bool = False) -> None:
    """Ticks at the swept values, labelled as plain numbers (2, 4, 8 / 0.99, 0.999), on a log or logit axis."""
    from matplotlib.ticker import NullFormatter, NullLocator

    if log:
        ax.set_xscale("log", base=2)
    elif logit:
        ax.set_xscale("logit")
    if values:
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(values, [f"{v:g}" for v in values])


def plot_acc_vs_k(runs: Sequence[Run], path: Path, metric: str = "best", error: bool = False) -> Path | None:
    """One panel per (backbone, dataset): a line per method over K; E2E as a dashed reference line."""
    panels = _panels(runs)
    lines = defaultdict(set)  # a line per (panel, label) over K
    for r in runs:
        if r.modules > 1 and r.acc(metric) is not None:
            lines[(r.backbone, r.dataset, r.label)].add(r.k)
    if not panels or max((len(ks) for ks in lines.values()), default=0) < 2:
        return None  # one point per line (a single K): nothing to plot against K
    plt, fig, axes = _figure(len(panels))
    ylabel = "test error %" if error else "test accuracy %"
    for ax, (backbone, dataset) in zip(axes, panels):
        sub = [r for r in runs if (r.backbone, r.dataset) == (backbone, dataset)]
        for label in dict.fromkeys(r.label for r in sorted(sub, key=_method_key)):
            pts = _mean_by([r for r in sub if r.label == label], lambda r: r.k, metric, error)
            if not pts:
                continue
            if all(r.modules == 1 for r in sub if r.label == label):
                mean = statistics.fmean(m for m, _ in pts.values())
                ax.axhline(mean, ls="--", color="black", lw=1, label=label)
                continue
            ks = sorted(pts)
            ax.errorbar(ks, [pts[k][0] for k in ks], yerr=[pts[k][1] for k in ks], marker="o", capsize=3,
                        label=label)
        _value_ticks(ax, sorted({r.k for r in sub if r.modules > 1}), log=True)
        ax.set_title(f"{nice_backbone(backbone)}, {nice_dataset(dataset)}", fontsize=9)
        ax.set_xlabel("K (nominal)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_acc_vs_memory(runs: Sequence[Run], path: Path, metric: str = "best", error: bool = False) -> Path | None:
    """Accuracy vs peak memory, one point per (method, K), one panel per (backbone, dataset)."""
    what, mem = memory_kind(runs)
    runs = [r for r in runs if mem(r) is not None and r.acc(metric) is not None]
    panels = _panels(runs)
    if not panels or len({(r.label, r.backbone, r.dataset, r.k) for r in runs}) < 2:
        return None  # a single point compares nothing
    plt, fig, axes = _figure(len(panels))
    for ax, (backbone, dataset) in zip(axes, panels):
        sub = [r for r in runs if (r.backbone, r.dataset) == (backbone, dataset)]
        for label in dict.fromkeys(r.label for r in sorted(sub, key=_method_key)):
            mine = [r for r in sub if r.label == label]
            pts = _mean_by(mine, lambda r: r.k, metric, error)
            ks = sorted(pts)
            xs = [statistics.fmean(mem(r) for r in mine if r.k == k) for k in ks]
            ax.scatter(xs, [pts[k][0] for k in ks], label=label)
            for x, k in zip(xs, ks):
                ax.annotate(f"K={k}", (x, pts[k][0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{nice_backbone(backbone)}, {nice_dataset(dataset)}", fontsize=9)
        ax.set_xlabel(f"{what.split(' (')[0]} MB")
        ax.set_ylabel("test error %" if error else "test accuracy %")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_acc_vs_ema(runs: Sequence[Run], path: Path, metric: str = "best", error: bool = False) -> Path | None:
    """Accuracy vs method.ema_momentum, a line per (method, backbone, dataset, K); None unless m was swept."""
    runs = [replace(r) for r in runs if r.ema_momentum is not None]  # copies: relabelled below
    if len({r.ema_momentum for r in runs}) < 2:  # nothing swept: no curve to draw
        return None
    assign_labels(runs, exclude=["method.ema_momentum"])  # the x axis must not split the lines
    points = defaultdict(set)
    for r in runs:
        if r.acc(metric) is not None:
            points[(r.label, r.backbone, r.dataset, r.k)].add(r.ema_momentum)
    if max((len(ms) for ms in points.values()), default=0) < 2:
        return None  # one point per line
    plt, fig, axes = _figure(1)
    ax = axes[0]
    for line in dict.fromkeys((r.label, r.backbone, r.dataset, r.k) for r in sorted(runs, key=_method_key)):
        pts = _mean_by([r for r in runs if (r.label, r.backbone, r.dataset, r.k) == line], lambda r: r.ema_momentum,
                       metric, error)
        ms = sorted(pts)
        ax.errorbar(ms, [pts[m][0] for m in ms], yerr=[pts[m][1] for m in ms], marker="o", capsize=3,
                    label=f"{line[0]}, {nice_backbone(line[1])} K={line[3]}, {nice_dataset(line[2])}")
    # logit spreads 0.99 / 0.995 / 0.999 apart
    _value_ticks(ax, sorted({r.ema_momentum for r in runs}), logit=all(0.0 < r.ema_momentum < 1.0 for r in runs))
    ax.set_xlabel("EMA momentum m")
    ax.set_ylabel("test error %" if error else "test accuracy %")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------------- command
def incomplete_markdown(runs: Sequence[Run]) -> str:
    """The runs left out of the tables, one line each: folder, status and reason."""
    if not runs:
        return ""
    lines = ["### Incomplete runs (not in the tables; `--all` includes them)", ""]
    lines += [f"- `{r.path.parent}`: {r.incomplete}" for r in sorted(runs, key=lambda r: str(r.path))]
    return "\n".join(lines) + "\n"


def report(paths: Sequence[str | Path], out: str | Path = "report", metric: str = "best", error: bool = False,
           columns: str = "auto", plots: bool = True, include_incomplete: bool = False) -> dict[str, Any]:
    """Write tables.md, one CSV per table, summary.csv and the plots into ``out``; return what was written.

    Only finished runs are results; the others (preempted, interrupted, diverged, failed, one-batch debug runs) are
    listed under "Incomplete runs" instead, unless ``include_incomplete``."""
    complete, incomplete = load_all(paths)
    runs = complete + incomplete if include_incomplete else complete
    left_out = [] if include_incomplete else incomplete
    if not runs and not left_out:
        raise SystemExit(f"lla-report: no results.json under {', '.join(map(str, paths))}")
    assign_labels(runs)
    runs = [r for r in runs if r.acc(metric) is not None or not include_incomplete]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs, metric, error, columns) if runs else []
    text = markdown(tables) if tables else "No finished runs.\n"
    if left_out:
        text += "\n" + incomplete_markdown(left_out)
    (out / "tables.md").write_text(text)
    files = [out / "tables.md", out / "summary.csv"]
    for t in tables:
        write_csv(out / f"table_{t.key}.csv", t)
        files.append(out / f"table_{t.key}.csv")
    write_summary_csv(out / "summary.csv", tables)
    if plots and runs:
        for fn, name in ((plot_acc_vs_k, "acc_vs_k.png"), (plot_acc_vs_memory, "acc_vs_memory.png"),
                         (plot_acc_vs_ema, "acc_vs_ema_momentum.png")):
            if (written := fn(runs, out / name, metric, error)) is not None:
                files.append(written)
    return {"runs": len(runs), "incomplete": left_out, "tables": tables, "markdown": text, "files": files}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lla-report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="multirun/run folders (searched recursively) or results.json files")
    ap.add_argument("--out", default="report", help="output folder (default: ./report)")
    ap.add_argument("--metric", choices=("best", "final"), default="best",
                    help="best-epoch accuracy (the papers' protocol, docs/recipes.md#test-as-validation) or the last epoch's")
    ap.add_argument("--error", action="store_true", help="report test error (100 - accuracy) as the papers do")
    ap.add_argument("--columns", choices=("auto", "dataset", "k", "both"), default="auto",
                    help="table columns: datasets, K, or dataset x K (auto picks from the data)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--all", action="store_true",
                    help="also put unfinished runs (preempted, interrupted, diverged, debug) in the tables")
    ap.add_argument("--check", action="store_true", help="exit 1 if a finished row is > --margin below the paper")
    ap.add_argument("--margin", type=float, default=1.0, help="accuracy points --check allows below the paper")
    ap.add_argument("--paper", metavar="EXPERIMENT",
                    help="compare with this experiment's published list only (e.g. man_cifar; default: all)")
    args = ap.parse_args(argv)
    from lla.paper import experiment_file, report_and_check  # the papers' numbers beside ours

    try:
        paper = None if args.paper is None else experiment_file(args.paper)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    result = report(args.dirs, args.out, args.metric, args.error, args.columns, not args.no_plots, args.all)
    print(result["markdown"])
    extra = f" ({len(result['incomplete'])} incomplete, listed apart)" if result["incomplete"] else ""
    print(f"lla-report: {result['runs']} runs{extra} -> " + ", ".join(str(f) for f in result["files"]))
    if report_and_check(load_runs(args.dirs, include_incomplete=True), metric=args.metric, error=args.error, check=args.check,
                        margin=args.margin, out=args.out, experiments=paper):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
