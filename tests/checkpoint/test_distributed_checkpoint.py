"""Distributed checkpoints (torch.distributed.checkpoint, gloo on localhost): saved from 2
ranks, loaded on 1, 2 or 4 (resharded), resumed bit for bit; converted to and from the
single-file format; a save cut short by a dead rank leaves the last good one in place."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from torch import nn

import functorch_diary as fd
from functorch_diary import checkpoint, data, init_train_state, models, optim
from functorch_diary.checkpoint import distributed as dcheckpoint
from tests.helpers import assert_survivors_name_the_dead_rank, run_ranks, start_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

# Every mode trains the same float64 MLP with AdamW on the digits, sharded (its 32x64
# weight and its AdamW moments are split; the small leaves replicated).
_WORKER = """
import os, sys
import torch
from torch import nn
from functorch_diary import checkpoint, data, init_train_state, models, optim
from functorch_diary.checkpoint import distributed as dcheckpoint
from functorch_diary.training import distributed, sharded

mode, run, out = sys.argv[1], sys.argv[2], sys.argv[3]
world = distributed.init_from_env("gloo", timeout_s=30)  # the dead-rank test's bound
mesh = sharded.make_mesh()
model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
opt = optim.adamw(1e-2)
step = sharded.make_sharded_train_step(model, nn.functional.cross_entropy, opt)

def fresh(seed):
    whole = init_train_state(model, opt, seed=seed, dtype=torch.float64)
    return sharded.shard_train_state(whole, mesh)

def train(ts, steps):
    for _ in range(steps):
        batch = data.digits_batch(int(ts.step), 16, 0, torch.float64)
        ts, _ = step(ts, distributed.shard(batch, world.rank, world.world_size))
    return ts

def write(name, ts):
    gathered = sharded.gather_train_state(ts)
    if world.rank == 0:
        checkpoint.save(os.path.join(out, name), gathered)

if mode == "save-and-resume":
    ts = train(fresh(0), 2)
    dcheckpoint.save(run, ts, metadata={"note": "after 2 steps"})
    write("at2.ckpt", ts)
    write("uninterrupted.ckpt", train(ts, 2))
    resumed = dcheckpoint.load(run, like=fresh(1))  # another seed: every value is loaded
    write("loaded_on_2.ckpt", resumed)
    write("resumed_on_2.ckpt", train(resumed, 2))
elif mode == "resume":
    # The template holds only this rank's (uninitialised) shards: no whole model anywhere.
    like = sharded.empty_train_state(model, opt, mesh, dtype=torch.float64)
    resumed = dcheckpoint.load(run, like=like)
    write(f"loaded_on_{world.world_size}.ckpt", resumed)
    resumed = train(resumed, 2)
    write(f"resumed_on_{world.world_size}.ckpt", resumed)
    dcheckpoint.save(os.path.join(out, f"run_from_{world.world_size}"), resumed)
elif mode == "die-in-save":
    ts = train(fresh(0), 1)
    dcheckpoint.save(run, ts)  # the last good checkpoint, at step 1
    ts = train(ts, 1)
    if world.rank == 1:
        # Fault injection: this rank dies while writing its shards, as a killed one does.
        from torch.distributed.checkpoint import FileSystemWriter
        FileSystemWriter.write_data = lambda *args, **kwargs: os._exit(7)
    dcheckpoint.save(run, ts)
print("finished", flush=True)
torch.distributed.destroy_process_group()
"""


def _reference(steps: int):
    model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
    opt = optim.adamw(1e-2)
    ts = init_train_state(model, opt, seed=0, dtype=torch.float64)
    step = fd.make_train_step(model, nn.functional.cross_entropy, opt)
    for i in range(steps):
        ts, _ = step(ts, data.digits_batch(i, 16, 0, torch.float64))
    return ts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    script = out / "worker.py"
    script.write_text(_WORKER)
    run_ranks(script, 2, ["save-and-resume", str(out / "run"), str(out)], timeout=300)
    return out


def test_save_on_2_ranks_load_on_2_resumes_bit_for_bit(saved):
    at2 = checkpoint.load(saved / "at2.ckpt")
    fd.assert_trees_close(checkpoint.load(saved / "loaded_on_2.ckpt"), at2)
    fd.assert_trees_close(
        checkpoint.load(saved / "resumed_on_2.ckpt"), checkpoint.load(saved / "uninterrupted.ckpt")
    )
    # and the sharded run is the single-process one
    fd.assert_trees_close(at2, _reference(2), rtol=1e-12, atol=1e-15)
    assert dcheckpoint.read_metadata(saved / "run")["world_size"] == 2
    assert dcheckpoint.read_metadata(saved / "run")["metadata"] == {"note": "after 2 steps"}


@pytest.mark.slow
def test_load_on_4_ranks_reshards_and_saves_what_loads_in_one_process(saved):
    script = saved / "worker.py"
    run_ranks(script, 4, ["resume", str(saved / "run"), str(saved)], timeout=300)
    at2 = checkpoint.load(saved / "at2.ckpt")
    fd.assert_trees_close(checkpoint.load(saved / "loaded_on_4.ckpt"), at2)  # bit for bit
    # 4 ranks sum the gradient in another order than 2: equal to rounding, not to the bit.
    resumed = checkpoint.load(saved / "resumed_on_4.ckpt")
    fd.assert_trees_close(
        resumed, checkpoint.load(saved / "uninterrupted.ckpt"), rtol=1e-12, atol=1e-15
    )
    # 2 steps on 2 ranks, then 2 on 4 ranks: the single process's 4 steps.
    fd.assert_trees_close(resumed, _reference(4), rtol=1e-12, atol=1e-15)
    # Saved from 4 ranks (a quarter of each split leaf per file), loaded whole: bit for bit.
    model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
    like = init_train_state(model, optim.adamw(1e-2), seed=1, dtype=torch.float64)
    fd.assert_trees_close(dcheckpoint.load(saved / "run_from_4", like=like), resumed)
    assert dcheckpoint.read_metadata(saved / "run_from_4")["world_size"] == 4


def test_load_in_one_process_and_convert_both_ways(saved, tmp_path):
    at2 = checkpoint.load(saved / "at2.ckpt")
    model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
    like = init_train_state(model, optim.adamw(1e-2), seed=1, dtype=torch.float64)
    untouched = fd.tree.tree_clone(like)
    fd.assert_trees_close(dcheckpoint.load(saved / "run", like=like), at2)
    fd.assert_trees_close(like, untouched)  # like= is a template, not a buffer

    single = tmp_path / "single.ckpt"
    dcheckpoint.to_single_file(saved / "run", single)
    fd.assert_trees_close(checkpoint.load(single), at2)  # TrainState and NamedTuples back
    assert type(checkpoint.load(single)) is fd.TrainState

    back = tmp_path / "back"
    dcheckpoint.from_single_file(single, back)
    fd.assert_trees_close(dcheckpoint.load(back, like=like), at2)


def test_errors_name_the_problem(saved, tmp_path):
    model = models.mlp(in_features=64, hidden=(16,), num_classes=10)
    other = init_train_state(model, optim.adamw(1e-2), seed=0, dtype=torch.float64)
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf 'params.net.0.weight|shape"):
        dcheckpoint.load(saved / "run", like=other)
    sgd = init_train_state(
        models.mlp(in_features=64, hidden=(32,), num_classes=10),
        optim.sgd(0.1),
        dtype=torch.float64,
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"missing .* unexpected"):
        dcheckpoint.load(saved / "run", like=sgd)
    with pytest.raises(checkpoint.CheckpointError, match="no complete distributed checkpoint"):
        dcheckpoint.load(tmp_path / "nothing", like=sgd)
    with pytest.raises(checkpoint.CheckpointError, match="tensors only"):
        dcheckpoint.save(tmp_path / "bad", {"w": torch.ones(1), "note": "text"})


def test_a_rank_dying_mid_save_fails_the_other_and_keeps_the_last_good_checkpoint(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    run = tmp_path / "run"
    procs = start_ranks(script, 2, ["die-in-save", str(run), str(tmp_path)])
    # The worker's collectives time out after 30 s: the survivor must fail well before.
    waited = assert_survivors_name_the_dead_rank(
        procs, 30, "rank {rank} of 2: checkpoint save", also=["last good checkpoint is unchanged"]
    )
    print(f"rank 0 failed {waited:.1f}s after rank 1 died")
    # LATEST still names the step-1 save, which loads and is the step-1 state.
    assert dcheckpoint.latest_version(run) == "step-000000001"
    model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
    like = init_train_state(model, optim.adamw(1e-2), seed=1, dtype=torch.float64)
    fd.assert_trees_close(dcheckpoint.load(run, like=like), _reference(1), rtol=1e-12, atol=1e-15)


class _Payload:
    """A pickle that runs code when loaded: what a hostile checkpoint would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_metadata_pickle_naming_other_code_is_refused_unrun(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved / "run", run)
    marker = tmp_path / "code-ran"
    (run / dcheckpoint.latest_version(run) / ".metadata").write_bytes(
        pickle.dumps(_Payload(marker))
    )
    model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
    like = init_train_state(model, optim.adamw(1e-2), dtype=torch.float64)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load it"):
        dcheckpoint.load(run, like=like)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load it"):
        dcheckpoint.to_single_file(run, tmp_path / "single.ckpt")
    assert not marker.exists()
