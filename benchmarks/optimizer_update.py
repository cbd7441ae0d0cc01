"""The optimiser update alone, on ResNet-18's parameter set: functional eager vs torch.optim.

What is timed: one optimiser step on ResNet-18's 62 parameter tensors (11.2M floats),
with fixed gradients, no forward or backward pass.

- functional: ``params, state = optim.apply_gradients(opt, grads, state, params)`` --
  pure, so it writes new params and new state every step (the fused eager path: torch's
  fused CPU kernel on fresh copies for Adam, AdamW and Adagrad, see ``optim.fused``);
- unfused: ``opt.update`` then ``optim.apply_updates``, the optax pair, for comparison;
- torch: ``torch.optim.<Name>(..., foreach=True).step()``, in place, the target's
  baseline; and ``fused=True`` where torch has a fused kernel for the device, for
  reference (it is the in-place floor of what the functional step runs). Muon has no
  foreach step in torch: its baseline is its only (for-loop) step.

NAdam, RAdam, Adamax, Adadelta, ASGD, Rprop, Adafactor and Muon (``optim.foreach_step``)
have no fused functional path: their ``apply_gradients`` runs torch's foreach kernels out
of place, so the ratio is the cost of purity there (no target). Muon takes matrices only:
it runs on ResNet-18's weights flattened to ``(out, in * kh * kw)`` (21 tensors, 11.2M
floats; biases and norms left out), on both sides.

Each side's params are compared, inside the benchmark, with the torch run that took the
same steps: bit for bit where the functional step follows that implementation.

Run: ``python benchmarks/optimizer_update.py [--device cpu|cuda] [--repeats 30]``. It
prints a table and writes ``benchmarks/results/optimizer_update_<device>.json``.
The target (issue 4): functional / torch <= 1.1, for SGD, Adam, AdamW, RMSprop and Adagrad.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from functorch_diary import optim

# ---------------------------------------------------------------------------------------
# Setup: the parameter set and one set of gradients, shared by both sides.
# ---------------------------------------------------------------------------------------


@functools.cache  # built once per device; neither side ever writes into it
def resnet18_params(device: torch.device) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=10)
    return {k: v.detach().to(device) for k, v in module.named_parameters()}


# Each optimiser with the settings the diaries use; the same kwargs go to both sides.
OPTIMISERS = {
    "sgd": (optim.sgd, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    "adam": (optim.adam, torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (optim.adamw, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    "rmsprop": (optim.rmsprop, torch.optim.RMSprop, {"lr": 5e-5}),
    "adagrad": (optim.adagrad, torch.optim.Adagrad, {"lr": 1e-2}),
    "nadam": (optim.nadam, torch.optim.NAdam, {"lr": 2e-3}),
    "radam": (optim.radam, torch.optim.RAdam, {"lr": 1e-3}),
    "adamax": (optim.adamax, torch.optim.Adamax, {"lr": 2e-3}),
    "adadelta": (optim.adadelta, torch.optim.Adadelta, {"lr": 1.0}),
    "asgd": (optim.asgd, torch.optim.ASGD, {"lr": 1e-2}),
    "rprop": (optim.rprop, torch.optim.Rprop, {"lr": 1e-2}),
    "adafactor": (optim.adafactor, torch.optim.Adafactor, {"lr": 1e-2}),
    "muon": (optim.muon, torch.optim.Muon, {"lr": 2e-2}),
}
#: torch has no foreach step for these: the baseline is its default (for-loop) step.
NO_FOREACH = {"muon"}


def params_for(name: str, device: torch.device) -> dict[str, torch.Tensor]:
    """ResNet-18's parameters; for Muon, which takes matrices only, its weights flattened."""
    params = resnet18_params(device)
    if name != "muon":
        return params
    return {k: v.reshape(v.shape[0], -1) for k, v in params.items() if v.ndim >= 2}


def has_fused_kernel(torch_cls: type, device: torch.device) -> bool:
    """Whether ``torch_cls(fused=True)`` runs on ``device`` (RMSprop has no fused kernel)."""
    probe = torch.nn.Parameter(torch.zeros(1, device=device))
    try:
        torch_cls([probe], lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------
# Timing: two sides alternate, one step each per round, so that a burst of load on a
# shared machine hits both alike; the median of the rounds is reported. The unfused form is
# timed against its own torch twin in separate rounds: a third arm in the same rounds would
# evict the other two's tensors from the cache between their steps.
# ---------------------------------------------------------------------------------------


def alternate(
    a: Callable[[], None], b: Callable[[], None], device: torch.device, repeats: int, warmup: int
) -> tuple[list[float], list[float]]:
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        for step, seen in zip((a, b), times, strict=True):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                seen.append(time.perf_counter() - start)
    return times


def bench(name: str, device: torch.device, repeats: int, warmup: int = 5) -> dict:
    make_functional, torch_cls, kwargs = OPTIMISERS[name]
    params = params_for(name, device)
    gen = torch.Generator(device=device).manual_seed(1)
    grads = {k: torch.randn(v.shape, generator=gen, device=device) for k, v in params.items()}
    opt = make_functional(**kwargs)

    def torch_twin(**implementation: bool) -> tuple[torch.optim.Optimizer, list]:
        tensors = [torch.nn.Parameter(v.clone()) for v in params.values()]
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = g
        return torch_cls(tensors, **implementation, **kwargs), tensors

    carry = [params, opt.init(params)]

    def functional_step() -> None:
        carry[0], carry[1] = optim.apply_gradients(opt, grads, carry[1], carry[0])

    def max_diff(tensors: list[torch.nn.Parameter]) -> float:
        return max(
            (carry[0][k] - t.detach()).abs().max().item()
            for k, t in zip(params, tensors, strict=True)
        )

    baseline = {} if name in NO_FOREACH else {"foreach": True}
    torch_opt, tensors = torch_twin(**baseline)
    functional, torch_times = alternate(functional_step, torch_opt.step, device, repeats, warmup)
    row = {"max_abs_param_diff_vs_foreach": max_diff(tensors), "torch_has_foreach": bool(baseline)}

    if has_fused_kernel(torch_cls, device):
        carry[:] = [params, opt.init(params)]
        fused_opt, fused_tensors = torch_twin(fused=True)
        functional_2, fused_times = alternate(
            functional_step, fused_opt.step, device, repeats, warmup
        )
        row |= {
            "torch_fused_ms": 1e3 * statistics.median(fused_times),
            "ratio_vs_fused": statistics.median(functional_2) / statistics.median(fused_times),
            "max_abs_param_diff_vs_fused": max_diff(fused_tensors),
        }

    unfused_carry = [params, opt.init(params)]

    def unfused_step() -> None:
        updates, unfused_carry[1] = opt.update(grads, unfused_carry[1], unfused_carry[0])
        unfused_carry[0] = optim.apply_updates(unfused_carry[0], updates)

    unfused, unfused_torch = alternate(
        unfused_step, torch_twin(**baseline)[0].step, device, repeats, warmup
    )

    # The median is the typical step; the minimum is the least disturbed one, the better
    # estimate of the intrinsic cost on a loaded machine.
    def ms(times: list[float], stat=statistics.median) -> float:
        return 1e3 * stat(times)

    return {
        "optimizer": name,
        "kwargs": dict(kwargs),
        "functional_ms": ms(functional),
        "torch_foreach_ms": ms(torch_times),
        "ratio": ms(functional) / ms(torch_times),
        "functional_min_ms": ms(functional, min),
        "torch_foreach_min_ms": ms(torch_times, min),
        "ratio_of_minima": ms(functional, min) / ms(torch_times, min),
        "unfused_ms": ms(unfused),
        "unfused_ratio": ms(unfused) / ms(unfused_torch),
        "steps": warmup + repeats,
        **row,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=list(OPTIMISERS), choices=list(OPTIMISERS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default results/optimizer_update_<device>.json)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [bench(name, device, args.repeats, args.warmup) for name in args.only]

    # -----------------------------------------------------------------------------------
    # Report: a table, and the same numbers as JSON.
    # -----------------------------------------------------------------------------------
    n_params = sum(v.numel() for v in resnet18_params(torch.device("cpu")).values())
    print(
        f"ResNet-18 parameter set: {n_params / 1e6:.1f}M floats, device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} alternating rounds"
    )
    header = ["optimizer", "functional ms", "torch foreach ms", "ratio", "of minima", "unfused"]
    print(
        f"{header[0]:<10}{header[1]:>15}{header[2]:>18}{header[3]:>8}{header[4]:>11}"
        f"{header[5]:>9}   |diff| foreach  torch fused ms  vs fused  |diff| fused"
    )
    for row in rows:
        fused = (
            ""
            if "torch_fused_ms" not in row
            else (
                f"{row['torch_fused_ms']:>16.2f}{row['ratio_vs_fused']:>10.2f}"
                f"{row['max_abs_param_diff_vs_fused']:>14.1e}"
            )
        )
        # * : torch has no foreach step; its baseline is the for-loop step.
        label = row["optimizer"] + ("" if row["torch_has_foreach"] else "*")
        print(
            f"{label:<10}{row['functional_ms']:>15.2f}{row['torch_foreach_ms']:>18.2f}"
            f"{row['ratio']:>8.2f}{row['ratio_of_minima']:>11.2f}{row['unfused_ratio']:>9.2f}"
            f"{row['max_abs_param_diff_vs_foreach']:>17.1e}{fused}"
        )
    out = args.out or Path(__file__).parent / "results" / f"optimizer_update_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "num_params": n_params,
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
