"""Data parallel on torch.distributed (gloo, localhost): 2 ranks with half the batch each
equal 1 process on the whole batch; a dying rank makes the other fail fast and clearly."""

from __future__ import annotations

import pytest
import torch

import functorch_diary as fd
from functorch_diary import checkpoint
from functorch_diary.training import distributed
from tests.helpers import (
    assert_survivors_name_the_dead_rank,
    start_ranks,
    torchrun,
    torchrun_reference,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "dp.ckpt"
    torchrun(["--steps", "10", "--batch-size", "32", "--optimizer", "adam", "--lr", "0.01",
              "--dtype", "float64", "--out", str(out)], cwd=tmp_path)  # fmt: skip
    ts = torchrun_reference(steps=10, batch_size=32)
    got = checkpoint.load(out)
    assert checkpoint.read_metadata(out) == {"world_size": 2}
    assert int(got.step) == 10
    fd.assert_trees_close(got.params, ts.params, rtol=1e-6, atol=1e-9)
    fd.assert_trees_close(got.opt_state, ts.opt_state, rtol=1e-6, atol=1e-9)


_WORKER = """
import os, sys, torch
from torch import nn
from functorch_diary import data, models, optim
from functorch_diary.training import distributed
from functorch_diary.training.step import init_train_state

world = distributed.init_from_env("gloo", timeout_s=float(sys.argv[1]))
model = models.mlp(in_features=64, hidden=(16,), num_classes=10)
opt = optim.sgd(0.1)
ts = init_train_state(model, opt, seed=0)
step = distributed.make_data_parallel_train_step(model, nn.functional.cross_entropy, opt)
for i in range(50):
    if world.rank == 1 and i == 3:
        os._exit(7)  # dies without a word, as a killed or crashed process does
    batch = distributed.shard(data.digits_batch(i, 16), world.rank, world.world_size)
    ts, _ = step(ts, batch)
print("finished", flush=True)
"""


def test_a_dying_rank_makes_the_other_fail_clearly_and_quickly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    timeout_s = 20
    procs = start_ranks(script, 2, [str(timeout_s)], cwd=tmp_path)
    waited = assert_survivors_name_the_dead_rank(
        procs, timeout_s, "rank {rank} of 2: all-reduce of the gradients failed: rank 1 died"
    )
    print(f"rank 0 failed {waited:.1f}s after rank 1 died")


def test_single_process_helpers_and_errors():
    tree = {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.float64)}
    reduced = distributed.all_reduce_mean(tree)
    fd.assert_trees_close(reduced, tree)
    assert reduced["w"].data_ptr() != tree["w"].data_ptr()
    with pytest.raises(TypeError, match="floating"):
        distributed.all_reduce_mean({"n": torch.ones(2, dtype=torch.int64)})
    x, y = torch.arange(8.0).reshape(4, 2), torch.arange(4)
    assert distributed.shard((x, y), 1, 2)[1].tolist() == [2, 3]
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        distributed.shard((x, y), 0, 3)
    distributed.assert_in_sync(tree)


def test_init_from_env_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(distributed.DistributedError, match="torchrun --nproc-per-node"):
        distributed.init_from_env()
