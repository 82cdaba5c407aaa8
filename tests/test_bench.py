"""lla-bench: the accounting against hand-computed sizes, local < E2E through the real engine, a stable JSON schema."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lla.bench import accounting as acc
from lla.bench import report
from lla.bench.cli import main, parse_methods
from lla.bench.memory import SavedTensorMeter, TrainingMemoryMeter
from lla.bench.targets import TARGETS, compare, find_target
from lla.errors import ConfigError

F32 = 4


# ---------------------------------------------------------------------------------------- hand-computed accounting
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_saved_bytes_match_hand_count_for_a_tiny_mlp():
    """Linear saves its input x (100x4), ReLU its output (100x8), which the second Linear saves again: counted once.
    Weights are excluded; gradients are W1 4x8 + b1 8 + W2 8x2 + b2 2 floats."""
    net, x = mlp(), torch.randn(100, 4)
    with TrainingMemoryMeter(exclude=list(net.parameters()), params=net.parameters()) as m:
        net(x).sum().backward()
    assert m.peak_bytes == (100 * 4 + 100 * 8) * F32 == 4800
    assert m.peak_grad_bytes == (4 * 8 + 8 + 8 * 2 + 2) * F32 == 232
    # W2's and b2's gradients exist while the ReLU output and x are still saved: 4800 + (16 + 2) * 4.
    assert m.peak_total_bytes == 4800 + 72
    assert m.live_bytes == 0 and m.grad_bytes == 232  # graph freed by backward, gradients still held


def test_saved_meter_counts_a_shared_storage_once_and_skips_weights():
    w = nn.Parameter(torch.randn(64, 64))
    x = torch.randn(32, 64)
    with SavedTensorMeter(exclude=[w]) as m:
        y = (x @ w) * (x @ w)  # x saved twice (two matmuls), y's factors saved by mul
    del y
    assert m.peak_bytes == 32 * 64 * F32 * 3  # x once + the two matmul outputs
    assert m.live_bytes == 0


def test_segments_separate_a_module_needs_from_what_it_inherits():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2)
    params = [*a.parameters(), *b.parameters()]
    x = torch.randn(100, 4)

    def step(free_first: bool):
        for p in params:
            p.grad = None
        with TrainingMemoryMeter(exclude=params, params=params) as m:
            m.begin_segment(0)
            h = a(x)
            loss0 = h.pow(2).sum()
            if free_first:
                loss0.backward()
            m.end_segment()
            m.begin_segment(1)
            b(h.detach()).sum().backward()
            m.end_segment()
        return m.segments

    s0, s1 = step(free_first=True)
    assert (s0.activation_bytes, s0.carried_activation_bytes) == ((100 * 4 + 100 * 8) * F32, 0)
    assert (s1.activation_bytes, s1.carried_activation_bytes) == (100 * 8 * F32, 0)
    assert s1.carried_grad_bytes == (4 * 8 + 8) * F32  # module 0 never stepped here, so its gradients remain
    _, leaky = step(free_first=False)  # module 0's graph still alive when module 1 starts
    assert leaky.carried_activation_bytes == 4800


def test_parameter_and_optimizer_accounting():
    bn = nn.BatchNorm1d(8)  # weight, bias, running mean/var (fp32) + num_batches_tracked (int64)
    assert acc.parameter_bytes(bn) == 4 * 8 * F32 + 8
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    assert acc.optimizer_state_bytes(opt) == 0  # SGD allocates momentum at the first step
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert acc.optimizer_state_bytes(opt) == acc.parameter_bytes(net) == 232
    t = torch.zeros(10)
    assert acc.storage_bytes([t, t[:5], t.view(2, 5)]) == 40
    assert acc.lower_bound_bytes(100, 50, 7) == 157 and acc.peak_total_bytes(100, 50, 9) == 159
    assert acc.ratio(1, 0) is None and acc.ratio(None, 2) is None and acc.ratio(1, 4) == 0.25
    assert acc.largest_span_grad_bytes([1, 5, 2, 4], [1, 1, 1, 1]) == 5  # isolated: the largest module
    assert acc.largest_span_grad_bytes([1, 5, 2, 4], [1, 2, 2, 2]) == 7  # a span-2 cascade holds two at once


# --------------------------------------------------------------------------------------- through the real engine
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One CLI invocation: E2E and DGL K=4 on a tiny resnet20 at 16x16, plus a method that does not exist."""
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "r.json", "markdown": out / "r.md", "plot": out / "r.png"}
    threads = torch.get_num_threads()  # lla-bench sets the process-wide thread count; give it back afterwards
    try:
        with pytest.raises(SystemExit) as stop:
            main(["--methods", "dgl,nosuchmethod", "--backbone", "resnet20", "--k", "4", "--batch-size", "8",
                  "--image-size", "16", "--steps", "1", "--warmup", "1", "--device", "cpu", "--threads", "1",
                  "--json", str(paths["json"]), "--markdown", str(paths["markdown"]), "--plot", str(paths["plot"])])
    finally:
        torch.set_num_threads(threads)
    assert stop.value.code == 0  # a missing method is a note, not a failure
    return json.loads(paths["json"].read_text()), paths


def rows_by_method(payload):
    return {r["method"]: r for r in payload["rows"]}


def test_local_method_peak_activation_below_e2e_on_4_module_net(bench_run):
    payload, _ = bench_run
    rows = rows_by_method(payload)
    assert set(rows) == {"e2e", "dgl"}  # e2e added automatically for the ratios
    e2e, dgl = rows["e2e"], rows["dgl"]
    assert (e2e["modules"], dgl["modules"], dgl["segments"]) == (1, 4, 4)
    assert dgl["peak_activation_bytes"] < 0.6 * e2e["peak_activation_bytes"]
    assert dgl["activation_vs_e2e"] == pytest.approx(dgl["peak_activation_bytes"] / e2e["peak_activation_bytes"])
    # The engine frees each module's graph and gradients before the next module runs.
    assert dgl["carried_activation_bytes"] == 0 and dgl["carried_grad_bytes"] == 0
    assert dgl["peak_grad_bytes"] == dgl["largest_span_grad_bytes"]
    assert dgl["total_vs_lower_bound"] <= 1.15
    assert dgl["optimizer_state_bytes"] > 0 and dgl["step_time_s"] > 0 and dgl["cuda_max_allocated_bytes"] is None
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # the meter left no hooks behind


def test_e2e_activation_equals_a_plain_forward_backward(bench_run):
    """The engine's E2E step saves exactly what head(backbone(x)) + CE saves: no extra tensors kept."""
    from lla.backbones import build_backbone

    payload, _ = bench_run
    net = build_backbone("resnet20", 10)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with SavedTensorMeter(exclude=[*net.parameters(), *net.buffers()]) as m:
        F.cross_entropy(net(x), y).backward()
    assert rows_by_method(payload)["e2e"]["peak_activation_bytes"] == m.peak_bytes


def test_outputs_and_skip_note(bench_run):
    payload, paths = bench_run
    assert [s["reason"].split(":")[0] for s in payload["skipped"]] == ["not available"]
    md = paths["markdown"].read_text()
    assert "| dgl |" in md and "nosuchmethod" in md and "R32 InfoPro+MAN" in md
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_json_schema_is_stable(bench_run):
    payload, _ = bench_run
    assert payload["schema"] == "lla-bench/1"
    assert list(payload) == ["schema", "environment", "rows", "checks", "skipped"]
    required = ["method", "base", "backbone", "k", "modules", "batch_size", "image_size", "peak_activation_bytes",
                "peak_total_bytes", "lower_bound_bytes", "cuda_max_allocated_bytes", "step_time_s"]
    pinned = [
        "method", "base", "options", "backbone", "k", "modules", "boundaries", "batch_size", "image_size",
        "num_classes", "precision", "channels_last", "device", "threads", "param_bytes", "optimizer_state_bytes",
        "peak_activation_bytes", "peak_grad_bytes", "largest_span_grad_bytes", "peak_total_bytes",
        "largest_module_activation_bytes", "lower_bound_bytes", "carried_activation_bytes", "carried_grad_bytes",
        "segments", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes", "step_time_s", "images_per_s",
        "timed_steps", "warmup_steps", "activation_vs_e2e", "total_vs_e2e", "cuda_allocated_vs_e2e", "time_vs_e2e",
        "total_vs_lower_bound", "grad_peak_vs_largest_span", "target", "target_activation_mib",
        "target_step_time_s", "target_activation_vs_e2e", "activation_vs_target", "time_vs_target",
        "activation_ok", "activation_goal", "time_ok", "time_goal"]
    assert list(report.ROW_KEYS) == pinned
    for row in payload["rows"]:
        assert list(row) == pinned
        assert set(required) <= set(row)
    assert {"check", "row", "value", "limit", "passed", "note"} == set(payload["checks"][0])


# ------------------------------------------------------------------------------------------------ targets and CLI
def fake_row(**kw):
    row = {"method": "man", "base": "infopro", "backbone": "resnet32", "modules": 15, "batch_size": 64,
           "image_size": 32, "precision": "32-true", "channels_last": False, "device": "cpu", "threads": 2,
           "peak_activation_bytes": int(60 * 2**20), "step_time_s": 0.9, "time_vs_e2e": 5.7}
    row.update(kw)
    return row


def test_targets_match_by_real_module_count_and_flag_pass_fail():
    t = find_target(fake_row())
    assert t is not None and t.label.startswith("R32 InfoPro+MAN")
    cmp = compare(fake_row(), t)
    assert cmp["activation_ok"] and cmp["activation_goal"]  # 60 MiB <= 0.8 x 80.3
    # step / E2E: 5.7 here against the reference's 0.93 / 0.15 = 6.2 -> 0.92x: never worse, but not 0.8x
    assert cmp["time_vs_target"] == pytest.approx(5.7 / (0.93 / 0.15))
    assert cmp["time_ok"] and not cmp["time_goal"]
    assert compare(fake_row(time_vs_e2e=4.9), t)["time_goal"]  # 0.79x
    assert compare(fake_row(threads=8), t)["time_ok"] is None  # timings only compare on the references' setup
    assert compare(fake_row(time_vs_e2e=None), t)["time_ok"] is None  # no E2E beside it: nothing to normalise by
    e2e = find_target(fake_row(method="e2e", base=None, modules=1, backbone="resnet110"))
    assert compare(fake_row(peak_activation_bytes=int(515.84 * 2**20)), e2e)["activation_ok"]  # 515.8 printed
    assert not compare(fake_row(peak_activation_bytes=int(515.86 * 2**20)), e2e)["activation_ok"]
    assert find_target(fake_row(base="dgl")) is None
    assert find_target(fake_row(precision="bf16-mixed")) is None
    assert find_target(fake_row(method="e2e", base=None, modules=1)).activation_mib == 151.8
    assert len({t.label for t in TARGETS}) == len(TARGETS)


def test_parse_methods():
    assert parse_methods("e2e, man:base=dgl:ema_momentum=0.99") == [
        ("e2e", ()), ("man", (("base", "dgl"), ("ema_momentum", 0.99)))]
    with pytest.raises(ConfigError):
        parse_methods("man:base")


def test_unknown_backbone_is_a_config_error():
    from lla.bench.runner import BenchConfig, build_model

    with pytest.raises(ConfigError, match="backbone"):
        build_model(BenchConfig("e2e", "resnet33", 4, 8, 16))


def test_bad_flag_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--methods", "e2e", "--precision", "fp8", "--device", "cpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: precision:")


def test_fp16_bench_row_needs_cuda():
    # On a CPU Lightning swaps 16-mixed for bf16-mixed with a warning: the row would be mislabelled.
    from lla.bench.runner import BenchConfig, check_config

    with pytest.raises(ConfigError, match="CUDA"):
        check_config(BenchConfig("e2e", "resnet20", 4, 8, 16, precision="16-mixed"), torch.device("cpu"))


def test_interleaved_timing_normalises_by_the_e2e_beside_it(tmp_path):
    """Every method's step is timed in turn with E2E's; ratios are against that E2E and the reference's ratio."""
    from lla.bench.interleaved import main as interleaved_main

    out = tmp_path / "i.json"
    threads = torch.get_num_threads()
    try:
        code = interleaved_main(["--methods", "dgl,man", "--backbone", "resnet20", "--k", "8", "--batch-size", "8",
                                 "--image-size", "16", "--rounds", "2", "--threads", "1", "--device", "cpu",
                                 "--options", "aux_checkpoint=true", "--json", str(out),
                                 "--markdown", str(tmp_path / "i.md")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["e2e", "dgl", "man"]
    assert rows["e2e"]["time_vs_e2e"] == 1.0 and "aux_checkpoint" not in rows["e2e"]["options"]
    assert rows["man"]["options"]["aux_checkpoint"] is True and rows["man"]["modules"] > 1
    for r in rows.values():
        assert len(r["step_times_s"]) == 2
        assert r["time_vs_e2e"] == pytest.approx(r["step_time_s"] / rows["e2e"]["step_time_s"])
    assert f"| man | base=infopro,aux_checkpoint=True | {rows['man']['modules']} |" in (tmp_path / "i.md").read_text()


def test_interleaved_channels_last_keeps_a_plain_nchw_e2e_as_the_yardstick():
    from lla.bench.interleaved import measure
    from lla.bench.runner import BenchConfig

    rows = measure([BenchConfig("e2e", "resnet20", 4, 4, 16), BenchConfig("dgl", "resnet20", 4, 4, 16)],
                   rounds=1, warmup=0, device="cpu", channels_last=True)
    assert [(r["method"], r["channels_last"]) for r in rows] == [("e2e", False), ("e2e", True), ("dgl", True)]
    plain, nhwc, dgl = (r["step_time_s"] for r in rows)
    assert rows[2]["time_vs_e2e"] == pytest.approx(dgl / nhwc)
    assert rows[2]["time_vs_plain_e2e"] == pytest.approx(dgl / plain)


# ---------------------------------------------------------------------------------------------------- make gpu-check
def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path):
    """`python -m lla.bench.gpu --dry-run`: the gpu-check code path on the CPU (gpu tests collected and skipped,
    real engine steps, E2E ratios), writing the files `make gpu-check` writes."""
    from lla.bench import gpu

    with pytest.raises(SystemExit) as done:
        gpu.main(["--dry-run", "--out", str(tmp_path), "--methods", "e2e,dgl", "--precisions", "32-true",
                  "--nets", "cifar"])
    assert done.value.code == 0
    payload = json.loads((tmp_path / "gpu.json").read_text())
    tests = payload["gpu_tests"]
    assert tests["passed"] and "skipped" in tests["summary"] and tests["exit_code"] == 0, tests
    assert int(tests["summary"].split(" skipped")[0].split()[-1]) >= 50  # collected, then skipped: no CUDA here
    rows = payload["rows"]
    assert [(r["method"], r["backbone"], r["precision"]) for r in rows] == [("e2e", "resnet20", "32-true"),
                                                                            ("dgl", "resnet20", "32-true")]
    for r in rows:
        assert r["step_time_s"] > 0 and r["images_per_s"] == pytest.approx(r["batch_size"] / r["step_time_s"])
        assert r["cuda_max_allocated_bytes"] is None and r["peak_total_bytes"] > 0  # CPU: no CUDA figures
    assert rows[0]["time_vs_e2e"] == 1.0
    assert rows[1]["time_vs_e2e"] == pytest.approx(rows[1]["step_time_s"] / rows[0]["step_time_s"])
    md = (tmp_path / "gpu.md").read_text()
    assert "Dry run" in md and "| dgl | 8 |" in md and "reserved / E2E" in md


def test_gpu_check_needs_cuda_or_dry_run_and_keeps_its_time_budget(tmp_path, capsys):
    from lla.bench import gpu

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as done:
            gpu.main(["--out", str(tmp_path)])
        assert done.value.code == 2
        assert capsys.readouterr().err.strip().startswith("error: device: make gpu-check needs a CUDA device")
    with pytest.raises(SystemExit) as done:
        gpu.main(["--dry-run", "--skip-tests", "--budget-s", "0", "--out", str(tmp_path)])
    assert done.value.code == 1  # rows were left out: not a clean check
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert payload["rows"] == [] and len(payload["skipped"]) == 2 * 2 * 6
    assert all("time budget" in s["reason"] for s in payload["skipped"])
