"""Per-sample gradients and ensembles: ``vmap`` against the Python loops they replace.

Run:  python benchmarks/per_sample_grads.py [--device cpu|cuda] [--batch 256] [--repeats 3]

Two measurements, each side by side in one run on the same data and weights:

1. Per-sample gradients of LeNet (seed 004's, sigmoid + max pool, 1x28x28) for a batch
   of 256: ``func.per_sample_grads`` (one ``vmap(grad)``) against
   (a) the imperative loop: ``nn.Module``, one ``zero_grad(); loss.backward()`` and a
   copy of every ``.grad`` per example, and (b) a loop of ``torch.func.grad`` calls.
   Target: >= 10x faster than (a) on 2 CPU cores.
2. One training step of an ensemble of 8 LeNets on a batch of 64:
   ``ensemble.make_ensemble_train_step`` (all members in one ``vmap``) against a loop of
   ``make_train_step`` over the members.

Every figure is the median wall time over ``--repeats`` runs after one warm-up run.
Results go to a table on stdout and to benchmarks/results/per_sample_grads_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.func import grad
from torch.nn import functional as F

from functorch_diary import func, models, optim
from functorch_diary.training import ensemble as ens
from functorch_diary.training.step import init_train_state, make_train_step

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--members", type=int, default=8)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
device = torch.device(args.device)


def timed(fn) -> float:
    """Median seconds of ``fn()`` over the repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------
# 1. Per-sample gradients: LeNet, one batch.
# ---------------------------------------------------------------------------------------
model = models.lenet()
params, state = model.init(seed=0, device=device)
gen = torch.Generator().manual_seed(0)
x = torch.randn(args.batch, 1, 28, 28, generator=gen).to(device)
y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

# The imperative twin holds the same weights.
module = models.LeNet().to(device)
module.load_state_dict(model.state_dict(params, state))


def module_loop():
    grads = []
    for i in range(args.batch):
        module.zero_grad()
        F.cross_entropy(module(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    return grads


def loss_one(p, xi, yi):
    return F.cross_entropy(model.apply(p, state, xi, train=False)[0], yi)


grad_one = grad(loss_one)


def func_loop():
    return [grad_one(params, x[i : i + 1], y[i : i + 1]) for i in range(args.batch)]


per_sample = func.per_sample_grads(model, F.cross_entropy)


def vmapped():
    return per_sample(params, state, x, y)


# Same numbers before timing anything (float32 tolerance).
reference = module_loop()
got, _ = vmapped()
names = [n for n, _ in module.named_parameters()]
for j, name in enumerate(names):
    want = torch.stack([g[j] for g in reference])
    torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6)

t_module, t_func_loop, t_vmap = timed(module_loop), timed(func_loop), timed(vmapped)

# ---------------------------------------------------------------------------------------
# 2. Ensemble: k LeNets, one training step on a shared batch.
# ---------------------------------------------------------------------------------------
opt = optim.adam(1e-3)
seeds = list(range(args.members))
ens_x, ens_y = x[:64], y[:64]
ensemble = ens.init_ensemble(model, opt, seeds, device=device)
ens_step = ens.make_ensemble_train_step(model, F.cross_entropy, opt)
members = [init_train_state(model, opt, s, device=device) for s in seeds]
one_step = make_train_step(model, F.cross_entropy, opt, compile=False)


def ensemble_vmap():
    return ens_step(ensemble, (ens_x, ens_y))


def ensemble_loop():
    return [one_step(m, (ens_x, ens_y)) for m in members]


t_ens_loop, t_ens_vmap = timed(ensemble_loop), timed(ensemble_vmap)

# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------
rows = [
    (f"per-sample grads, LeNet, batch {args.batch}", "nn.Module loop (.backward per example)",
     t_module, t_module / t_vmap),
    ("", "torch.func.grad loop", t_func_loop, t_func_loop / t_vmap),
    ("", "func.per_sample_grads (vmap)", t_vmap, 1.0),
    (f"ensemble step, {args.members} LeNets, batch 64", "loop over members", t_ens_loop,
     t_ens_loop / t_ens_vmap),
    ("", "func.make_ensemble_train_step (vmap)", t_ens_vmap, 1.0),
]  # fmt: skip
threads = torch.get_num_threads()
if device.type == "cuda":
    hardware = torch.cuda.get_device_name(device)
else:
    hardware = platform.processor() or platform.machine()
print(f"device {device} ({hardware}), torch {torch.__version__}, {threads} threads, "
      f"{os.cpu_count()} cores visible")  # fmt: skip
print(f"{'task':44s} {'method':40s} {'ms':>10s} {'vmap speedup':>13s}")
for task, method, seconds, ratio in rows:
    print(f"{task:44s} {method:40s} {seconds * 1e3:10.2f} {ratio:12.1f}x")

result = {
    "device": str(device),
    "hardware": hardware,
    "torch": torch.__version__,
    "threads": threads,
    "cpu_count": os.cpu_count(),
    "batch": args.batch,
    "members": args.members,
    "repeats": args.repeats,
    "per_sample": {
        "module_loop_s": t_module,
        "func_grad_loop_s": t_func_loop,
        "vmap_s": t_vmap,
        "speedup_vs_module_loop": t_module / t_vmap,
        "speedup_vs_func_loop": t_func_loop / t_vmap,
    },
    "ensemble": {
        "loop_s": t_ens_loop,
        "vmap_s": t_ens_vmap,
        "speedup": t_ens_loop / t_ens_vmap,
    },
}
out = Path(__file__).parent / "results" / f"per_sample_grads_{device.type}.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out}")
