"""The torchrun entry point: data-parallel training of an MLP on the bundled digits::

torchrun --standalone --nproc-per-node 2 -m functorch_diary.cli.distributed --steps 100
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import checkpoint, optim
from ..data import digits_batch
from ..training.distributed import (
    assert_in_sync,
    init_from_env,
    make_data_parallel_train_step,
    shard,
)
from ..training.step import init_train_state
from ..tree import tree_map
from ..zoo import models


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m functorch_diary.cli.distributed",
        description="Data-parallel training of an MLP on scikit-learn's digits.",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout (s)")
    parser.add_argument("--out", default=None, help="checkpoint file written by rank 0")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The torchrun entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    world = init_from_env(args.backend, args.timeout)
    try:
        dtype = getattr(torch, args.dtype)
        model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
        opt = optim.sgd(args.lr, momentum=0.9) if args.optimizer == "sgd" else optim.adam(args.lr)
        ts = init_train_state(model, opt, seed=args.seed, device=world.device, dtype=dtype)
        step = make_data_parallel_train_step(model, torch.nn.functional.cross_entropy, opt)
        for i in range(args.steps):
            batch = digits_batch(i, args.batch_size, args.seed, dtype)
            local = tree_map(
                lambda t: t.to(world.device), shard(batch, world.rank, world.world_size)
            )
            ts, metrics = step(ts, local)
            if world.rank == 0 and (i % 10 == 0 or i == args.steps - 1):
                print(f"step {i + 1}/{args.steps} loss {float(metrics['loss']):.4f}", flush=True)
        assert_in_sync(ts.params)
        if world.rank == 0 and args.out:
            checkpoint.save(args.out, ts, metadata={"world_size": world.world_size})
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
