"""Step-time overhead over E2E, measured *interleaved*: one step of each method in turn, round after round.

On a shared machine the speed drifts over minutes, so rows timed one after another (``lla-bench``) can disagree by
1.5x between two idle runs. Here every method's step sits next to E2E's in time, so drift hits all of them alike and
the ratios are stable (two runs agree within ~5%). Compared with the references' own step / E2E ratios (targets.py).

    python -m lla.bench.interleaved --json bench/interleaved.json --markdown bench/interleaved.md
    python -m lla.bench.interleaved --options aux_checkpoint=true,backbone.fused_bn_relu=true
    python -m lla.bench.interleaved --channels-last
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import yaml

from lla.bench.runner import BenchConfig, build_model, resolve_device
from lla.bench.suites import CIFAR_METHODS, row_options
from lla.bench.targets import find_target, reference_e2e
from lla.errors import ConfigError


def detach_from_trainer(model) -> None:
    """Let ``training_step`` run without a Trainer: the engine needs only these three Trainer-backed methods."""
    opt = model.configure_optimizers()
    model.optimizers = types.MethodType(lambda self: types.SimpleNamespace(optimizer=opt, step=opt.step), model)
    model.log = lambda *args, **kwargs: None
    model.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    model.train()


def measure(configs: list[BenchConfig], rounds: int = 7, warmup: int = 1, device: str = "auto",
            channels_last: bool = False) -> list[dict]:
    """Median step time of each config over ``rounds`` interleaved rounds (the first ``warmup`` dropped).

    ``channels_last``: every config runs in NHWC, and a plain (NCHW) E2E is timed beside them as the yardstick the
    references' ratios are taken against (their E2E is plain PyTorch in NCHW)."""
    dev = resolve_device(device)
    plans = [(cfg, channels_last) for cfg in configs]
    if channels_last:
        plans.insert(0, (next(c for c in configs if c.method == "e2e"), False))
    models = []
    for cfg, nhwc in plans:
        model, _ = build_model(cfg)
        model.to(dev, memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        detach_from_trainer(model)
        models.append(model)
    g = torch.Generator().manual_seed(0)
    size, n = configs[0].image_size, configs[0].batch_size
    x = torch.randn(n, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, models[0].num_classes, (n,), generator=g).to(dev)
    batches = [(x.contiguous(memory_format=torch.channels_last) if nhwc else x, y) for _, nhwc in plans]
    times: list[list[float]] = [[] for _ in models]
    for r in range(warmup + rounds):
        for i, (model, batch) in enumerate(zip(models, batches)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model.training_step(batch, r)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    rows = []
    for (cfg, nhwc), model, ts in zip(plans, models, times):
        rows.append({"method": cfg.method, "base": getattr(model, "base", None), "options": dict(cfg.options),
                     "backbone": cfg.backbone, "k": cfg.k, "modules": model.num_modules,
                     "batch_size": cfg.batch_size, "image_size": cfg.image_size, "precision": "32-true",
                     "channels_last": nhwc, "device": dev.type, "threads": torch.get_num_threads(),
                     "step_time_s": statistics.median(ts), "step_times_s": ts})
    e2e = {r["channels_last"]: r["step_time_s"] for r in rows if r["method"] == "e2e"}
    for row in rows:
        row["time_vs_e2e"] = row["step_time_s"] / e2e[row["channels_last"]]  # E2E in the same layout
        row["time_vs_plain_e2e"] = row["step_time_s"] / e2e[False]  # the references' yardstick
        target = find_target({**row, "channels_last": False})
        ref = reference_e2e(target) if target else None
        row["reference_time_vs_e2e"] = target.step_time_s / ref.step_time_s if target and ref else None
        row["vs_reference"] = (row["time_vs_plain_e2e"] / row["reference_time_vs_e2e"]
                               if row["reference_time_vs_e2e"] else None)
    return rows


def markdown(rows: list[dict], rounds: int) -> str:
    first = rows[0]
    nhwc = any(r["channels_last"] for r in rows)
    where = (f"{first['backbone']} K={first['k']}, batch {first['batch_size']}, {first['image_size']}x"
             f"{first['image_size']}, {first['device']}, {first['threads']} threads, median of {rounds} rounds")
    if not nhwc:
        lines = [f"#### Interleaved step times: {where}\n",
                 "| method | options | modules | step s | x E2E | reference x E2E | lla / reference |",
                 "|---|---|---|---|---|---|---|"]
    else:
        lines = [f"#### Interleaved step times in channels_last: {where}\n",
                 "Each method and E2E run in NHWC; \"x plain E2E\" divides by E2E in NCHW (plain PyTorch, what the "
                 "references' own ratios are taken against), and lla / reference uses that column.\n",
                 "| method | layout | options | modules | step s | x E2E (same layout) | x plain E2E | reference x E2E "
                 "| lla / reference |",
                 "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        ref = "-" if r["reference_time_vs_e2e"] is None else f"{r['reference_time_vs_e2e']:.2f}"
        vs = "-" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}"
        if not nhwc:
            lines.append(f"| {r['method']} | {opts} | {r['modules']} | {r['step_time_s']:.3f} | "
                         f"{r['time_vs_e2e']:.2f} | {ref} | {vs} |")
        else:
            layout = "NHWC" if r["channels_last"] else "NCHW"
            lines.append(f"| {r['method']} | {layout} | {opts} | {r['modules']} | {r['step_time_s']:.3f} | "
                         f"{r['time_vs_e2e']:.2f} | {r['time_vs_plain_e2e']:.2f} | {ref} | {vs} |")
    return "\n".join(lines) + "\n"


def parse_options(spec: str) -> tuple[tuple[str, object], ...]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("options", f"{item!r} is not key=value", "e.g. aux_checkpoint=true")
        out.append((key, yaml.safe_load(value)))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(CIFAR_METHODS), help="methods (e2e is always added first)")
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--options", default="", help="added to every row, e.g. aux_checkpoint=true (E2E: dotted only)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in torch.channels_last")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    try:
        extra = parse_options(args.options)
        methods = [m for m in args.methods.split(",") if m and m != "e2e"]
        configs = []
        for method in ["e2e", *methods]:
            base = CIFAR_METHODS.get(method, ())
            configs.append(BenchConfig(method, args.backbone, args.k, args.batch_size, args.image_size,
                                       base + row_options(method, extra)))
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            rows = measure(configs, args.rounds, args.warmup, args.device, args.channels_last)
        finally:
            torch.set_num_threads(threads)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = markdown(rows, args.rounds)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
