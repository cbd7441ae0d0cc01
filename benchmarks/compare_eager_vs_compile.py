"""Eager vs compiled, ``nn.Module`` vs functional: six ways to train the same network.

The six arms run on the same model, the same initial weights, the same batches and the
same optimiser (SGD, lr 0.01, momentum 0.9, weight decay 5e-4):

1. ``module``          ``nn.Module`` + ``torch.optim.SGD(foreach=True)``, eager: what the
                       diaries write (``zero_grad(); loss.backward(); opt.step()``);
2. ``module+compile``  ``torch.compile(module)`` + a compiled ``opt.step()``: what a user
                       would pick instead (PyTorch's own recipe);
3. ``functional``      ``make_train_step(..., compile=False)``: one pure step, eager;
4. ``functional+compile``  the same step as one ``torch.compile`` d graph (the default
                       on CUDA): forward, backward, update and BatchNorm state together;
5. ``functional+donate``  arm 3 with ``donate=True``: the step writes into the
                       ``TrainState`` it is given (the optimiser kernels run in place);
6. ``functional+compile+donate``  arm 4 with ``donate=True`` (Inductor writes the new
                       state into the old buffers; --full and --device cuda only).

For each arm it measures: compile time (first step minus a steady step), steady-state
step time (median and interquartile range over interleaved rounds, device-synchronised),
images/s, memory of one steady step (the bytes it allocates, and its peak of live bytes
above what was live before it: the CPU allocator's events through ``torch.profiler``, the
CUDA allocator's statistics on a GPU), and the largest
difference of any parameter from arm 1 after the warm-up steps: the correctness check
runs inside the benchmark, so a fast arm that trains something else is visible at once.

Run it:

    python benchmarks/compare_eager_vs_compile.py                 # quick CPU run
    python benchmarks/compare_eager_vs_compile.py --compile-cache DIR   # warm caches
    python benchmarks/compare_eager_vs_compile.py --full          # every model, fp32 + bf16
    python benchmarks/compare_eager_vs_compile.py --device cuda   # the full GPU run

It prints a table and writes JSON and a PNG chart to ``benchmarks/results/``
(``compare_cpu_quick.json`` / ``.png`` for the default run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import functorch_diary as fd
from functorch_diary import models, optim
from functorch_diary.training.compile import ARTIFACTS_GLOB, use_compile_cache
from functorch_diary.tree import tree_clone

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    1: "module",
    2: "module+compile",
    3: "functional",
    4: "functional+compile",
    5: "functional+donate",
    6: "functional+compile+donate",
}
DTYPES = {"float32": None, "bf16": torch.bfloat16}
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}

# ---------------------------------------------------------------------------------------
# 1. Models. Each is the zoo's functional Model and its imperative twin (the nn.Module the
#    Model wraps), with the batch size used on each device. The twin is loaded with the
#    Model's init(seed) weights, so every arm starts from the same numbers.
# ---------------------------------------------------------------------------------------


def _mobilenet() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=10, dropout=0.0)


class ModelCase(NamedTuple):
    make_model: Callable[[], fd.Model]
    make_module: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one image
    batch: dict[str, int]  # device type -> batch size


MODELS = {
    # d2l's LeNet (seed 004's) trains at batch 256; 128 keeps a CPU step near 6 ms.
    "lenet": ModelCase(models.lenet, models.LeNet, (1, 28, 28), {"cpu": 128, "cuda": 512}),
    "resnet18": ModelCase(
        lambda: models.resnet18(num_classes=10, cifar_stem=True),
        lambda: models.resnet_module(18, num_classes=10, cifar_stem=True),
        (3, 32, 32),
        {"cpu": 16, "cuda": 256},
    ),
    # VGG16-BN as CIFAR code trains it: a 1x1 pool and a 512-wide classifier instead of
    # ImageNet's 7x7 pool and 4096-wide layers (120M parameters for 10 classes).
    "vgg16": ModelCase(
        lambda: models.vgg16(num_classes=10, batch_norm=True, pool_size=1, hidden=512),
        lambda: models.vgg_module(16, 10, batch_norm=True, pool_size=1, hidden=512),
        (3, 32, 32),
        {"cpu": 16, "cuda": 256},
    ),
    "densenet_bc": ModelCase(
        lambda: models.densenet_bc(depth=100, growth_rate=12, num_classes=10),
        lambda: models.densenet_bc_module(depth=100, growth_rate=12, num_classes=10),
        (3, 32, 32),
        {"cpu": 8, "cuda": 128},
    ),
    # torchvision's, on 32x32 inputs; dropout 0 so the arms' random streams (torch's
    # global RNG vs the step's key) cannot make their params differ.
    "mobilenet_v3_small": ModelCase(
        lambda: fd.Model(lambda: _mobilenet()),
        lambda: _mobilenet(),
        (3, 32, 32),
        {"cpu": 8, "cuda": 256},
    ),
}

# ---------------------------------------------------------------------------------------
# 2. Settings. The quick default is sized for a 2-core CI machine: LeNet, ResNet-18 and
#    mobilenet_v3_small, every arm, float32 (with --compile-cache warm, Inductor loads
#    the compiled steps instead of spending minutes on each). --full and --device cuda
#    run every model, both dtypes, all arms.
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full", action="store_true", help="every model, dtype and arm")
    parser.add_argument("--models", help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--dtypes", help="comma-separated subset of float32,bf16")
    parser.add_argument("--arms", help="comma-separated subset of 1-6 (1 is always run)")
    parser.add_argument("--batch", type=int, help="batch size for every model")
    parser.add_argument(
        "--warmup", type=int, default=3, help="steps before timing (then the param check)"
    )
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds")
    parser.add_argument("--steps", type=int, help="steps per arm per round")
    parser.add_argument("--channels-last", action="store_true", help="NHWC for every arm")
    parser.add_argument("--out", type=Path, help="JSON path (the PNG goes beside it)")
    parser.add_argument(
        "--compile-cache",
        type=Path,
        help="torch's persistent compile caches here (every compiled arm); warm if reused",
    )
    parser.add_argument(
        "--compile-mode", help="torch.compile mode of the compiled arms (e.g. reduce-overhead)"
    )
    args = parser.parse_args(argv)
    full = args.full or args.device == "cuda"
    args.models = (
        args.models.split(",")
        if args.models
        else list(MODELS if full else ["lenet", "resnet18", "mobilenet_v3_small"])
    )
    args.dtypes = args.dtypes.split(",") if args.dtypes else (list(DTYPES) if full else ["float32"])
    args.arms = sorted({1, *(int(a) for a in args.arms.split(","))}) if args.arms else None
    args.label = f"{args.device}_{'full' if full else 'quick'}"
    args.out = args.out or RESULTS / f"compare_{args.label}.json"
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def arms_for(args: argparse.Namespace) -> list[int]:
    if args.arms is not None:
        return args.arms
    # The quick CPU run leaves out arm 6: one more Inductor compile per model.
    return list(ARMS) if args.label != "cpu_quick" else [1, 2, 3, 4, 5]


def steps_per_round(args: argparse.Namespace, model_name: str) -> int:
    if args.steps is not None:
        return args.steps
    # Enough steps per round that a round lasts well above timer resolution.
    return 2 if args.device == "cpu" and model_name != "lenet" else 10


# ---------------------------------------------------------------------------------------
# 3. Measuring helpers: device sync, and the memory of one step: bytes allocated, and the
#    peak of live bytes above the baseline. On CUDA the allocator keeps both; on the CPU
#    torch.profiler records every allocation and free of the CPU allocator (Inductor's
#    buffers included), and the peak is the running sum's maximum.
# ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_memory_mb(run_step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """``(allocated, peak)`` of one call of ``run_step``, in MiB: the bytes it allocates
    and the most bytes live at once above what was live before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        total = torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"]
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        sync(device)
        allocated = torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"] - total
        return allocated / 2**20, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        run_step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = allocated = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
        allocated += max(nbytes, 0)
    return allocated / 2**20, peak / 2**20


# ---------------------------------------------------------------------------------------
# 4. The five arms. Each is a zero-argument callable running one training step on the
#    next batch, and a function returning its parameters for the correctness check.
# ---------------------------------------------------------------------------------------


class Arm:
    def __init__(self, step: Callable[[int], None], params: Callable[[], dict]):
        self.step_fn, self.params, self.calls = step, params, 0

    def step(self) -> None:
        self.step_fn(self.calls)
        self.calls += 1


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def module_arm(case, ts0, model, batches, device, dtype, channels_last, compiled, mode) -> Arm:
    module = case.make_module()
    module.load_state_dict(model.state_dict(ts0.params, ts0.state))
    module.to(device).train()
    if channels_last:
        module.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(module.parameters(), **SGD, foreach=True)
    forward = torch.compile(module, mode=mode) if compiled else module

    def update() -> None:
        opt.step()

    # PyTorch's recipe for a compiled optimiser: compile a function that calls step().
    update = torch.compile(update, fullgraph=False) if compiled else update

    def step(i: int) -> None:
        inputs, targets = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(forward(inputs), targets)
        loss.backward()
        update()

    return Arm(step, lambda: {k: v.detach() for k, v in module.named_parameters()})


def functional_arm(model, ts0, batches, dtype, args, compiled, donate=False) -> Arm:
    opt = optim.sgd(**SGD)
    train_step = fd.make_train_step(
        model,
        F.cross_entropy,
        opt,
        compile=compiled,
        compile_mode=args.compile_mode if compiled else None,
        autocast_dtype=dtype,
        channels_last=args.channels_last,
        compile_cache=args.compile_cache if compiled else None,
        donate=donate,
    )
    # A donating step consumes the TrainState it is given: this arm's own copy.
    box = [tree_clone(ts0) if donate else ts0]

    def step(i: int) -> None:
        box[0], _ = train_step(box[0], batches[i % len(batches)])

    return Arm(step, lambda: box[0].params)


# ---------------------------------------------------------------------------------------
# 5. One (model, dtype) cell: build the arms, run each arm's first steps (compilation
#    happens in the first), then time interleaved rounds: every round runs `steps` steps
#    of each arm in turn, so a burst of load from elsewhere hits all arms alike.
# ---------------------------------------------------------------------------------------


def run_cell(args, model_name: str, dtype_name: str) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    case = MODELS[model_name]
    batch = args.batch or case.batch[device.type]
    model = case.make_model()
    ts0 = fd.init_train_state(model, optim.sgd(**SGD), seed=0, device=device)
    gen = torch.Generator().manual_seed(0)
    # Synthetic data: the benchmark times training, not data loading.
    batches = [
        (
            torch.randn((batch, *case.input_shape), generator=gen).to(device),
            torch.randint(0, 10, (batch,), generator=gen).to(device),
        )
        for _ in range(4)
    ]
    if args.channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    arm_ids = arms_for(args)
    cl, mode = args.channels_last, args.compile_mode
    build = {
        1: lambda: module_arm(case, ts0, model, batches, device, dtype, cl, False, mode),
        2: lambda: module_arm(case, ts0, model, batches, device, dtype, cl, True, mode),
        3: lambda: functional_arm(model, ts0, batches, dtype, args, False),
        4: lambda: functional_arm(model, ts0, batches, dtype, args, True),
        5: lambda: functional_arm(model, ts0, batches, dtype, args, False, donate=True),
        6: lambda: functional_arm(model, ts0, batches, dtype, args, True, donate=True),
    }
    arms = {i: build[i]() for i in arm_ids}

    first_step_s = {}
    for i, arm in arms.items():
        for w in range(args.warmup):
            sync(device)
            start = time.perf_counter()
            arm.step()
            sync(device)
            if w == 0:
                first_step_s[i] = time.perf_counter() - start

    # The correctness check, after the warm-up steps. Not after all of them: the arms round
    # float32 sums differently (in the last bits), and training on random labels is chaotic
    # enough to grow such differences ~2x per step (in float64 the arms agree to 1e-13).
    reference = arms[1].params()
    diffs = {}
    for i, arm in arms.items():
        got = arm.params()
        diffs[i] = max(
            float((got[k].float() - v.float()).abs().max()) for k, v in reference.items()
        )

    steps = steps_per_round(args, model_name)
    times: dict[int, list[float]] = {i: [] for i in arms}
    for _ in range(args.rounds):
        for i, arm in arms.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                arm.step()
            sync(device)
            times[i].append((time.perf_counter() - start) / steps)

    memory = {i: step_memory_mb(arm.step, device) for i, arm in arms.items()}
    rows = []
    for i, arm in arms.items():
        median = statistics.median(times[i])
        q1, _, q3 = statistics.quantiles(times[i], n=4) if len(times[i]) > 1 else [median] * 3
        rows.append(
            {
                "model": model_name,
                "dtype": dtype_name,
                "batch": batch,
                "arm": i,
                "arm_name": ARMS[i],
                "compile_s": max(first_step_s[i] - median, 0.0) if i in (2, 4, 6) else None,
                "first_step_s": first_step_s[i],
                "step_ms_median": median * 1e3,
                "step_ms_q1": q1 * 1e3,
                "step_ms_q3": q3 * 1e3,
                "images_per_s": batch / median,
                "step_alloc_mb": memory[i][0],
                "peak_step_mem_mb": memory[i][1],
                "max_abs_param_diff_vs_arm1": diffs[i],
                "diff_after_steps": args.warmup,
                "steps": arm.calls,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# 6. Reporting: a table, the ratios the targets are stated in, JSON and a chart.
# ---------------------------------------------------------------------------------------


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    by_cell: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_cell.setdefault(f"{row['model']}/{row['dtype']}", {})[row["arm"]] = row
    out = {}
    for cell, arms in by_cell.items():
        t = {i: row["step_ms_median"] for i, row in arms.items()}
        peak = {i: row["peak_step_mem_mb"] for i, row in arms.items()}
        entry = {}
        for i, name in (
            (3, "functional"),
            (4, "functional_compiled"),
            (5, "functional_donated"),
            (6, "functional_compiled_donated"),
        ):
            if i in peak and peak[1]:
                entry[f"{name}_peak_mem_over_module"] = peak[i] / peak[1]
        if 3 in t:
            entry["functional_eager_time_over_module_eager"] = t[3] / t[1]
        if 4 in t:
            entry["functional_compiled_speedup_over_module_eager"] = t[1] / t[4]
        if 2 in t and 4 in t:
            entry["functional_compiled_speedup_over_module_compiled"] = t[2] / t[4]
        out[cell] = entry
    return out


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'model':<12}{'dtype':<9}{'batch':>6}  {'arm':<20}{'compile s':>10}{'step ms':>10}"
        f"{'IQR ms':>15}{'img/s':>10}{'alloc MB':>9}{'peak MB':>9}{'max|dp|':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        mem = f"{r['step_alloc_mb']:>9.1f}{r['peak_step_mem_mb']:>9.1f}"
        iqr = f"{r['step_ms_q1']:.1f}-{r['step_ms_q3']:.1f}"
        print(
            f"{r['model']:<12}{r['dtype']:<9}{r['batch']:>6}  {r['arm_name']:<20}{compile_s:>10}"
            f"{r['step_ms_median']:>10.2f}{iqr:>15}{r['images_per_s']:>10.0f}{mem}"
            f"{r['max_abs_param_diff_vs_arm1']:>10.1e}"
        )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "channels_last": args.channels_last,
        "optimizer": {"name": "sgd", **SGD},
        "warmup": args.warmup,
        "compile_mode": args.compile_mode,
        "compile_cache": None if args.compile_cache is None else str(args.compile_cache),
        "rounds": args.rounds,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(cells)), 4))
    width = 0.13
    for k, (arm, name) in enumerate(ARMS.items()):
        xs, ys = [], []
        for c, (model_name, dtype_name) in enumerate(cells):
            for r in rows:
                if (r["model"], r["dtype"], r["arm"]) == (model_name, dtype_name, arm):
                    base = next(
                        b["images_per_s"]
                        for b in rows
                        if (b["model"], b["dtype"], b["arm"]) == (model_name, dtype_name, 1)
                    )
                    xs.append(c + (k - 2.5) * width)
                    ys.append(r["images_per_s"] / base)
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(cells)), [f"{m}\n{d}" for m, d in cells])
    ax.set_ylabel("images/s relative to arm 1 (module, eager)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# 7. Main: every (model, dtype) cell in turn, then the report.
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cache_state = None
    if args.compile_cache is not None:
        # Every compiled arm (module ones too) through the same persistent caches; warm
        # when an earlier run left its artifacts there.
        cache_state = "warm" if any(args.compile_cache.glob(ARTIFACTS_GLOB)) else "cold"
        use_compile_cache(args.compile_cache)
    # On a shared machine the load says how far to trust the timings.
    load_at_start = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for model_name in args.models:
        for dtype_name in args.dtypes:
            rows += run_cell(args, model_name, dtype_name)
    report = {
        "environment": {
            **environment(args),
            "compile_cache_state": cache_state,
            "load_average": [load_at_start, os.getloadavg()],
        },
        "wall_s": time.perf_counter() - started,
        "results": rows,
        "ratios": ratios(rows),
    }
    print_table(rows)
    print(json.dumps(report["ratios"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(
        rows, args.out.with_suffix(".png"), f"{args.label}: {report['environment']['device_name']}"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
