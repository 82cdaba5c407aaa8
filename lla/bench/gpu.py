"""``make gpu-check``: the `gpu` tests, then a small lla-bench on one GPU; writes ``bench/gpu.json`` and ``gpu.md``.

    python -m lla.bench.gpu                              # on a CUDA machine: about 5-7 minutes on one H200
    python -m lla.bench.gpu --dry-run --out /tmp/x       # the same code path on the CPU, tiny sizes (tests use it)

Bench rows: ResNet-32 K=16 (32x32) and ResNet-101 K=2 (224x224) at batch 128, every method (E2E, DGL, InfoPro,
AugLocal, MAN, MLAAN), in ``32-true`` and ``bf16-mixed``. Each row trains real engine steps (lla.bench.runner):
warm-up steps, then timed steps bracketed by CUDA events and read once after the last one (nothing waits for the
device inside a step), then one metered step for the saved-tensor accounting. Reported per row: median step time,
images/s, CUDA max allocated / reserved during the timed steps, the accounting peak, and each as a ratio to the
E2E row of the same network and precision. Rows are skipped, with a note, once ``--budget-s`` is spent, so the
check ends in bounded time; one failing row does not lose the others. Exit status: 0 when the tests passed and every
row ran, 1 otherwise (the files are written either way).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lla.bench import report
from lla.bench.accounting import mib, ratio
from lla.bench.runner import BenchConfig, MethodUnavailable, resolve_device, run_config
from lla.errors import ConfigError

METHODS: dict[str, tuple[tuple[str, Any], ...]] = {  # the rows' method options (defaults of conf/method)
    "e2e": (),
    "dgl": (),
    "infopro": (),
    "auglocal": (),
    "man": (),
    "mlaan": (),
}
PRECISIONS = ("32-true", "bf16-mixed")
# (backbone, K, batch, image size, classes): the GPU rows, and the dry run's CPU-sized stand-ins (a CIFAR and an
# ImageNet ResNet, as on the GPU)
NETS = (("resnet32", 16, 128, 32, None), ("resnet101", 2, 128, 224, None))
DRY_NETS = (("resnet20", 8, 4, 16, 10), ("resnet50", 2, 2, 32, 10))
ROOT = Path(__file__).resolve().parents[2]


def configs(dry_run: bool, methods: list[str], precisions: list[str], nets: str = "all") -> list[BenchConfig]:
    """E2E first in every (network, precision) group: the ratios need it. `nets`: all, cifar or imagenet."""
    out = []
    chosen = DRY_NETS if dry_run else NETS
    chosen = {"all": chosen, "cifar": chosen[:1], "imagenet": chosen[1:]}[nets]
    for backbone, k, batch, size, classes in chosen:
        for precision in precisions:
            for m in ["e2e", *[m for m in methods if m != "e2e"]]:
                out.append(BenchConfig(m, backbone, k, batch, size, METHODS.get(m, ()), precision,
                                       num_classes=classes))
    return out


def run_gpu_tests(dry_run: bool, timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu tests/test_gpu.py`` in a subprocess; the summary line and the exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, code = f"{err.stdout or ''}\ntimed out after {timeout_s:.0f} s", 124
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    print(f"gpu tests: {summary} (exit {code})", flush=True)
    if code not in (0, 5) or dry_run:  # 5: nothing collected
        print("\n".join(lines[-40:]), flush=True)
    # exit 0 and the tests only skipped: expected on the CPU (dry run), a failure on a GPU machine
    passed = code == 0 and (dry_run or "passed" in summary)
    return {"command": " ".join(cmd[1:]), "exit_code": code, "summary": summary, "passed": passed,
            "seconds": round(time.time() - start, 1), "tail": lines[-60:] if not passed else []}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device, args) -> dict[str, Any]:
    import lightning

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
           "python": platform.python_version(), "device": device.type, "dry_run": args.dry_run,
           "steps": args.steps, "warmup": args.warmup, "git_commit": git_commit(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def add_gpu_ratios(rows: list[dict]) -> list[dict]:
    """Reserved / E2E and CUDA allocated / saved-tensor accounting, next to lla-bench's own ratios."""
    e2e = {(r["backbone"], r["precision"]): r for r in rows if r["method"] == "e2e"}
    for r in rows:
        base = e2e.get((r["backbone"], r["precision"]), {})
        r["cuda_reserved_vs_e2e"] = ratio(r["cuda_max_reserved_bytes"], base.get("cuda_max_reserved_bytes"))
        r["cuda_allocated_vs_accounting"] = ratio(r["cuda_max_allocated_bytes"], r["peak_total_bytes"])
    return rows


def _n(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(payload: dict) -> str:
    env, rows, tests = payload["environment"], payload["rows"], payload["gpu_tests"]
    out = [
        "# make gpu-check\n",
        f"{env.get('device_name')} ({env.get('device_memory_gib', '-')} GiB), torch {env['torch']} (CUDA "
        f"{env.get('cuda')}), lightning {env['lightning']}; commit {env.get('git_commit') or 'unknown'}; "
        f"{env['date']}; took {_n(env.get('wall_s'))} s." + (" **Dry run on the CPU (tiny sizes): not a "
                                                              "measurement.**" if env.get("dry_run") else ""),
        "",
        f"`gpu` tests: **{tests['summary']}** (exit {tests['exit_code']}, {tests['seconds']} s).",
        "",
        f"Per row: {env['warmup']} warm-up steps, {env['steps']} timed steps (median; each bracketed by CUDA events "
        "read once after the last), then one metered step. CUDA allocated / reserved = torch's peaks during the "
        "timed steps. Accounting = parameters + buffers + optimizer state + the joint peak of saved activations and "
        "gradients (device-independent, lla.bench.memory). MiB = 2^20 bytes.",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["k"], r["batch_size"], r["image_size"], r["precision"]), []).append(r)
    for (backbone, k, batch, size, precision), group in groups.items():
        out += [f"### {backbone} K={k}, batch {batch}, {size}x{size}, {precision}\n",
                "| method | modules | step ms | images/s | step / E2E | CUDA alloc MiB | alloc / E2E | "
                "CUDA reserved MiB | reserved / E2E | accounting MiB | alloc / accounting |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            out.append(
                f"| {report.label(r).split(' ', 2)[2]} | {r['modules']} | {_n(r['step_time_s'] * 1000)} | "
                f"{_n(r['images_per_s'], 0)} | {_n(r['time_vs_e2e'], 2)} | {_n(mib(r['cuda_max_allocated_bytes']))} | "
                f"{_n(r['cuda_allocated_vs_e2e'], 2)} | {_n(mib(r['cuda_max_reserved_bytes']))} | "
                f"{_n(r['cuda_reserved_vs_e2e'], 2)} | {_n(mib(r['peak_total_bytes']))} | "
                f"{_n(r['cuda_allocated_vs_accounting'], 2)} |")
        out.append("")
    if payload["skipped"]:
        out.append("### Skipped\n")
        out += [f"- {s['row']}: {s['reason']}" for s in payload["skipped"]]
        out.append("")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lla.bench.gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench", help="folder for gpu.json and gpu.md (default bench/)")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU with tiny sizes: the same code path, for testing the script without a GPU")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (E2E is always run)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: 32-true, bf16-mixed")
    p.add_argument("--nets", default="all", choices=("all", "cifar", "imagenet"),
                   help="both networks, or only the ResNet-32 (cifar) or the ResNet-101 (imagenet) rows")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; dry run 1)")
    p.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    p.add_argument("--tests-timeout-s", type=float, default=240.0)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting rows after this many seconds in all (the check must end within 8 minutes)")
    return p


def run(args) -> int:
    start = time.time()
    if args.dry_run:
        device = torch.device("cpu")
    else:
        device = resolve_device("auto")
        if device.type != "cuda":
            raise ConfigError("device", "make gpu-check needs a CUDA device and none is visible",
                              "a GPU machine, or --dry-run to test the script on the CPU")
    args.steps = args.steps or (1 if args.dry_run else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError("methods", f"unknown method {unknown[0]!r}", ", ".join(METHODS))
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ConfigError("precisions", f"unknown precision {bad[0]!r}", ", ".join(PRECISIONS))
    tests = {"summary": "not run (--skip-tests)", "exit_code": None, "passed": True, "seconds": 0}
    if not args.skip_tests:
        tests = run_gpu_tests(args.dry_run, args.tests_timeout_s)
    rows, skipped, status = [], [], 0 if tests["passed"] else 1
    todo = configs(args.dry_run, methods, precisions, args.nets)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for i, cfg in enumerate(todo, start=1):
        if time.time() - start > args.budget_s:
            skipped.append({"row": cfg.describe(), "reason": f"time budget of {args.budget_s:.0f} s spent"})
            status = 1
            continue
        print(f"[{i}/{len(todo)}] {cfg.describe()} ...", flush=True)
        try:
            row = run_config(cfg, steps=args.steps, warmup=args.warmup, device=device)
        except MethodUnavailable as err:
            skipped.append({"row": cfg.describe(), "reason": f"not available: {err}"})
        except Exception as err:  # one failing row must not lose the others (ConfigError included)
            traceback.print_exc()
            skipped.append({"row": cfg.describe(), "reason": f"failed: {type(err).__name__}: {err}"})
            status = 1
        else:
            rows.append(row)
            print(f"  step {row['step_time_s'] * 1000:.1f} ms, CUDA allocated "
                  f"{_n(mib(row['cuda_max_allocated_bytes']))} MiB", flush=True)
        finally:
            gc.collect()  # Lightning's reference cycles hold the last model otherwise
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next row's reserved figure starts from zero
    rows = add_gpu_ratios(report.derive(rows))
    env = environment(device, args)
    env["wall_s"] = round(time.time() - start, 1)
    payload = {"schema": "lla-gpu-check/1", "environment": env, "gpu_tests": tests, "rows": rows,
               "skipped": skipped}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(payload))
    print(f"\nwrote {out / 'gpu.json'} and {out / 'gpu.md'} ({len(rows)} rows, {len(skipped)} skipped) in "
          f"{env['wall_s']} s; gpu tests: {tests['summary']}")
    return status


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        status = run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


if __name__ == "__main__":
    main()
