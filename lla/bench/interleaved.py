"""Step-time overhead over E2E, measured *interleaved*: one step of each method in turn, round after round.

On a shared machine the speed drifts over minutes, so rows timed one after another (``lla-bench``) can disagree by
1.5x between two idle runs. Here every method's step sits next to E2E's in time, so drift hits all of them alike and
the ratios are stable (two runs agree within ~5%). Compared with the references' own step / E2E ratios (targets.py).

    python -m lla.bench.interleaved --json bench/interleaved.json --markdown bench/interleaved.md
    python -m lla.bench.interleaved --options aux_checkpoint=true,backbone.fused_bn_relu=true
    python -m lla.bench.interleaved --channels-last
    python -m lla.bench.interleaved --compile      # compile=true rows (E2E compiled too) beside eager twins

Compiled rows compile during ``--compile-warmup`` steps of their own before the rounds start: the compile time is
reported per row (``compile_s``, ``compile_graphs``) and never counted in the step times.
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
from lla.compile import check_options as check_compile
from lla.compile import compile_model, timed_warmup
from lla.errors import ConfigError


def detach_from_trainer(model) -> None:
    """Let ``training_step`` run without a Trainer: the engine needs only these three Trainer-backed methods."""
    opt = model.configure_optimizers()
    model.optimizers = types.MethodType(lambda self: types.SimpleNamespace(optimizer=opt, step=opt.step), model)
    model.log = lambda *args, **kwargs: None
    model.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    model.train()


def measure(configs: list[BenchConfig], rounds: int = 7, warmup: int = 1, device: str = "auto",
            channels_last: bool = False, compile_mode: str | None = None, compile_warmup: int = 2,
            eager_twins: bool = True) -> list[dict]:
    """Median step time of each config over ``rounds`` interleaved rounds (the first ``warmup`` dropped).

    ``channels_last``: every config runs in NHWC, and a plain (NCHW) E2E is timed beside them as the yardstick the
    references' ratios are taken against (their E2E is plain PyTorch in NCHW).

    ``compile_mode``: every config (E2E included) is compiled per module and aux net (lla.compile) and warmed up
    for ``compile_warmup`` steps before the rounds (its compile time is reported, not timed); an eager E2E runs
    beside them as the second yardstick. With ``eager_twins`` every method runs eagerly too, in the same rounds, so
    each compiled row also gets ``vs_eager``: its step over its own eager twin's (does compiling pay?)."""
    dev = resolve_device(device)
    compiled = compile_mode is not None
    plans = [(cfg, channels_last, compiled) for cfg in configs]
    if compiled and eager_twins:
        plans = [(cfg, channels_last, False) for cfg in configs] + plans
    elif channels_last or compiled:
        plans.insert(0, (next(c for c in configs if c.method == "e2e"), False, False))
    models = []
    for cfg, nhwc, comp in plans:
        model, _ = build_model(cfg)
        model.to(dev, memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        if comp:
            compile_model(model, compile_mode)
        detach_from_trainer(model)
        models.append(model)
    g = torch.Generator().manual_seed(0)
    size, n = configs[0].image_size, configs[0].batch_size
    x = torch.randn(n, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, models[0].num_classes, (n,), generator=g).to(dev)
    batches = [(x.contiguous(memory_format=torch.channels_last) if nhwc else x, y) for _, nhwc, _ in plans]
    compiles: list[dict | None] = [None] * len(models)
    for i, ((_, _, comp), model, batch) in enumerate(zip(plans, models, batches)):
        if comp:  # compile now (and let every graph run once forward and backward), outside the timed rounds
            compiles[i] = timed_warmup(lambda m=model, b=batch: m.training_step(b, 0), compile_warmup)
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
    for (cfg, nhwc, comp), model, ts, comp_figures in zip(plans, models, times, compiles):
        rows.append({"method": cfg.method, "base": getattr(model, "base", None), "options": dict(cfg.options),
                     "backbone": cfg.backbone, "k": cfg.k, "modules": model.num_modules,
                     "batch_size": cfg.batch_size, "image_size": cfg.image_size, "precision": "32-true",
                     "channels_last": nhwc, "device": dev.type, "threads": torch.get_num_threads(),
                     "step_time_s": statistics.median(ts), "step_times_s": ts,
                     "compiled": comp, "compile_mode": compile_mode if comp else None,
                     "compile_s": comp_figures["compile_s"] if comp_figures else None,
                     "compile_graphs": comp_figures["graphs"] if comp_figures else None,
                     "compile_warmup_s": comp_figures["warmup_s"] if comp_figures else None})
    e2e = {(r["channels_last"], r["compiled"]): r["step_time_s"] for r in rows if r["method"] == "e2e"}
    eager = {(r["method"], repr(r["options"])): r["step_time_s"] for r in rows if not r["compiled"]}
    for row in rows:
        twin = eager.get((row["method"], repr(row["options"]))) if row["compiled"] else None
        row["vs_eager"] = row["step_time_s"] / twin if twin else None
        row["time_vs_e2e"] = row["step_time_s"] / e2e[row["channels_last"], row["compiled"]]  # same layout/compile
        row["time_vs_plain_e2e"] = row["step_time_s"] / e2e[False, False]  # the references' yardstick
        target = find_target({**row, "channels_last": False})
        ref = reference_e2e(target) if target else None
        row["reference_time_vs_e2e"] = target.step_time_s / ref.step_time_s if target and ref else None
        row["vs_reference"] = (row["time_vs_plain_e2e"] / row["reference_time_vs_e2e"]
                               if row["reference_time_vs_e2e"] else None)
        # compiled rows: the overhead over the compiled E2E, against the reference's (issue 19 compares both ways)
        row["vs_reference_same_e2e"] = (row["time_vs_e2e"] / row["reference_time_vs_e2e"]
                                        if row["reference_time_vs_e2e"] else None)
    return rows


def markdown(rows: list[dict], rounds: int) -> str:
    first = rows[0]
    nhwc = any(r["channels_last"] for r in rows)
    where = (f"{first['backbone']} K={first['k']}, batch {first['batch_size']}, {first['image_size']}x"
             f"{first['image_size']}, {first['device']}, {first['threads']} threads, median of {rounds} rounds")
    if any(r.get("compiled") for r in rows):
        return compiled_markdown(rows, where)
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


def compiled_markdown(rows: list[dict], where: str) -> str:
    """The compile=true table: each overhead against the compiled E2E and against the eager one, both divided by
    the reference's overhead (its E2E is eager PyTorch); compile time per row, not in the step times."""
    mode = next(r["compile_mode"] for r in rows if r.get("compiled"))
    lines = [f"#### Interleaved step times, compile=true (compile_mode={mode}): {where}\n",
             "Compiled rows are compiled per module and aux net, E2E too; eager rows run beside them in the same rounds. "
             "\"x E2E\" divides by the E2E of the same kind (compiled or eager), \"x eager E2E\" by the eager one; "
             "lla / reference divides each by the reference's own step / E2E; \"x eager\" is a compiled row's step "
             "over its own eager twin's (under 1: compiling pays). Compile time is spent in warm-up steps before the "
             "rounds and is not in any step time.\n",
             "| method | compiled | options | modules | step s | x E2E | x eager E2E | reference x E2E "
             "| lla / reference (vs compiled E2E) | lla / reference (vs eager E2E) | x eager | compile s | graphs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        ref = "-" if r["reference_time_vs_e2e"] is None else f"{r['reference_time_vs_e2e']:.2f}"
        same = "-" if r["vs_reference_same_e2e"] is None or r["method"] == "e2e" else f"{r['vs_reference_same_e2e']:.2f}"
        eager = "-" if r["vs_reference"] is None or r["method"] == "e2e" else f"{r['vs_reference']:.2f}"
        comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        graphs = "-" if r["compile_graphs"] is None else str(r["compile_graphs"])
        twin = "-" if r.get("vs_eager") is None else f"{r['vs_eager']:.2f}"
        lines.append(f"| {r['method']} | {'yes' if r['compiled'] else 'no'} | {opts} | {r['modules']} | "
                     f"{r['step_time_s']:.3f} | {r['time_vs_e2e']:.2f} | {r['time_vs_plain_e2e']:.2f} | {ref} | "
                     f"{same} | {eager} | {twin} | {comp} | {graphs} |")
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
    p.add_argument("--compile", action="store_true", help="compile=true rows (E2E too) beside every method run eagerly")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of --compile (lla.compile.MODES)")
    p.add_argument("--compile-warmup", type=int, default=2, help="untimed steps per compiled row before the rounds")
    p.add_argument("--no-eager-twins", action="store_true",
                   help="with --compile: time only an eager E2E beside the compiled rows, not every method eagerly")
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
            if args.compile:
                check_compile(True, args.compile_mode)
            rows = measure(configs, args.rounds, args.warmup, args.device, args.channels_last,
                           args.compile_mode if args.compile else None, args.compile_warmup,
                           eager_twins=not args.no_eager_twins)
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
