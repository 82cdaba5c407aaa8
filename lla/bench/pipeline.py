"""Benchmark of module-parallel training: ``lla-bench --pipeline N`` / ``python -m lla.bench.pipeline N``.

For one configuration: images/s of N stage processes (T threads each on CPU) against one process with T threads,
the speed-up, each stage's busy fraction (time not spent waiting on the transport) and each stage's peak memory
(saved-for-backward activations, lla.memory, and the process's peak RSS). Throughput is measured where the images
leave the pipeline: the last stage's batch ends after the warm-up (docs/pipeline.md#benchmark).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from lla.bench.ddp import spawn
from lla.errors import ConfigError


class _Stamps(L.Callback):
    def __init__(self):
        self.ends: list[float] = []
        self.cpu: list[float] = []  # this process's CPU time (all its threads) at each batch end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())


def _worker(rank: int, world: int, spec: dict, out: str) -> None:
    from hydra import compose, initialize_config_dir

    from lla.build import CONF_DIR, build, quiet_lightning
    from lla.callbacks import ActivationMemory
    from lla.pipeline import PipelineStrategy

    quiet_lightning()
    total = spec["warmup"] + spec["steps"]
    overrides = [f"method={spec['method']}", f"backbone={spec['backbone']}", "dataset=synthetic", f"k={spec['k']}",
                 f"dataset.batch_size={spec['batch_size']}", f"dataset.image_size={spec['image_size']}",
                 f"dataset.num_samples={spec['batch_size'] * total}", "logger=none", "optim.schedule=constant",
                 "trainer.max_epochs=1"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    L.seed_everything(0, verbose=False)
    dm, model = build(cfg)
    stamps, act = _Stamps(), ActivationMemory(batches=2)
    strategy = PipelineStrategy(depth=spec["depth"], stage_boundaries=spec["boundaries"]) if world > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=world, max_steps=total, strategy=strategy, callbacks=[stamps, act],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    ends = stamps.ends
    w = spec["warmup"]
    images_per_s = spec["batch_size"] * (len(ends) - w) / (ends[-1] - ends[w - 1]) if len(ends) > w else None
    cpu_ms = 1e3 * (stamps.cpu[-1] - stamps.cpu[w - 1]) / (len(ends) - w) if len(ends) > w else None
    wall_ms = 1e3 * (ends[-1] - ends[w - 1]) / (len(ends) - w) if len(ends) > w else None
    record: dict[str, Any] = {"rank": rank, "images_per_s": images_per_s, "cpu_ms_per_batch": cpu_ms,
                              "wall_ms_per_batch": wall_ms, "peak_activation_mb": act.peak_mb,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if world > 1:
        stats = trainer.strategy.stage_stats or {}
        busy_ms = None
        if stats.get("train_s") and stats.get("batches"):
            busy_ms = 1e3 * (stats["train_s"] - stats["wait_s"]) / stats["batches"]
        record.update(busy_fraction=stats.get("busy_fraction"), wait_s=stats.get("wait_s"), busy_ms_per_batch=busy_ms,
                      boundaries=trainer.strategy.boundaries, modules=model.num_modules,
                      module_costs_ms=[c * 1e3 for c in trainer.strategy.module_costs or []])
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def measure_pipeline(stages: int = 2, method: str = "dgl", backbone: str = "resnet32", k: int = 16,
                     batch_size: int = 64, image_size: int = 32, steps: int = 10, warmup: int = 3, threads: int = 1,
                     depth: int = 2, boundaries: list[int] | None = None, timeout_s: float = 900.0) -> dict[str, Any]:
    """One process with ``threads`` threads vs ``stages`` stage processes with ``threads`` threads each."""
    if int(stages) < 2:
        raise ConfigError("bench.pipeline", f"needs at least 2 stages, got {stages}", ">= 2")
    spec = dict(method=method, backbone=backbone, k=int(k), batch_size=int(batch_size), image_size=int(image_size),
                steps=int(steps), warmup=max(1, int(warmup)), depth=int(depth), boundaries=boundaries)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, int(stages)):
            out = Path(tmp) / f"w{world}"
            out.mkdir()
            spawn(_worker, world, (spec, str(out)), timeout_s=timeout_s, threads=int(threads))
            runs[world] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    single, pipe = runs[1][0], runs[int(stages)]
    throughput = pipe[-1]["images_per_s"]
    return {**{key: spec[key] for key in ("method", "backbone", "k", "batch_size", "image_size", "steps", "warmup",
                                          "depth")},
            "stages": int(stages), "threads_per_process": int(threads), "modules": pipe[0].get("modules"),
            "stage_boundaries": pipe[0].get("boundaries"), "module_costs_ms": pipe[0].get("module_costs_ms"),
            "single_images_per_s": single["images_per_s"], "pipeline_images_per_s": throughput,
            "speedup": throughput / single["images_per_s"] if throughput and single["images_per_s"] else None,
            # CPU seconds per batch: the speed-up the stages would reach with a core each to themselves (on a shared
            # machine the wall-clock figures measure the other jobs too)
            "cpu_speedup": (single["cpu_ms_per_batch"] / max(r["cpu_ms_per_batch"] for r in pipe))
            if single["cpu_ms_per_batch"] and all(r["cpu_ms_per_batch"] for r in pipe) else None,
            "stage_busy_fraction": [r.get("busy_fraction") for r in pipe],
            "stage_busy_ms_per_batch": [r.get("busy_ms_per_batch") for r in pipe],
            "single_cpu_ms_per_batch": single["cpu_ms_per_batch"], "single_wall_ms_per_batch": single["wall_ms_per_batch"],
            "stage_cpu_ms_per_batch": [r["cpu_ms_per_batch"] for r in pipe],
            "stage_wall_ms_per_batch": [r["wall_ms_per_batch"] for r in pipe],
            "single_peak_activation_mb": single["peak_activation_mb"],
            "stage_peak_activation_mb": [r["peak_activation_mb"] for r in pipe],
            "single_peak_rss_mb": single["peak_rss_mb"], "stage_peak_rss_mb": [r["peak_rss_mb"] for r in pipe]}


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(v, spec=".2f"):
        return "n/a" if v is None else format(v, spec)

    lines = ["| config | stages x threads | boundaries | 1 process img/s | pipeline img/s | speed-up | busy per stage "
             "| CPU ms/batch (1 proc / per stage) | CPU speed-up | activations MB (1 proc / per stage) "
             "| peak RSS MB (1 proc / per stage) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['backbone']} {r['method']} K={r['k']} batch {r['batch_size']} | {r['stages']} x "
            f"{r['threads_per_process']} | {r['stage_boundaries']} | {fmt(r['single_images_per_s'], '.1f')} | "
            f"{fmt(r['pipeline_images_per_s'], '.1f')} | {fmt(r['speedup'])}x | "
            f"{' / '.join(fmt(b) for b in r['stage_busy_fraction'])} | {fmt(r['single_cpu_ms_per_batch'], '.0f')} / "
            f"{' / '.join(fmt(c, '.0f') for c in r['stage_cpu_ms_per_batch'])} | {fmt(r['cpu_speedup'])}x | "
            f"{fmt(r['single_peak_activation_mb'], '.1f')} / "
            f"{' / '.join(fmt(m, '.1f') for m in r['stage_peak_activation_mb'])} | "
            f"{fmt(r['single_peak_rss_mb'], '.0f')} / {' / '.join(fmt(m, '.0f') for m in r['stage_peak_rss_mb'])} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], json_path: str | None, md_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2))
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text("# Module-parallel training (lla-bench --pipeline)\n\n"
                                 "Images/s where the images leave the pipeline (the last stage), after the warm-up; "
                                 "busy = share of a stage's training time not spent waiting on the transport. "
                                 "CPU ms/batch: each process's CPU time per batch after the warm-up; CPU speed-up = "
                                 "one process's / the busiest stage's, the speed-up with a core per stage to itself "
                                 "(on a shared machine the wall-clock figures also measure the other jobs). "
                                 "Activations: peak saved-for-backward bytes (lla.memory).\n\n" + markdown(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lla.bench.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("stages", type=int)
    p.add_argument("--methods", default="dgl", help="comma-separated methods, one row each")
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    rows = []
    try:
        for method in args.methods.split(","):
            rows.append(measure_pipeline(args.stages, method=method, backbone=args.backbone, k=args.k,
                                         batch_size=args.batch_size, image_size=args.image_size, steps=args.steps,
                                         warmup=args.warmup, threads=args.threads, depth=args.depth))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write(rows, args.json, args.markdown)
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    # run the importable copy, so spawned workers pickle functions by reference to lla.bench.pipeline
    from lla.bench.pipeline import main as _main

    sys.exit(_main())
