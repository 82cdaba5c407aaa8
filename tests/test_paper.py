"""The papers' published numbers beside ours: lla/paper.py and ``lla-report --check`` on generated results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lla.paper import compare, load_published, markdown
from lla.report import load_runs, main
from tests.test_report import write_result

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = """
published:
  - {label: InfoPro, backbone: resnet32, dataset: cifar10, k: 4, top1_error: 10.0, source: "Paper, Table 1"}
  - {label: E2E, backbone: resnet32, dataset: cifar10, k: null, accuracy: 93.0, source: "README", unverified: true}
  - {label: DGL, backbone: resnet32, dataset: cifar10, k: 4, top1_error: 12.0, source: "Paper, Table 1"}
"""


def result(root, name, *, status="completed", **kw):
    folder = write_result(root, name, **kw)
    path = folder / "results.json"
    data = json.loads(path.read_text())
    data["status"] = status
    path.write_text(json.dumps(data))
    return folder


@pytest.fixture()
def experiments(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "table1.yaml").write_text("# @package _global_\n" + PUBLISHED)
    return tmp_path / "exp"


def run_report(runs, experiments, *args):
    """lla-report <runs> --no-plots <args> against the test's experiments folder; the exit code."""
    import lla.paper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lla.paper, "EXPERIMENTS", experiments)
        try:
            main([str(runs), "--out", str(runs.parent / "report"), "--no-plots", *args])
        except SystemExit as err:
            return err.code
    return 0


def test_rows_show_mean_std_paper_diff_and_seeds(tmp_path, experiments, capsys):
    runs = tmp_path / "runs"
    result(runs, "ip0", method="infopro", label="InfoPro", k=4, seed=0, acc=0.89)
    result(runs, "ip1", method="infopro", label="InfoPro", k=4, seed=1, acc=0.91)
    result(runs, "e2e", method="e2e", label="E2E", k=1, acc=0.94)
    rows = {r.label: r for r in compare(load_runs([runs], include_incomplete=True), load_published(experiments))}
    assert rows["InfoPro"].mean == pytest.approx(90.0) and rows["InfoPro"].n == 2
    assert rows["InfoPro"].std == pytest.approx(1.4142, abs=1e-4)
    assert rows["InfoPro"].published.accuracy == 90.0 and rows["InfoPro"].diff == pytest.approx(0.0)
    assert rows["E2E"].diff == pytest.approx(1.0)  # k: null matches E2E whatever K it records
    text = markdown(list(rows.values()))
    assert "| InfoPro | resnet32 | cifar10 | 4 | 90.00 ± 1.41 | 90.00 | +0.00 | 2 | Paper, Table 1 |" in text
    assert "| E2E | resnet32 | cifar10 | 1 | 94.00 | 93.00 | +1.00 | 1 | README (unverified) |" in text
    err = markdown(list(rows.values()), error=True)
    assert "| E2E | resnet32 | cifar10 | 1 | 6.00 | 7.00 | -1.00 | 1 |" in err
    assert run_report(runs, experiments) == 0
    assert "| InfoPro | resnet32 | cifar10 | 4 | 90.00 ± 1.41 | 90.00 | +0.00 | 2 |" in capsys.readouterr().out
    assert (tmp_path / "report" / "paper.md").is_file()


def test_check_fails_on_a_finished_row_below_its_margin(tmp_path, experiments, capsys):
    runs = tmp_path / "runs"
    result(runs, "ip", method="infopro", label="InfoPro", k=4, acc=0.885)  # paper 90.0: 1.5 points below
    result(runs, "e2e", method="e2e", label="E2E", k=1, acc=0.93)  # on the paper
    assert run_report(runs, experiments, "--check") == 1  # default margin 1.0
    out = capsys.readouterr().out
    assert "InfoPro resnet32 cifar10 K=4: 88.50 is 1.50 points below the paper's 90.00" in out
    assert out.count("points below the paper's") == 1  # E2E, on its paper value, passes
    assert run_report(runs, experiments, "--check", "--margin", "2") == 0  # within a wider margin
    assert run_report(runs, experiments) == 0  # without --check nothing fails


def test_check_passes_finished_rows_within_the_margin_and_ignores_unfinished_ones(tmp_path, experiments):
    runs = tmp_path / "runs"
    result(runs, "ip", method="infopro", label="InfoPro", k=4, acc=0.895)  # 0.5 below: within 1.0
    result(runs, "dgl", method="dgl", label="DGL", k=4, acc=0.50, status="preempted")  # far below, not finished
    result(runs, "dgl2", method="dgl", label="DGL", k=4, seed=1, acc=0.40, status="diverged")
    assert run_report(runs, experiments, "--check") == 0
    rows = {r.label: r for r in compare(load_runs([runs], include_incomplete=True), load_published(experiments))}
    assert not rows["DGL"].finished and rows["DGL"].unfinished == 2
    assert "| DGL | resnet32 | cifar10 | 4 | unfinished | 88.00 |  | 0 |" in markdown(list(rows.values()))
    # a finished seed next to an unfinished one: the row counts, with the finished seed only
    result(runs, "dgl3", method="dgl", label="DGL", k=4, seed=2, acc=0.86)
    assert run_report(runs, experiments, "--check") == 1
    rows = {r.label: r for r in compare(load_runs([runs], include_incomplete=True), load_published(experiments))}
    assert (rows["DGL"].n, rows["DGL"].mean) == (1, pytest.approx(86.0))


def test_every_experiment_carries_a_published_list_with_sources():
    files = sorted((ROOT / "experiments").glob("*.yaml"))
    published = load_published(ROOT / "experiments")
    for path in files:
        assert "\npublished:" in path.read_text(), path.name
    assert published, "at least the InfoPro ImageNet rows are known"
    for p in published:
        assert p.source and p.accuracy is not None
        if any(word in p.source for word in ("README", "summary", "repository", "note")):  # not the paper itself
            assert p.unverified, p
    readme = {(p.backbone, round(100 - p.accuracy, 2)) for p in published
              if p.label == "InfoPro*" and p.dataset == "imagenet"}
    assert readme == {("resnet101", 21.85), ("resnet152", 21.45), ("resnext101_32x8d", 20.35)}


def two_papers(tmp_path):
    """Two experiments that publish the same (label, backbone, dataset, K) with different values, told apart by
    ``where``."""
    exp = tmp_path / "exp2"
    exp.mkdir()
    (exp / "a.yaml").write_text("""published:
  - {label: DGL, backbone: resnet32, dataset: cifar10, k: 16, top1_error: 14.0, where: {method.head: man},
     source: "A, Table 1"}
  - {label: E2E, backbone: resnet32, dataset: cifar10, k: null, top1_error: 6.0, where: {trainer.max_epochs: 400},
     source: "A, Table 1"}
""")
    (exp / "b.yaml").write_text("""published:
  - {label: DGL, backbone: resnet32, dataset: cifar10, k: 16, top1_error: 20.0, where: {method.head: official},
     source: "B, Table 2"}
  - {label: E2E, backbone: resnet32, dataset: cifar10, k: null, top1_error: 7.0, where: {trainer.max_epochs: 160},
     source: "B, Table 2"}
""")
    return exp


def test_where_picks_each_papers_row_by_the_runs_config(tmp_path):
    exp = two_papers(tmp_path)
    published = load_published(exp)
    man, official, mixed = tmp_path / "man", tmp_path / "official", tmp_path / "mixed"
    result(man, "dgl", method="dgl", label="DGL", k=16, acc=0.86, method_opts={"head": "man"})
    result(man, "e2e", method="e2e", label="E2E", k=1, acc=0.94, epochs=400)
    result(official, "dgl", method="dgl", label="DGL", k=16, acc=0.80, method_opts={"head": "official"})
    result(official, "e2e", method="e2e", label="E2E", k=1, acc=0.93, epochs=160)
    rows = {r.label: r for r in compare(load_runs([man]), published)}
    assert rows["DGL"].published.source == "A, Table 1" and rows["DGL"].published.accuracy == 86.0
    assert rows["E2E"].published.accuracy == 94.0
    rows = {r.label: r for r in compare(load_runs([official]), published)}
    assert rows["DGL"].published.source == "B, Table 2" and rows["DGL"].diff == pytest.approx(0.0)
    assert rows["E2E"].published.accuracy == 93.0
    # seeds of one row with different heads match neither paper's where
    result(mixed, "m", method="dgl", label="DGL", k=16, acc=0.86, method_opts={"head": "man"})
    result(mixed, "o", method="dgl", label="DGL", k=16, seed=1, acc=0.80, method_opts={"head": "official"})
    assert compare(load_runs([mixed]), published)[0].published is None


def test_paper_flag_compares_with_one_experiment_only(tmp_path, capsys):
    exp = two_papers(tmp_path)
    runs = tmp_path / "runs"
    result(runs, "dgl", method="dgl", label="DGL", k=16, acc=0.86, method_opts={"head": "man"})
    assert run_report(runs, exp, "--check") == 0
    assert "| DGL | resnet32 | cifar10 | 16 | 86.00 | 86.00 | +0.00 | 1 | A, Table 1 |" in capsys.readouterr().out
    assert run_report(runs, exp, "--paper", "b") == 0  # b publishes no row for MAN's head
    assert "| DGL | resnet32 | cifar10 | 16 | 86.00 |  |  | 1 |  |" in capsys.readouterr().out
    assert run_report(runs, exp, "--paper", str(exp / "a.yaml")) == 0
    assert "| 86.00 | +0.00 | 1 | A, Table 1 |" in capsys.readouterr().out
    assert run_report(runs, exp, "--paper", "nope") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --paper: no experiment 'nope'; allowed: a, b"


def test_published_entries_name_real_rows_once():
    """Every entry's label, backbone and dataset exist in conf/, no experiment lists a row twice, and a value
    marked as read from the paper cites its arXiv id and table."""
    labels = {yaml.safe_load(p.read_text()).get("label") for p in (ROOT / "conf" / "row").glob("*.yaml")}
    backbones = {p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml")}
    datasets = {p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml")}
    seen = set()
    for p in load_published(ROOT / "experiments"):
        assert p.label in labels and p.backbone in backbones and p.dataset in datasets, p
        key = (p.experiment, p.label, p.backbone, p.dataset, p.k, p.where)
        assert key not in seen, p
        seen.add(key)
        assert all(k.split(".")[0] in {"method", "trainer", "dataset", "optim"} for k, _ in p.where), p
        if not p.unverified:
            assert "arXiv" in p.source and "Table" in p.source, p


def test_rows_without_any_published_value_print_one_line_not_an_empty_table(tmp_path, experiments, capsys):
    runs = tmp_path / "runs"
    result(runs, "digits", method="dgl", label="DGL", k=4, dataset="digits", acc=0.9)  # no paper has digits
    assert run_report(runs, experiments) == 0
    out = capsys.readouterr().out
    assert "no published value matches these rows" in out and "Published results beside ours" not in out
    assert "| DGL | resnet32 | digits | 4 | 90.00 |" in (runs.parent / "report" / "paper.md").read_text()  # kept
