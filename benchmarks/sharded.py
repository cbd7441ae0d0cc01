"""Sharded training on CPU ranks: what each rank holds, its peak memory and the step time.

    PYTHONPATH=. python benchmarks/sharded.py --ranks 1 2 4 \\
        --out benchmarks/results/sharded_cpu.json

For each number of ranks N the script starts N gloo processes on localhost (one thread
each), shards a float32 ResNet-18 (CIFAR stem, 11.2 M params) and its AdamW state over
them with ``training.sharded``, and runs sharded steps on a global batch of 3x32x32
images split over the ranks. Each rank reports:

- ``resident_bytes``: the local shards of params + optimiser state (exact, counted);
- ``peak_rss_bytes`` and ``peak_rss_delta_bytes``: the process's peak resident set size
  (``getrusage``), and how much it grew from just before the TrainState was built (the
  step's transient all-gathered params and gradients included; the CPU has no allocator
  counter like ``torch.cuda.max_memory_allocated``);
- ``step_ms``: the median wall time of the timed steps.

The CPU is shared: N processes on a machine with fewer cores than N, and other jobs,
make the step times an upper bound, not a scaling curve; the bytes do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------- one rank's measurement


def worker(steps: int, warmup: int, batch: int, donate: bool) -> None:
    import torch
    from torch import nn

    from benchmarks.compare_eager_vs_compile import step_memory_mb
    from functorch_diary import models, optim
    from functorch_diary.training import distributed, sharded
    from functorch_diary.tree import tree_leaves

    world = distributed.init_from_env("gloo", timeout_s=300)
    mesh = sharded.make_mesh()
    model, opt = models.resnet18(num_classes=10), optim.adamw(1e-3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Only this rank's shards are ever allocated (empty_train_state): the peak below is
    # what a rank needs, not the whole model built once per rank and then cut.
    ts = sharded.empty_train_state(model, opt, mesh)
    gen = torch.Generator().manual_seed(world.rank)
    for leaf in ts.params.values():  # fresh tensors of our own: filled in place
        leaf.to_local().normal_(0.0, 0.05, generator=gen)
    for name, leaf in ts.state.items():  # BatchNorm's initial statistics
        leaf.to_local().fill_(1 if name.endswith("running_var") else 0)
    whole_bytes = sum(  # a DTensor's numel is the whole tensor's
        leaf.numel() * leaf.element_size() for leaf in tree_leaves((ts.params, ts.opt_state))
    )
    step = sharded.make_sharded_train_step(model, nn.functional.cross_entropy, opt, donate=donate)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    local = distributed.shard((x, y), world.rank, world.world_size)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        ts, metrics = step(ts, local)
        float(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resident = sharded.local_bytes((ts.params, ts.state, ts.opt_state))

    def one_step() -> None:
        nonlocal ts
        ts, metrics = step(ts, local)
        float(metrics["loss"])

    allocated_mib, step_peak_mib = step_memory_mb(one_step, torch.device("cpu"))
    report = {
        "ranks": world.world_size,
        "rank": world.rank,
        "resident_bytes": sharded.local_bytes((ts.params, ts.opt_state)),
        "whole_bytes": whole_bytes,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": peak - before,
        "step_allocated_bytes": int(allocated_mib * 2**20),
        "step_peak_above_resident_bytes": int(step_peak_mib * 2**20),
        "step_peak_bytes": resident + int(step_peak_mib * 2**20),
        "step_ms": 1000 * statistics.median(times),
    }
    print(json.dumps(report), flush=True)
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the launcher


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(ranks: int, args: argparse.Namespace) -> list[dict]:
    port = str(_free_port())
    repo = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": str(ranks),
        "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, __file__, "--worker", "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch", str(args.batch)]  # fmt: skip
    argv += ["--donate"] if args.donate else []
    procs = [
        subprocess.Popen(
            argv,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(ranks)
    ]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed with {ranks} ranks")
    return [json.loads(line) for out in outs for line in out.splitlines() if line[:1] == "{"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument(
        "--donate", action="store_true", help="make_sharded_train_step(donate=True)"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.warmup, args.batch, args.donate)
        return
    rows = []
    for n in args.ranks:
        reports = run(n, args)
        rows.append({
            "ranks": n,
            "whole_mib": reports[0]["whole_bytes"] / 2**20,
            "resident_mib_per_rank": max(r["resident_bytes"] for r in reports) / 2**20,
            "resident_share": max(r["resident_bytes"] for r in reports) / reports[0]["whole_bytes"],
            "peak_rss_mib_per_rank": max(r["peak_rss_bytes"] for r in reports) / 2**20,
            "peak_rss_delta_mib_per_rank": max(r["peak_rss_delta_bytes"] for r in reports) / 2**20,
            "step_peak_mib_per_rank": max(r["step_peak_bytes"] for r in reports) / 2**20,
            "step_transient_mib_per_rank": max(
                r["step_peak_above_resident_bytes"] for r in reports) / 2**20,
            "step_ms": max(r["step_ms"] for r in reports),
            "per_rank": reports,
        })  # fmt: skip
    print(f"{'ranks':>5} {'resident MiB':>13} {'share':>6} {'step peak MiB':>14} "
          f"{'transient MiB':>14} {'peak RSS MiB':>13} {'step ms':>9}")  # fmt: skip
    for row in rows:
        print(f"{row['ranks']:>5} {row['resident_mib_per_rank']:>13.1f} "
              f"{row['resident_share']:>6.3f} {row['step_peak_mib_per_rank']:>14.1f} "
              f"{row['step_transient_mib_per_rank']:>14.1f} "
              f"{row['peak_rss_mib_per_rank']:>13.1f} {row['step_ms']:>9.1f}")  # fmt: skip
    if args.out:
        meta = {
            "command": "PYTHONPATH=. python benchmarks/sharded.py " + " ".join(sys.argv[1:]),
            "model": "resnet18 (CIFAR stem), float32, AdamW",
            "global_batch": args.batch,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "note": "CPU shared with other processes (and N ranks on fewer cores): step "
            "times are upper bounds; resident bytes are exact",
        }
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
