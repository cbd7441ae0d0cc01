"""Sharded training on CPU ranks: what each rank holds, its peak memory and the step time.

    PYTHONPATH=. python benchmarks/sharded.py --ranks 1 2 4 \\
        --out benchmarks/results/sharded_cpu.json

For each number of ranks N the script starts N gloo processes on localhost (one thread
each), shards a float32 ResNet-18 (CIFAR stem, 11.2 M params) and its AdamW state over
them with ``training.sharded``, and runs sharded steps on a global batch of 3x32x32
images split over the ranks. It also runs the plain single-process ``make_train_step``
on the whole batch (the row ``plain``): what sharding costs on one rank. Each rank
reports:

- ``resident_bytes``: the local shards of params + optimiser state (exact, counted);
- ``peak_tensor_bytes``: the most bytes held by tensors during one step: what the rank
  held when the step started (its TrainState and batch) plus the high-water mark of the
  storages the step's ops created (all-gathered params, activations, gradients, the new
  state), counted by :class:`PeakTensorBytes`. The CPU has no allocator counter like
  ``torch.cuda.max_memory_allocated``; this is its exact equivalent for tensors;
- ``peak_rss_bytes`` and ``peak_rss_delta_bytes``: the process's peak resident set size
  (``getrusage``), and how much it grew from just before the TrainState was built
  (allocator caching and torch's own libraries included: an upper bound);
- ``step_ms``: the median wall time of the timed steps (measured without the counter,
  which adds Python work to every op), and ``step_ms_min``.

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
import weakref
from pathlib import Path

import optree
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------- the tensor-bytes counter


class PeakTensorBytes(TorchDispatchMode):
    """Inside the context, the bytes of every storage an op creates, until it is freed.

    An op's output whose storage is none of its inputs' is new (views and in-place
    results are not); each new storage counts once, by its size, until Python frees it
    (a ``weakref.finalize`` on the storage). A tensor subclass (a DTensor, a collective's
    waiting tensor) counts by the plain tensors it wraps. Storages made before the
    context are not seen: add what the caller holds. Allocations an op frees before it
    returns (a kernel's scratch) are not seen either: this is the tensors' high-water
    mark, which is what a sharded step changes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def _plain(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
            return [tensor]
        names, _ = tensor.__tensor_flatten__()  # DTensor's include its DeviceMesh
        inner = [getattr(tensor, name) for name in names]
        return [p for t in inner if isinstance(t, torch.Tensor) for p in self._plain(t)]

    def _storages(self, tree) -> list:
        tensors = [t for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        plain = [p for t in tensors for p in self._plain(t) if p.device.type != "meta"]
        return [p.untyped_storage() for p in plain]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for s in self._storages((args, kwargs))}
        for storage in self._storages(out):
            key = id(storage)
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


# ---------------------------------------------------------------- one rank's measurement


def worker(steps: int, warmup: int, batch: int, plain: bool, donate: bool) -> None:
    from torch import nn

    from functorch_diary import init_train_state, make_train_step, models, optim
    from functorch_diary.training import distributed, sharded
    from functorch_diary.tree import tree_leaves

    model, opt = models.resnet18(num_classes=10), optim.adamw(1e-3)
    loss_fn = nn.functional.cross_entropy
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if plain:  # the single-process step on the whole batch: no group, no DTensor
        rank, world_size = 0, 1
        ts = init_train_state(model, opt, seed=0)
        step = make_train_step(model, loss_fn, opt, donate=donate)
    else:
        world = distributed.init_from_env("gloo", timeout_s=300)
        rank, world_size = world.rank, world.world_size
        mesh = sharded.make_mesh()
        # Only this rank's shards are ever allocated (empty_train_state): the peak below
        # is what a rank needs, not the whole model built once per rank and then cut.
        ts = sharded.empty_train_state(model, opt, mesh)
        gen = torch.Generator().manual_seed(rank)
        for leaf in ts.params.values():  # fresh tensors of our own: filled in place
            leaf.to_local().normal_(0.0, 0.05, generator=gen)
        for name, leaf in ts.state.items():  # BatchNorm's initial statistics
            leaf.to_local().fill_(1 if name.endswith("running_var") else 0)
        step = sharded.make_sharded_train_step(model, loss_fn, opt, donate=donate)
    whole_bytes = sum(  # a DTensor's numel is the whole tensor's
        leaf.numel() * leaf.element_size() for leaf in tree_leaves((ts.params, ts.opt_state))
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    local = distributed.shard((x, y), rank, world_size)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        ts, metrics = step(ts, local)
        float(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    # One more step under the counter: what the rank holds going in, plus the step's
    # high-water mark (the old TrainState stays alive: the step is pure).
    held = sharded.local_bytes((ts, local))
    with PeakTensorBytes() as counter:
        ts, metrics = step(ts, local)
        float(metrics["loss"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "ranks": "plain" if plain else world_size,
        "rank": rank,
        "resident_bytes": sharded.local_bytes((ts.params, ts.opt_state)),
        "whole_bytes": whole_bytes,
        "peak_tensor_bytes": held + counter.peak,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": peak - before,
        "step_ms": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
    }
    print(json.dumps(report), flush=True)
    if not plain:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the launcher


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(ranks: int, args: argparse.Namespace, plain: bool = False) -> list[dict]:
    """Start ``ranks`` worker processes (one, with no process group, for ``plain``)."""
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
            argv + (["--plain"] if plain else []),
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


def summary(reports: list[dict]) -> dict:
    """One row of the table: the largest rank's numbers (the one that must fit)."""
    mib = 2**20
    return {
        "ranks": reports[0]["ranks"],
        "whole_mib": reports[0]["whole_bytes"] / mib,
        "resident_mib_per_rank": max(r["resident_bytes"] for r in reports) / mib,
        "resident_share": max(r["resident_bytes"] for r in reports) / reports[0]["whole_bytes"],
        "peak_tensor_mib_per_rank": max(r["peak_tensor_bytes"] for r in reports) / mib,
        "peak_rss_mib_per_rank": max(r["peak_rss_bytes"] for r in reports) / mib,
        "peak_rss_delta_mib_per_rank": max(r["peak_rss_delta_bytes"] for r in reports) / mib,
        "step_ms": max(r["step_ms"] for r in reports),
        "step_ms_min": max(r["step_ms_min"] for r in reports),
        "per_rank": reports,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--no-plain", action="store_true", help="skip the make_train_step row")
    parser.add_argument(
        "--donate", action="store_true", help="the steps donate their TrainState (donate=True)"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.warmup, args.batch, args.plain, args.donate)
        return
    rows = [] if args.no_plain else [summary(run(1, args, plain=True))]
    rows += [summary(run(n, args)) for n in args.ranks]
    print(f"{'ranks':>5} {'resident MiB':>13} {'share':>6} {'peak tensors MiB':>17} "
          f"{'peak RSS MiB':>13} {'RSS growth MiB':>15} {'step ms':>9} {'min ms':>8}")  # fmt: skip
    for row in rows:
        print(f"{row['ranks']:>5} {row['resident_mib_per_rank']:>13.1f} "
              f"{row['resident_share']:>6.3f} {row['peak_tensor_mib_per_rank']:>17.1f} "
              f"{row['peak_rss_mib_per_rank']:>13.1f} {row['peak_rss_delta_mib_per_rank']:>15.1f} "
              f"{row['step_ms']:>9.1f} {row['step_ms_min']:>8.1f}")  # fmt: skip
    if args.out:
        meta = {
            "command": "PYTHONPATH=. python benchmarks/sharded.py " + " ".join(sys.argv[1:]),
            "model": "resnet18 (CIFAR stem), float32, AdamW",
            "global_batch": args.batch,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "note": "CPU shared with other processes (and N ranks on fewer cores): step "
            "times are upper bounds; resident and peak tensor bytes are exact",
        }
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
