"""lla-report: results.json files -> paper-style tables (Markdown, CSV) and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lla.report import build_tables, load_runs, main, markdown, report

PNG = b"\x89PNG\r\n\x1a\n"


def write_result(root: Path, name: str, *, method: str, acc: float, k: int = 4, seed: int = 0,
                 dataset: str = "cifar10", backbone: str = "resnet32", label: str | None = None, modules: int | None = None,
                 final: float | None = None, memory: float = 100.0, method_opts: dict | None = None,
                 epochs: int = 400) -> Path:
    """A results.json shaped like lla.cli.train writes it."""
    folder = root / name
    folder.mkdir(parents=True)
    modules = modules if modules is not None else (1 if method == "e2e" else k)
    config = {"k": k, "seed": seed, "label": label, "mode": "train",
              "optim": {"lr": 0.8, "momentum": 0.9}, "trainer": {"max_epochs": epochs, "enable_progress_bar": False},
              "dataset": {"_target_": "lla.data.X", "root": f"/data/{seed}", "batch_size": 1024, "seed": seed},
              "backbone": {"_target_": "lla.backbones.build_backbone", "name": backbone},
              "method": {"_target_": f"lla.methods.{method}.X", **(method_opts or {})},
              "logger": {"project": "lla", "save_dir": str(folder)}}
    result = {"method": method, "backbone": backbone, "dataset": dataset, "modules": modules, "seed": seed,
              "k_label": k, "val_acc": acc if final is None else final, "val_acc_best": acc,
              "peak_activation_mb": memory, "peak_cuda_mb": None, "train_time_s": 10.0 * modules, "config": config}
    (folder / "results.json").write_text(json.dumps(result))
    return folder


@pytest.fixture()
def runs_dir(tmp_path):
    root = tmp_path / "multirun"
    for seed, (a2, a4) in enumerate([(0.90, 0.88), (0.92, 0.86)]):
        write_result(root, f"dgl{seed}k2", method="dgl", label="DGL", k=2, seed=seed, acc=a2, memory=60)
        write_result(root, f"dgl{seed}k4", method="dgl", label="DGL", k=4, seed=seed, acc=a4, memory=40)
        write_result(root, f"ip{seed}k2", method="infopro", label="InfoPro (contrast)", k=2, seed=seed,
                     acc=a2 + 0.02, memory=70)
    write_result(root, "ip0k4", method="infopro", label="InfoPro (contrast)", k=4, acc=0.91, memory=45)
    write_result(root, "e2e0", method="e2e", label="E2E", k=1, acc=0.93, memory=120)
    write_result(root, "e2e1", method="e2e", label="E2E", k=1, seed=1, acc=0.95, memory=120)
    for m, acc in ((0.9, 0.80), (0.99, 0.85), (0.999, 0.83)):  # an EMA-momentum sweep of InfoPro+MAN at K=4
        write_result(root, f"man{m}", method="man", k=4, acc=acc, memory=50,
                     method_opts={"base": "infopro", "ema_momentum": m})
    return root


def test_tables_hold_mean_and_std_over_seeds(runs_dir):
    runs = load_runs([runs_dir])
    assert len(runs) == 12
    (table,) = build_tables(runs)  # one backbone, one dataset -> columns are K
    assert table.column_names == ["K=2", "K=4"]
    rows = {r[0]: r[1:] for r in _md_rows(markdown([table]))}
    assert rows["DGL"] == ["91.00 ± 1.41 (n=2)", "87.00 ± 1.41 (n=2)"]
    assert rows["InfoPro (contrast)"] == ["93.00 ± 1.41 (n=2)", "91.00"]
    assert rows["E2E"] == ["94.00 ± 1.41 (n=2)"] * 2  # E2E has no K: under every K
    # runs that differ by more than the seed get their own rows, named by the differing key
    assert rows["infopro+man [ema_momentum=0.99]"] == ["", "85.00"]
    assert list(rows)[:2] == ["E2E", "DGL"]


def test_error_and_final_epoch_metrics(runs_dir):
    (table,) = build_tables(load_runs([runs_dir]), metric="best", error=True)
    assert dict((r[0], r[1:]) for r in _md_rows(markdown([table])))["DGL"][0] == "9.00 ± 1.41 (n=2)"
    write_result(runs_dir, "late", method="dgl", label="late", k=2, acc=0.9, final=0.5)
    (table,) = build_tables([r for r in load_runs([runs_dir]) if r.base_label == "late"], metric="final")
    assert _md_rows(markdown([table]))[0][1] == "50.00"


def test_a_setting_that_differs_inside_a_cell_splits_the_row(tmp_path):
    write_result(tmp_path, "a", method="e2e", label="E2E", k=1, acc=0.90, epochs=160)
    write_result(tmp_path, "b", method="e2e", label="E2E", k=1, acc=0.94, epochs=400)
    rows = {r[0]: r[1:] for r in _md_rows(markdown(build_tables(load_runs([tmp_path]))))}
    assert rows == {"E2E [trainer.max_epochs=160]": ["90.00"], "E2E [trainer.max_epochs=400]": ["94.00"]}


def test_columns_are_dataset_x_k_when_both_vary(tmp_path):
    for ds in ("cifar10", "stl10"):
        for k in (8, 16):
            write_result(tmp_path, f"{ds}{k}", method="man", k=k, dataset=ds, acc=0.9, method_opts={"base": "dgl"})
    (table,) = build_tables(load_runs([tmp_path]))
    assert table.column_names == ["CIFAR-10 K=8", "CIFAR-10 K=16", "STL-10 K=8", "STL-10 K=16"]
    assert table.rows == ["dgl+man"]  # no label: derived from the method and its base
    by_k = build_tables(load_runs([tmp_path]), columns="dataset")
    assert [t.title.split(":")[0] for t in by_k] == ["ResNet-32, K=8", "ResNet-32, K=16"]
    assert by_k[0].column_names == ["CIFAR-10", "STL-10"]


def test_report_writes_markdown_csv_and_plots(runs_dir, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(runs_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| DGL | 91.00 ± 1.41 (n=2) | 87.00 ± 1.41 (n=2) |" in printed
    assert (out / "tables.md").read_text() in printed
    with open(out / "table_resnet32.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "K=2", "K=4"]
    assert ["DGL", "91.00 ± 1.41 (n=2)", "87.00 ± 1.41 (n=2)"] in rows
    with open(out / "summary.csv") as f:
        cells = {(r["method"], r["k"]): r for r in csv.DictReader(f)}
    assert float(cells[("DGL", "2")]["mean"]) == pytest.approx(91.0)
    assert float(cells[("DGL", "2")]["std"]) == pytest.approx(2**0.5)
    assert float(cells[("DGL", "4")]["memory_mb"]) == pytest.approx(40.0)
    for name in ("acc_vs_k.png", "acc_vs_memory.png", "acc_vs_ema_momentum.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000, name


def test_printed_summary_has_each_cells_peak_memory(runs_dir, tmp_path, capsys):
    """The researcher's summary (printed and tables.md) gives each cell's memory, not only summary.csv."""
    out = tmp_path / "report"
    main([str(runs_dir), "--out", str(out), "--no-plots"])
    printed = capsys.readouterr().out
    assert "#### ResNet-32, CIFAR-10: peak saved activations, MB, mean over seeds" in printed
    assert (out / "tables.md").read_text() in printed
    rows = {r[0]: r[1:] for r in _md_rows(printed, memory=True)}
    assert rows["DGL"] == ["60.0", "40.0"] and rows["E2E"] == ["120.0", "120.0"]
    assert rows["InfoPro (contrast)"] == ["70.0", "45.0"]
    assert {r[0]: r[1:] for r in _md_rows((out / "tables.md").read_text())}["DGL"] == ["91.00 ± 1.41 (n=2)", "87.00 ± 1.41 (n=2)"]
    # CUDA peaks win when every run of the table has one
    for folder in runs_dir.iterdir():
        result = json.loads((folder / "results.json").read_text())
        result["peak_cuda_mb"] = 2 * result["peak_activation_mb"]
        (folder / "results.json").write_text(json.dumps(result))
    md = markdown(build_tables(load_runs([runs_dir])))
    assert "peak CUDA memory (max_memory_allocated), MB" in md
    assert {r[0]: r[1:] for r in _md_rows(md, memory=True)}["DGL"] == ["120.0", "80.0"]


def test_hpff_rows_follow_the_papers_methods(tmp_path):
    """Rows: E2E, the methods in the papers' order, HPFF after MLAAN, then methods lla does not know, by label."""
    for name, method in (("a", "abc"), ("h", "hpff"), ("m", "mlaan"), ("e", "e2e")):
        write_result(tmp_path / "r", name, method=method, acc=0.9, k=1 if method == "e2e" else 4)
    (table,) = build_tables(load_runs([tmp_path / "r"]))
    assert [row.split()[0].lower() for row in table.rows] == ["e2e", "mlaan", "hpff", "abc"]


def test_no_plot_with_one_point_per_line(tmp_path):
    """One K per method: no acc-vs-K plot; one momentum: no EMA plot; two methods still make a memory plot."""
    write_result(tmp_path / "r", "a", method="dgl", acc=0.9)
    write_result(tmp_path / "r", "b", method="man", acc=0.9, method_opts={"base": "dgl", "ema_momentum": 0.995})
    result = report([tmp_path / "r"], tmp_path / "out")
    names = {Path(f).name for f in result["files"]}
    assert "acc_vs_memory.png" in names
    assert "acc_vs_k.png" not in names and "acc_vs_ema_momentum.png" not in names
    assert not (tmp_path / "out" / "acc_vs_k.png").exists()
    write_result(tmp_path / "r", "c", method="dgl", acc=0.8, k=8)  # a second K for one line: now worth a plot
    assert "acc_vs_k.png" in {Path(f).name for f in report([tmp_path / "r"], tmp_path / "out2")["files"]}


def test_summary_sorts_numeric_values_numerically(tmp_path):
    for m in (0.995, 0.9, 0.999, 0.99, 0.998):
        write_result(tmp_path / "r", f"m{m}", method="man", acc=m - 0.1, method_opts={"base": "dgl", "ema_momentum": m})
    report([tmp_path / "r"], tmp_path / "out", plots=False)
    with open(tmp_path / "out" / "summary.csv") as f:
        methods = [r["method"] for r in csv.DictReader(f)]
    assert methods == [f"dgl+man [ema_momentum={m}]" for m in ("0.9", "0.99", "0.995", "0.998", "0.999")]


def _with_status(folder: Path, status: str, **changes) -> Path:
    path = folder / "results.json"
    result = json.loads(path.read_text())
    result.update(status=status, **changes)
    path.write_text(json.dumps(result))
    return folder


def test_only_finished_runs_are_results_the_others_are_listed_apart(tmp_path, capsys):
    root = tmp_path / "r"
    write_result(root, "done0", method="dgl", acc=0.90)
    _with_status(write_result(root, "done1", method="dgl", acc=0.92, seed=1), "completed")
    _with_status(write_result(root, "stopped", method="dgl", acc=0.10, seed=2), "preempted")
    _with_status(write_result(root, "ctrlc", method="dgl", acc=0.20, seed=3), "interrupted", error="KeyboardInterrupt")
    _with_status(write_result(root, "nan", method="dgl", acc=0.30, seed=4), "diverged",
                 error="non-finite loss (nan) in method dgl, module 1")
    debug = write_result(root, "debug", method="dgl", acc=0.05, seed=5)
    result = json.loads((debug / "results.json").read_text())
    result["config"]["trainer"]["fast_dev_run"] = True
    (debug / "results.json").write_text(json.dumps(result))
    (root / "failed").mkdir()  # a job that failed before training: a short results.json
    (root / "failed" / "results.json").write_text(json.dumps(
        {"status": "failed", "error": "k: resnet20 has 10 layers", "method": "dgl", "dataset": "cifar10",
         "config": {"k": 999}}))

    main([str(root), "--out", str(tmp_path / "out"), "--no-plots"])
    printed = capsys.readouterr().out
    rows = {r[0]: r[1:] for r in _md_rows(printed.split("### Published results")[0])}
    assert rows == {"dgl": ["91.00 ± 1.41 (n=2)"]}  # the two finished seeds only
    incomplete = printed[printed.index("Incomplete runs"):]
    for name, why in (("stopped", "preempted"), ("ctrlc", "interrupted: KeyboardInterrupt"),
                      ("nan", "diverged: non-finite loss"), ("debug", "debug run"), ("failed", "failed: k: resnet20")):
        assert f"{root / name}`: {why}" in incomplete, name
    assert "5 incomplete" in printed
    everything = report([root], tmp_path / "all", plots=False, include_incomplete=True)
    assert everything["runs"] == 6 and not everything["incomplete"]  # --all: every run with an accuracy


def test_runs_with_different_settings_never_share_a_row(tmp_path):
    """A setting that changes the experiment splits the row; one that does not (logging, paths) does not."""
    a = write_result(tmp_path, "a", method="dgl", acc=0.90)
    b = write_result(tmp_path, "b", method="dgl", acc=0.80, seed=1)
    c = write_result(tmp_path, "c", method="dgl", acc=0.70, seed=2)
    for folder, changes in ((b, {"dataset": {"image_size": 24}}), (c, {"logger": {"offline": False, "group": "x"},
                                                                       "checkpoint": {"every_n_steps": 7}})):
        result = json.loads((folder / "results.json").read_text())
        for key, value in changes.items():
            result["config"].setdefault(key, {}).update(value)
        (folder / "results.json").write_text(json.dumps(result))
    rows = {r[0]: r[1:] for r in _md_rows(markdown(build_tables(load_runs([tmp_path]))))}
    assert rows == {"dgl [dataset.image_size=None]": ["80.00 ± 14.14 (n=2)"], "dgl [dataset.image_size=24]": ["80.00"]}
    assert a.is_dir()


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        report([tmp_path], tmp_path / "out")


def _md_rows(md: str, memory: bool = False) -> list[list[str]]:
    """Body rows of the Markdown accuracy tables (header and separator skipped); ``memory``: of the memory tables."""
    rows, in_memory = [], False
    for line in md.splitlines():
        if line.startswith("#"):
            in_memory = line.startswith("#### ")
        elif line.startswith("| ") and not line.startswith("| method") and in_memory == memory:
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows
