"""``make demo``: train every method with ResNet-32 on scikit-learn's digits (offline, CPU) and print one table.

Each run goes through the same Hydra configs and ``lla.cli.train`` as ``python run.py``; results land in
``outputs/demo/<method>/results.json`` and the table in ``outputs/demo/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lla.cli import CONF_DIR, train

# (label, overrides). K=8 keeps ResNet-32's 16 layers in 2-layer modules, so every method fits the time budget;
# pass --k to change it.
RUNS: list[tuple[str, list[str]]] = [
    ("e2e", ["method=e2e"]),
    ("dgl", ["method=dgl"]),
    ("infopro", ["method=infopro"]),
    ("auglocal", ["method=auglocal"]),
    ("dgl+man", ["method=man", "method.base=dgl"]),
    ("infopro+man", ["method=man", "method.base=infopro"]),
    ("dgl+mlaan", ["method=mlaan", "method.base=dgl"]),
    ("infopro+mlaan", ["method=mlaan", "method.base=infopro"]),
]


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as under run.py
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def format_table(rows: list[dict]) -> str:
    head = "| method | K | modules | test acc | peak activation MB | step time s |\n|---|---|---|---|---|---|\n"
    lines = [
        f"| {r['label']} | {r['k_label']} | {r['modules']} | {100 * (r['val_acc_best'] or 0):.1f}% | "
        f"{r['peak_activation_mb']:.1f} | {r['step_time_s'] or float('nan'):.3f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8, help="nominal K for the local methods")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per method (the digits recipe says 15)")
    ap.add_argument("--image-size", type=int, default=16, help="side of the resized digits (8x8 originals)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of: " + ",".join(r[0] for r in RUNS))
    ap.add_argument("--out", default="outputs/demo")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    logging.getLogger("lla").setLevel(logging.WARNING)

    wanted = set(args.methods.split(",")) if args.methods else None
    rows = []
    t0 = time.time()
    for label, extra in RUNS:
        if wanted and label not in wanted:
            continue
        overrides = ["dataset=digits", f"dataset.image_size={args.image_size}", "backbone=resnet32", f"k={args.k}",
                     "logger=none",
                     "trainer.enable_progress_bar=false", *extra]
        if args.epochs:
            overrides += [f"trainer.max_epochs={args.epochs}", f"optim.warmup_epochs={min(3, args.epochs // 4)}"]
        cfg, choices = compose_run(overrides)
        print(f"[demo] {label}: training ({' '.join(extra)}) ...", flush=True)
        result = train(cfg, Path(args.out) / label, choices, overrides)
        result["label"] = label
        rows.append(result)
        print(f"[demo] {label}: best test acc {100 * (result['val_acc_best'] or 0):.1f}% "
              f"({result['modules']} modules, {result['train_time_s']:.0f} s)", flush=True)
    table = format_table(rows)
    size = f"{args.image_size}x{args.image_size}"
    print(f"\nResNet-32 on digits (1,437 train / 360 test images, {size}), CPU, {time.time() - t0:.0f} s in all\n")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(
        [{k: r[k] for k in ("label", "k_label", "modules", "val_acc_best", "peak_activation_mb", "step_time_s")}
         for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
