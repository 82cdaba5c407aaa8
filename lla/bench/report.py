"""Turn measured rows into the benchmark's outputs: ratios to E2E, reference comparisons, checks, JSON, Markdown, PNG.

The JSON schema is a contract (``SCHEMA``, ``ROW_KEYS``; tests pin it): every row carries every key, with None where
a figure does not apply (CUDA peaks on a CPU run, a target the references never measured).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lla.bench.accounting import mib, ratio
from lla.bench.targets import GOAL, TARGETS, compare, find_target

SCHEMA = "lla-bench/1"
LOWER_BOUND_SLACK = 1.15  # issue 7: every method's measured peak <= 1.15x its lower bound
MAN_IMAGENET_LIMIT = 0.55  # issue 7: ImageNet ResNet-101 K=2 MAN peak total <= 0.55x E2E
GRAD_SLACK = 1.15  # gradients freed module by module: peak ~ the largest module's (its span's, for a cascade)

MEASURED_KEYS = (
    "method", "base", "options", "backbone", "k", "modules", "boundaries", "batch_size", "image_size",
    "num_classes", "precision", "channels_last", "device", "threads",
    "param_bytes", "optimizer_state_bytes", "peak_activation_bytes", "peak_grad_bytes",
    "largest_span_grad_bytes", "peak_total_bytes", "largest_module_activation_bytes", "lower_bound_bytes",
    "carried_activation_bytes", "carried_grad_bytes", "segments",
    "cuda_max_allocated_bytes", "cuda_max_reserved_bytes", "step_time_s", "images_per_s", "timed_steps",
    "warmup_steps",
)
RATIO_KEYS = (
    "activation_vs_e2e", "total_vs_e2e", "cuda_allocated_vs_e2e", "time_vs_e2e", "total_vs_lower_bound",
    "grad_peak_vs_largest_span",
)
TARGET_KEYS = (  # lla.bench.targets.compare
    "target", "target_activation_mib", "target_step_time_s", "target_activation_vs_e2e",
    "activation_vs_target", "time_vs_target", "activation_ok", "activation_goal", "time_ok", "time_goal",
)
ROW_KEYS = MEASURED_KEYS + RATIO_KEYS + TARGET_KEYS


def _net_options(row: dict) -> tuple:
    """Options outside the method (dotted, e.g. backbone.fused_bn_relu): they change E2E too, so they get their own
    group with its own E2E row."""
    return tuple(sorted((k, v) for k, v in (row.get("options") or {}).items() if "." in k))


def _group(row: dict) -> tuple:
    return (row["backbone"], row["batch_size"], row["image_size"], row["precision"], row["channels_last"],
            row["device"], _net_options(row))


def derive(rows: Sequence[dict]) -> list[dict]:
    """Add ratios to the E2E row of the same group, to the lower bound and to the reference targets."""
    e2e = {_group(r): r for r in rows if r["method"] == "e2e"}
    out = []
    for row in rows:
        row = dict(row)
        get = e2e[_group(row)].get if _group(row) in e2e else dict().get
        row["activation_vs_e2e"] = ratio(row["peak_activation_bytes"], get("peak_activation_bytes"))
        row["total_vs_e2e"] = ratio(row["peak_total_bytes"], get("peak_total_bytes"))
        row["cuda_allocated_vs_e2e"] = ratio(row["cuda_max_allocated_bytes"], get("cuda_max_allocated_bytes"))
        row["time_vs_e2e"] = ratio(row["step_time_s"], get("step_time_s"))
        row["total_vs_lower_bound"] = ratio(row["peak_total_bytes"], row["lower_bound_bytes"])
        row["grad_peak_vs_largest_span"] = ratio(row["peak_grad_bytes"], row["largest_span_grad_bytes"])
        target = find_target(row)
        row.update(compare(row, target) if target else dict.fromkeys(TARGET_KEYS))
        out.append({k: row.get(k) for k in ROW_KEYS})
    return out


def checks(rows: Sequence[dict]) -> list[dict]:
    """The issue's pass/fail criteria, one entry per (criterion, row)."""
    out = []

    def add(name, row, value, limit, note="", passed=None):
        if passed is None and value is not None:
            passed = value <= limit
        out.append({"check": name, "row": label(row), "value": value, "limit": limit, "passed": passed,
                    "note": note})

    for row in rows:
        add("peak total <= 1.15x lower bound", row, row["total_vs_lower_bound"], LOWER_BOUND_SLACK)
        if row["modules"] > 1:
            add("no graph carried into the next module (MiB alive at a module's start)", row,
                mib(row["carried_activation_bytes"]), 0.0)
            add("peak gradients <= 1.15x one loss's modules' (freed module by module)", row,
                row["grad_peak_vs_largest_span"], GRAD_SLACK)
        if (row["method"], row["backbone"], row["modules"]) == ("man", "resnet101", 2):
            e2e = next((r for r in rows if r["method"] == "e2e" and _group(r) == _group(row)), None)
            note = (f"activations alone {_x(row['activation_vs_e2e'], 2)}x; at batch {row['batch_size']} the "
                    "weights, optimizer state and gradients do not shrink with the batch")
            if e2e is not None:
                at = ratio(extrapolate_total(row, 128), extrapolate_total(e2e, 128))
                note += f"; linear extrapolation to MAN's batch 128: {_x(at, 2)}x"
            add("ImageNet R101 K=2 MAN peak total <= 0.55x E2E", row, row["total_vs_e2e"], MAN_IMAGENET_LIMIT, note)
            if row["cuda_allocated_vs_e2e"] is not None:
                add("ImageNet R101 K=2 MAN CUDA max allocated <= 0.55x E2E", row, row["cuda_allocated_vs_e2e"],
                    MAN_IMAGENET_LIMIT)
        if row["target"]:
            add(f"activation <= 1.0x reference ({row['target']})", row, row["activation_vs_target"], 1.0,
                "compared at the reference's 0.1 MiB precision", passed=row["activation_ok"])
            if row["time_vs_target"] is not None:
                add(f"step / E2E <= 1.0x the reference's step / E2E ({row['target']})", row, row["time_vs_target"], 1.0,
                    passed=row["time_ok"])
    return out


def extrapolate_total(row: dict, batch_size: int) -> float:
    """Peak total at another batch size, assuming activations scale linearly and gradients peak alongside them."""
    scale = batch_size / row["batch_size"]
    return (row["param_bytes"] + row["optimizer_state_bytes"] + row["peak_grad_bytes"]
            + row["peak_activation_bytes"] * scale)


def label(row: dict) -> str:
    opts = ",".join(f"{k}={v}" for k, v in (row.get("options") or {}).items())
    method = f"{row['method']}({opts})" if opts else row["method"]
    return f"{row['backbone']} K={row['k']} {method}" + (f" {row['precision']}" if row["precision"] != "32-true" else "") \
        + (" channels_last" if row["channels_last"] else "")


def to_json(rows: Sequence[dict], skipped: Sequence[dict], environment: dict) -> dict[str, Any]:
    return {"schema": SCHEMA, "environment": environment, "rows": list(rows), "checks": checks(rows),
            "skipped": list(skipped)}


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------- formatting
def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _x(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ok(flag: bool | None) -> str:
    return "-" if flag is None else ("pass" if flag else "FAIL")


def _groups(rows: Sequence[dict]) -> list[tuple[tuple, list[dict]]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group(row) + (row["k"],), []).append(row)
    return list(groups.items())


def group_title(row: dict) -> str:
    numerics = {"32-true": "fp32"}.get(row["precision"], row["precision"])
    layout = ", channels_last" if row["channels_last"] else ""
    net = "".join(f", {k}={v}" for k, v in _net_options(row))
    return (f"{row['backbone']} K={row['k']}, batch {row['batch_size']}, {row['image_size']}x{row['image_size']}, "
            f"{numerics}{layout}{net}, {row['device']}")


def markdown_tables(rows: Sequence[dict]) -> str:
    """One table per (backbone, K, batch, size, numerics): the figures and their ratios to E2E."""
    parts = []
    for _, group in _groups(rows):
        parts.append(f"#### {group_title(group[0])}\n")
        parts.append("| method | base | modules | activations MiB | x E2E | total MiB | x E2E | x lower bound "
                     "| grad peak MiB (one loss's modules) | CUDA alloc MiB | step s | x E2E | img/s |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in group:
            opts = ",".join(f"{k}={v}" for k, v in r["options"].items() if k != "base" and "." not in k)
            name = f"{r['method']} ({opts})" if opts else r["method"]
            parts.append(
                f"| {name} | {r['base'] or '-'} | {r['modules']} | {_f(mib(r['peak_activation_bytes']))} | "
                f"{_x(r['activation_vs_e2e'])} | {_f(mib(r['peak_total_bytes']))} | {_x(r['total_vs_e2e'])} | "
                f"{_x(r['total_vs_lower_bound'])} | {_f(mib(r['peak_grad_bytes']), 2)} "
                f"({_f(mib(r['largest_span_grad_bytes']), 2)}) | {_f(mib(r['cuda_max_allocated_bytes']))} | "
                f"{_x(r['step_time_s'])} | {_x(r['time_vs_e2e'], 2)} | {_f(r['images_per_s'])} |")
        parts.append("")
    return "\n".join(parts)


def markdown_targets(rows: Sequence[dict]) -> str:
    """lla against the reference implementations (MiB saved for backward / median step s)."""
    by_target: dict[str, list[dict]] = {}
    for r in rows:
        if r["target"]:
            by_target.setdefault(r["target"], []).append(r)
    e2e_time = {t.backbone: t.step_time_s for t in TARGETS if t.method == "e2e"}
    lines = ["| configuration | targets: reference MiB / s | lla MiB / s | MiB x ref | (s / E2E) x ref's "
             "| MiB <= 1.0x | MiB <= 0.8x | s <= 1.0x | s <= 0.8x | step / E2E: lla vs ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        ref = f"{t.activation_mib:.1f} / {t.step_time_s:.2f}"
        if t.label not in by_target:
            lines.append(f"| {t.label} | {ref} | not run | - | - | - | - | - | - | - |")
            continue
        ref_overhead = t.step_time_s / e2e_time[t.backbone] if t.backbone in e2e_time else None
        for r in by_target[t.label]:  # one line per lla variant of this configuration (e.g. aux_checkpoint)
            opts = ",".join(f"{k}={v}" for k, v in r["options"].items() if k not in ("base", "depth"))
            name = f"{t.label}, {opts}" if opts else t.label
            lines.append(
                f"| {name} | {ref} | {_f(mib(r['peak_activation_bytes']))} / {_x(r['step_time_s'], 2)} | "
                f"{_x(r['activation_vs_target'], 2)} | {_x(r['time_vs_target'], 2)} | {_ok(r['activation_ok'])} | "
                f"{_ok(r['activation_goal'])} | {_ok(r['time_ok'])} | {_ok(r['time_goal'])} | "
                f"{_x(r['time_vs_e2e'], 2)} vs {_x(ref_overhead, 2)} |")
    return "\n".join(lines) + "\n"


def markdown_checks(check_rows: Sequence[dict]) -> str:
    lines = ["| check | row | value | limit | result | note |", "|---|---|---|---|---|---|"]
    for c in check_rows:
        lines.append(f"| {c['check']} | {c['row']} | {_x(c['value'])} | {c['limit']} | {_ok(c['passed'])} | "
                     f"{c['note']} |")
    return "\n".join(lines) + "\n"


def markdown(payload: dict) -> str:
    env = payload["environment"]
    rows, skipped = payload["rows"], payload["skipped"]
    head = [
        "# lla-bench results\n",
        f"torch {env.get('torch')}, lightning {env.get('lightning')}, {env.get('device_name')}, "
        f"{env.get('threads')} threads, load average {env.get('loadavg_start')} -> {env.get('loadavg_end')}; "
        f"{env.get('warmup')} warm-up + {env.get('steps')} timed steps (no hooks) + 1 metered step per row; "
        f"commit {env.get('git_commit') or 'unknown'}; {env.get('date')}; suite took {_f(env.get('wall_s'))} s.\n",
        "Activations = peak bytes saved for backward (saved-tensor hooks, each storage once). Total = parameters + "
        "buffers + optimizer state + the joint peak of saved activations and gradients. Lower bound = parameters + "
        "optimizer state + the largest single module's activations with its aux net. MiB = 2^20 bytes.\n",
        *busy_warning(env),
        "### Measurements\n", markdown_tables(rows),
        f"### Against the reference implementations (batch 64, 32x32, 2 CPU threads; goal {GOAL}x)\n",
        "Step times compare as overhead over E2E measured in the same run, (lla step / lla E2E) / (reference step / "
        "reference E2E): the references' seconds come from another machine. Single CPU timings here vary by up to "
        "~1.5x between idle runs (shared host), so treat step ratios within that band as equal.\n",
        markdown_targets(rows),
        "### Checks\n", markdown_checks(payload["checks"]),
    ]
    if skipped:
        head.append("### Skipped\n")
        head += [f"- {s['row']}: {s['reason']}" for s in skipped]
        head.append("")
    return "\n".join(head)


def busy_warning(env: dict) -> list[str]:
    """A loaded machine inflates step times (2 threads spin-wait for cores others hold); say so next to them."""
    loads = [x for x in (env.get("loadavg_start"), env.get("loadavg_end")) if x is not None]
    cores = env.get("cpu_count") or 0
    if env.get("device") != "cpu" or not loads or not cores or max(loads) <= cores:
        return []
    return [f"**Warning:** the machine was busy (load average up to {max(loads)} on {cores} cores): step times "
            "and their ratios to the references are inflated; memory figures are exact regardless.\n"]


def _short_name(row: dict) -> str:
    """Bar label: the method plus any method option that tells two rows of one group apart (``dgl+ckpt``)."""
    extra = [("ckpt" if k == "aux_checkpoint" else k) for k, v in (row.get("options") or {}).items()
             if k not in ("base", "depth") and "." not in k and v not in (False, None)]
    return "+".join([row["method"], *extra])


def write_plot(path: str | Path, rows: Sequence[dict]) -> None:
    """Peak activation MiB (reference targets as black ticks) and step time per method, per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    if not groups:
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(3.2 * len(groups) + 1, 6.5), squeeze=False)
    for col, (_, group) in enumerate(groups):
        names = [_short_name(r) for r in group]
        acts = [mib(r["peak_activation_bytes"]) for r in group]
        times = [r["step_time_s"] for r in group]
        ax = axes[0][col]
        ax.bar(names, acts, color="tab:blue")
        for i, r in enumerate(group):
            if r["target_activation_mib"] is not None:
                ax.plot([i - 0.4, i + 0.4], [r["target_activation_mib"]] * 2, color="black", lw=2)
        ax.set_title(group_title(group[0]).replace(", ", "\n", 2), fontsize=8)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax = axes[1][col]
        ax.bar(names, times, color="tab:orange")
        for i, r in enumerate(group):
            if r["time_vs_target"]:  # the reference's overhead over E2E, at this machine's E2E speed
                ax.plot([i - 0.4, i + 0.4], [r["step_time_s"] / r["time_vs_target"]] * 2, color="black", lw=2)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[0][0].set_ylabel("peak activations MiB\nblack: reference")
    axes[1][0].set_ylabel("median step s\nblack: reference's step / E2E\nx this E2E")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def console_table(rows: Iterable[dict]) -> str:
    """The terminal table: one line per row."""
    head = (f"{'configuration':44s} {'mods':>4s} {'act MiB':>9s} {'xE2E':>6s} {'total MiB':>9s} {'xLB':>6s} "
            f"{'grad MiB':>8s} {'step s':>7s} {'xE2E':>6s} {'img/s':>7s} {'target':>12s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tgt = "-"
        if r["target"]:
            tgt = f"{_x(r['activation_vs_target'], 2)}x mem"
        lines.append(
            f"{label(r)[:44]:44s} {r['modules']:>4d} {_f(mib(r['peak_activation_bytes'])):>9s} "
            f"{_x(r['activation_vs_e2e']):>6s} {_f(mib(r['peak_total_bytes'])):>9s} "
            f"{_x(r['total_vs_lower_bound']):>6s} {_f(mib(r['peak_grad_bytes']), 2):>8s} "
            f"{_x(r['step_time_s']):>7s} {_x(r['time_vs_e2e'], 2):>6s} {_f(r['images_per_s']):>7s} {tgt:>12s}")
    return "\n".join(lines)
