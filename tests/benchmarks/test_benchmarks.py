"""The benchmarks run, check correctness and write their reports.

benchmarks/compare_eager_vs_compile.py in its smallest configuration (LeNet, eager arms,
two short rounds) takes seconds; the compiled arms are exercised by tests/test_compile.py.
benchmarks/optimizer_update.py runs two rounds per optimiser.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("compare_eager_vs_compile")


@pytest.fixture(scope="module")
def optimizer_bench():
    return _load("optimizer_update")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_optimizer_update_benchmark_checks_its_sides_agree(optimizer_bench, name):
    row = optimizer_bench.bench(name, torch.device("cpu"), repeats=2, warmup=1)
    assert row["steps"] == 3
    # Adam, AdamW and Adagrad run torch's fused kernels: fused=True's step to the bit.
    # RMSprop runs foreach's kernels (torch has no fused RMSprop). SGD's momentum buffer is
    # one kernel where torch runs two: last-bit differences from both.
    if name in ("adam", "adamw", "adagrad"):
        assert row["max_abs_param_diff_vs_fused"] == 0.0
        assert row["max_abs_param_diff_vs_foreach"] < 1e-6
    elif name == "rmsprop":
        assert row["max_abs_param_diff_vs_foreach"] == 0.0
        assert "torch_fused_ms" not in row
    else:
        assert max(row["max_abs_param_diff_vs_foreach"], row["max_abs_param_diff_vs_fused"]) < 1e-6
    assert row["ratio"] == pytest.approx(row["functional_ms"] / row["torch_foreach_ms"])


def test_quickest_run_writes_table_json_and_chart(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--models", "lenet", "--arms", "3,5", "--warmup", "1", "--rounds", "2", "--steps", "2"]
    report = bench.main([*argv, "--out", str(out), "--batch", "8"])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "functional" in capsys.readouterr().out
    rows = {row["arm_name"]: row for row in report["results"]}
    assert set(rows) == {"module", "functional", "functional+donate"}
    for row in rows.values():
        assert row["steps"] == 1 + 2 * 2 + 1  # warmup, timed rounds, the memory step
        assert row["step_ms_q1"] <= row["step_ms_median"] <= row["step_ms_q3"]
        assert row["diff_after_steps"] == 1
        assert row["images_per_s"] == pytest.approx(8 / (row["step_ms_median"] / 1e3))
        # A step allocates (at least its gradients) and its peak is part of that.
        assert 0 < row["peak_step_mem_mb"] <= row["step_alloc_mb"]
    # The correctness check inside the benchmark: the same weights after the warm-up step.
    assert rows["functional"]["max_abs_param_diff_vs_arm1"] < 1e-5
    assert rows["functional+donate"]["max_abs_param_diff_vs_arm1"] < 1e-5
    # The pure step allocates new params and momentum buffers; donated, it writes in place.
    allocated = {name: row["step_alloc_mb"] for name, row in rows.items()}
    assert allocated["functional+donate"] < allocated["functional"]
    ratio = report["ratios"]["lenet/float32"]["functional_eager_time_over_module_eager"]
    assert ratio == pytest.approx(
        rows["functional"]["step_ms_median"] / rows["module"]["step_ms_median"]
    )


def test_defaults_and_bad_arguments(bench):
    quick = bench.parse_args([])
    assert (quick.models, quick.dtypes, quick.label) == (
        ["lenet", "resnet18", "mobilenet_v3_small"],
        ["float32"],
        "cpu_quick",
    )
    assert quick.out.name == "compare_cpu_quick.json"
    assert bench.arms_for(quick) == [1, 2, 3, 4, 5]
    assert bench.arms_for(bench.parse_args(["--arms", "4"])) == [1, 4]
    full = bench.parse_args(["--full"])
    assert (full.models, full.dtypes) == (list(bench.MODELS), ["float32", "bf16"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "alexnet"])


def test_sharded_benchmark_counts_the_bytes_of_tensors_ops_create():
    peak_tensor_bytes = _load("sharded").PeakTensorBytes
    before = torch.ones(1024)  # made before the counter: what the caller adds itself
    with peak_tensor_bytes() as counter:
        a = before * 2  # 4 KiB, new
        view = a[1:]  # a view: no new storage
        a.mul_(3)  # in place: none either
        b = a + 1  # 4 KiB more: 8 KiB live
        del a, view, b  # all freed
        c = torch.empty(256, dtype=torch.float64)  # 2 KiB
    assert (counter.peak, counter.live) == (8192, 2048)
    assert c.numel() == 256
