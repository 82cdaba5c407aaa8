"""``lla-bench`` / ``make bench``: training memory and speed of every method, next to E2E and the references.

    lla-bench --methods e2e,dgl,man --backbone resnet32 --k 16 --batch-size 64 --image-size 32 --steps 5 --json out.json
    lla-bench --methods "e2e,man:base=dgl,auglocal:depth=3" --backbone resnet110 --k 55
    lla-bench --suite default --json bench/results.json --markdown bench/results.md --plot bench/results.png

Each row trains real steps of the engine (see lla/bench/runner.py), prints a table and writes one JSON record per
row. A method whose config or class is not in this checkout is skipped with a note. Bad flags end with one line
``error: <key>: <problem>; allowed: <...>`` and exit code 2. The benchmark is a measuring tool with a fixed
command line (issue 7), hence argparse rather than Hydra.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from lla.bench import report
from lla.bench.runner import PRECISIONS, BenchConfig, MethodUnavailable, resolve_device, run_config
from lla.bench.suites import SUITES
from lla.errors import ConfigError


def parse_methods(spec: str) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """``"e2e,man:base=dgl:ema_momentum=0.99"`` -> [("e2e", ()), ("man", (("base", "dgl"), ("ema_momentum", 0.99)))]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *opts = item.split(":")
        options = []
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep or not key:
                raise ConfigError("methods", f"option {opt!r} of {name!r} is not key=value",
                                  "name or name:key=value[:key=value], e.g. man:base=dgl")
            options.append((key.strip(), yaml.safe_load(value)))
        out.append((name.strip(), tuple(options)))
    if not out:
        raise ConfigError("methods", "no method given", "a comma-separated list, e.g. e2e,dgl,man")
    return out


def configs_from_args(args) -> list[BenchConfig]:
    if args.suite is not None:
        if args.methods is not None:
            raise ConfigError("suite", "give either --suite or --methods, not both", ", ".join(SUITES))
        if args.suite not in SUITES:
            raise ConfigError("suite", f"unknown suite {args.suite!r}", ", ".join(SUITES))
        return SUITES[args.suite]()
    methods = parse_methods(args.methods or "e2e,dgl")
    if all(name != "e2e" for name, _ in methods):
        methods.insert(0, ("e2e", ()))  # every figure is also reported as a ratio to E2E (issue 7)
    if args.precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown precision {args.precision!r}", ", ".join(PRECISIONS))
    return [BenchConfig(name, args.backbone, args.k, args.batch_size, args.image_size, opts, args.precision,
                        args.channels_last, args.num_classes) for name, opts in methods]


def environment(args, device) -> dict[str, Any]:
    import lightning
    import torch

    from lla.build import git_commit

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    return {"torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
            "device": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "loadavg_start": _loadavg(), "git_commit": git_commit(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "suite": args.suite,
            "steps": args.steps, "warmup": args.warmup, "argv": sys.argv[1:]}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lla-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None, help=f"a predefined set of rows: {', '.join(SUITES)}")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods from conf/method, each optionally name:key=value[:...] "
                        "(default e2e,dgl; e2e is always added)")
    p.add_argument("--backbone", default="resnet32", help="a backbone from conf/backbone")
    p.add_argument("--k", type=int, default=16, help="nominal number of local modules (the method maps it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=None, help="default: 1000 for ImageNet backbones, else 10")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--precision", default="32-true", help=f"trainer precision: {', '.join(PRECISIONS)}")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in torch.channels_last")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the references: 2)")
    p.add_argument("--explain", action="store_true",
                   help="print the saved tensors alive at each row's activation peak, by shape")
    p.add_argument("--ddp", type=int, default=0, metavar="N",
                   help="instead of the memory suite: DDP step-time overhead of N CPU processes (gloo) vs one")
    p.add_argument("--pipeline", type=int, default=0, metavar="N",
                   help="instead of the memory suite: module-parallel training, N stages vs one process (images/s, "
                        "speed-up, busy fraction and memory per stage; --threads per process)")
    p.add_argument("--json", default=None, help="write rows, checks and environment here")
    p.add_argument("--markdown", default=None, help="write the Markdown report here")
    p.add_argument("--plot", default=None, help="write a PNG chart here")
    return p


def run_ddp(args) -> int:
    """``lla-bench --ddp N``: one process vs N processes on the same per-process batch (lla.bench.ddp)."""
    import json

    from lla.bench.ddp import measure_ddp_overhead

    method = (args.methods or "dgl").split(",")[0].split(":")[0]
    res = measure_ddp_overhead(world_size=args.ddp, method=method, backbone=args.backbone, k=args.k,
                               batch_size=args.batch_size, image_size=args.image_size, steps=max(args.steps, 3),
                               warmup=args.warmup)
    print(f"DDP x{res['world_size']} ({res['method']}, {res['backbone']}, K={res['k']}, batch {res['batch_size']}"
          f"/process): one process {res['single_step_s']:.3f} s/step, DDP {res['ddp_step_s']:.3f} s/step, "
          f"overhead {res['overhead_s']:+.3f} s ({res['overhead_pct']:+.1f}%)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def run_pipeline(args) -> int:
    """``lla-bench --pipeline N``: N stage processes vs one process, one row per method (lla.bench.pipeline)."""
    from lla.bench.pipeline import markdown, measure_pipeline, write

    rows = [measure_pipeline(args.pipeline, method=m.split(":")[0], backbone=args.backbone, k=args.k,
                             batch_size=args.batch_size, image_size=args.image_size, steps=max(args.steps, 3),
                             warmup=args.warmup, threads=args.threads)
            for m in (args.methods or "dgl").split(",")]
    write(rows, args.json, args.markdown)
    print(markdown(rows), end="")
    return 0


def run(args) -> int:
    import torch

    if args.ddp:
        return run_ddp(args)
    if args.pipeline:
        return run_pipeline(args)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configs = configs_from_args(args)
    env = environment(args, device)
    t0 = time.time()
    rows, skipped, status = [], [], 0
    for i, cfg in enumerate(configs, start=1):
        print(f"[{i}/{len(configs)}] {cfg.describe()} ...", flush=True)
        try:
            rows.append(run_config(cfg, steps=args.steps, warmup=args.warmup, device=device, explain=args.explain))
        except MethodUnavailable as err:
            print(f"  skipped: {cfg.method} is not available: {err}", flush=True)
            skipped.append({"row": cfg.describe(), "reason": f"not available: {err}"})
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            skipped.append({"row": cfg.describe(), "reason": f"config error: {err}"})
            status = max(status, 2)
        except Exception as err:  # one broken method must not lose the other rows
            traceback.print_exc()
            skipped.append({"row": cfg.describe(), "reason": f"crashed: {type(err).__name__}: {err}"})
            status = max(status, 1)
        else:
            r = rows[-1]
            print(f"  {r['modules']} modules, activations {r['peak_activation_bytes'] / 2**20:.1f} MiB, "
                  f"step {r['step_time_s']:.3f} s", flush=True)
            for line in r.pop("_explain", []):
                print(f"    {line}")
    rows = report.derive(rows)
    env["wall_s"] = round(time.time() - t0, 1)
    env["loadavg_end"] = _loadavg()
    payload = report.to_json(rows, skipped, env)
    print()
    print(report.console_table(rows))
    for s in skipped:
        print(f"skipped {s['row']}: {s['reason']}")
    if args.json:
        report.write_json(args.json, payload)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(report.markdown(payload))
    if args.plot and rows:
        report.write_plot(args.plot, rows)
    print(f"\n{len(rows)} rows in {env['wall_s']} s" + (f"; wrote {args.json}" if args.json else ""))
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
