"""Sharded training on DTensors (gloo, localhost): 2 (and 4) ranks holding 1/N of the
params and optimiser state take the single-process step on the whole batch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import functorch_diary as fd
from functorch_diary import checkpoint, optim
from functorch_diary.training import sharded
from tests.helpers import (
    SmallBNNet,
    assert_survivors_name_the_dead_rank,
    run_ranks,
    start_ranks,
    torchrun,
    torchrun_reference,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

# One launch of the ranks runs every case (starting processes costs more than the cases).
# Rank 0 also runs the single-process step (make_train_step) on the whole batch and
# compares; each case prints one JSON line that the tests below read.
_WORKER = """
import json, sys, time
import torch
from torch import nn
from functorch_diary import init_train_state, make_train_step
from functorch_diary.testing import assert_trees_close
from functorch_diary.training import distributed, sharded
from functorch_diary.tree import tree_leaves
from tests.helpers import assert_close_to_scale, sharded_case, sharded_tolerance

world = distributed.init_from_env("gloo", timeout_s=60)
mesh = sharded.make_mesh()

# The memory share alone (no step): ResNet-18's params and AdamW state on this mesh.
from functorch_diary import models, optim
whole = init_train_state(models.resnet18(num_classes=10), optim.adamw(1e-3), seed=0)
ts = sharded.shard_train_state(whole, mesh)
print(json.dumps({
    "case": "resnet18-share", "rank": world.rank,
    "params_share": sharded.local_bytes(ts.params) / sharded.local_bytes(whole.params),
    "opt_share": sharded.local_bytes(ts.opt_state) / sharded.local_bytes(whole.opt_state),
}), flush=True)

for name in sys.argv[1:]:
    start = time.perf_counter()
    model, opt, dtype, batches = sharded_case(name)
    whole = init_train_state(model, opt, seed=0, dtype=dtype)
    ts = sharded.shard_train_state(whole, mesh)
    step = sharded.make_sharded_train_step(model, nn.functional.cross_entropy, opt)
    losses = []
    for batch in batches:
        ts, metrics = step(ts, distributed.shard(batch, world.rank, world.world_size))
        losses.append(float(metrics["loss"]))
    seconds = time.perf_counter() - start
    report = {
        "case": name, "rank": world.rank, "seconds": round(seconds, 2),
        "params_share": sharded.local_bytes(ts.params) / sharded.local_bytes(whole.params),
        "opt_share": sharded.local_bytes(ts.opt_state) / sharded.local_bytes(whole.opt_state),
        "placements": {k: str(v.placements[0]) for k, v in ts.params.items()},
    }
    gathered = sharded.gather_train_state(ts)
    if world.rank == 0:
        ref = whole
        ref_step = make_train_step(model, nn.functional.cross_entropy, opt)
        ref_losses = []
        for batch in batches:
            ref, metrics = ref_step(ref, batch)
            ref_losses.append(float(metrics["loss"]))
        rtol = sharded_tolerance(name)
        pairs = zip(tree_leaves(gathered[:3]), tree_leaves(ref[:3]), strict=True)
        report["worst_of_scale"] = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
            for a, b in pairs if b.is_floating_point() and b.numel()
        )
        try:
            assert int(gathered.step) == len(batches)
            for part in ("params", "opt_state", "state"):
                assert_close_to_scale(getattr(gathered, part), getattr(ref, part), rtol)
            assert_trees_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol)
            report["error"] = None
        except AssertionError as error:
            report["error"] = str(error)
    print(json.dumps(report), flush=True)

# BatchNorm both ways on a conv net, with a user placement that splits a weight on dim 1:
# synchronised statistics equal one process; per-shard ones equal the data-parallel step.
from torch.distributed.tensor import Shard
from functorch_diary import Model, optim
from tests.helpers import SmallBNNet
model, opt = Model(SmallBNNet), optim.sgd(0.1, momentum=0.9)
whole = init_train_state(model, opt, seed=0, dtype=torch.float64)
gen = torch.Generator().manual_seed(1)
batches = [(torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64), torch.arange(8) % 10)
           for _ in range(3)]
placements = {"head.weight": Shard(1), "features.1.*": Shard(0)}
for name, sync, ref_step in [
    ("bn-synchronised", True, make_train_step(model, nn.functional.cross_entropy, opt)),
    ("bn-per-shard", False,
     distributed.make_data_parallel_train_step(model, nn.functional.cross_entropy, opt)),
]:
    ts = sharded.shard_train_state(whole, mesh, placements, min_numel=1)
    step = sharded.make_sharded_train_step(
        model, nn.functional.cross_entropy, opt, sync_batch_norm=sync)
    ref = whole
    for batch in batches:
        local = distributed.shard(batch, world.rank, world.world_size)
        ts, _ = step(ts, local)
        ref, _ = ref_step(ref, batch if sync else local)
    gathered = sharded.gather_train_state(ts)
    report = {"case": name, "rank": world.rank,
              "placements": {k: str(v.placements[0]) for k, v in ts.params.items()}}
    try:
        assert_close_to_scale(gathered[:3], ref[:3], 1e-12)
        report["error"] = None
    except AssertionError as error:
        report["error"] = str(error)
    print(json.dumps(report), flush=True)

# make_train_step's contract, global-norm clipping and the stages that need whole leaves,
# on the MLP (net.1.weight is split, the rest replicated), 3 steps of a dict batch.
from functorch_diary import models, optim
from functorch_diary.optim import shards
from torch.distributed.tensor import Replicate
model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
gen = torch.Generator().manual_seed(2)
batches = [{"x": torch.randn(8, 64, generator=gen, dtype=torch.float64),
            "y": torch.randint(0, 10, (8,), generator=gen)} for _ in range(3)]

def regularised(params, outputs, batch):  # sees the params (whole) and the batch
    fit = nn.functional.cross_entropy(outputs, batch["y"])
    l2 = sum(p.square().sum() for p in params.values())
    right = (outputs.argmax(1) == batch["y"]).to(outputs.dtype).mean()
    return fit + 1e-3 * l2, {"fit": fit, "accuracy": right}

contract = dict(loss_sees="params, outputs, batch", has_aux=True,
                model_inputs=lambda batch: batch["x"], donate=True)
weights_muon = optim.multi_transform(
    {"m": optim.muon(0.02, weight_decay=0.1), "a": optim.adamw(1e-2, eps=1e-4)},
    {"m": "*.weight", "a": "*.bias"})
cases = {  # name: (optimiser, user placements, the step's options)
    "contract": (optim.adamw(1e-2, weight_decay=0.1, eps=1e-4), None, contract),
    "clip-global-norm": (optim.apply_if_finite(optim.chain(
        optim.clip_by_global_norm(0.05), optim.sgd(0.1, momentum=0.9))), None, {}),
    "muon-replicated": (weights_muon, {"net.1.weight": Replicate()}, {}),
}
for name, (opt, placements, options) in cases.items():
    loss_fn = regularised if options else (
        lambda out, y: nn.functional.cross_entropy(out, y))
    pairs = [(b, b) if options else ((b["x"], b["y"]),) * 2 for b in batches]
    whole = init_train_state(model, opt, seed=0, dtype=torch.float64)
    ts = sharded.shard_train_state(whole, mesh, placements)
    step = sharded.make_sharded_train_step(model, loss_fn, opt, **options)
    ref_step = make_train_step(model, loss_fn, opt, **options)
    ref, metrics, ref_metrics = whole, [], []
    for batch, _ in pairs:
        ts, m = step(ts, distributed.shard(batch, world.rank, world.world_size))
        ref, r = ref_step(ref, batch)
        metrics.append(m)
        ref_metrics.append(r)
    report = {"case": name, "rank": world.rank, "metrics": sorted(metrics[0]),
              "placements": {k: str(v.placements[0]) for k, v in ts.params.items()}}
    if name == "clip-global-norm":  # the clipping did act: unclipped SGD goes elsewhere
        plain = optim.sgd(0.1, momentum=0.9)
        free = make_train_step(model, loss_fn, plain)(
            init_train_state(model, plain, seed=0, dtype=torch.float64), pairs[0][0])[0]
        first = make_train_step(model, loss_fn, opt)(whole, pairs[0][0])[0]
        report["clip_changed_step_by"] = float(
            (free.params["net.1.weight"] - first.params["net.1.weight"]).abs().max())
    try:
        assert_close_to_scale(sharded.gather_train_state(ts)[:3], ref[:3], 1e-12)
        assert_close_to_scale(metrics, ref_metrics, 1e-12)
        report["error"] = None
    except AssertionError as error:
        report["error"] = str(error)
    print(json.dumps(report), flush=True)

# Stages that need a whole leaf refuse a split one, naming it; one that reduces over the
# leaves sees every rank (a flag false on rank 0 only is false everywhere).
refusals = {
    "muon": weights_muon,
    "adafactor": optim.adafactor(lr=0.01),
    "dp_aggregate": optim.chain(optim.dp_aggregate(1.0, 0.0, key=0), optim.sgd(0.1)),
}
report = {"case": "refusals", "rank": world.rank}
batch = distributed.shard((batches[0]["x"], batches[0]["y"]), world.rank, world.world_size)
for name, opt in refusals.items():
    ts = sharded.shard_train_state(init_train_state(model, opt, dtype=torch.float64), mesh)
    try:
        sharded.make_sharded_train_step(model, nn.functional.cross_entropy, opt)(ts, batch)
        report[name] = None
    except ValueError as error:
        report[name] = str(error)
def total(t):
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t

with shards.local_shards({}, total):
    report["all_ranks"] = bool(shards.all_ranks(torch.tensor(world.rank != 0)))
print(json.dumps(report), flush=True)
torch.distributed.destroy_process_group()
"""

CASES = [
    "mlp-sgdm-float64",
    "mlp-adamw-float64",
    "lenet-sgdm-float64",
    "lenet-adamw-float64",
    "resnet18-sgdm-float64",
    "resnet18-adamw-float64",
    "mlp-groups-float64",
    "mlp-frozen-float64",
    "mlp-sgdm-float32",
    "lenet-adamw-float32",
]


def _reports(stdout: list[str]) -> dict[tuple[str, int], dict]:
    lines = [json.loads(line) for out in stdout for line in out.splitlines() if line[:1] == "{"]
    return {(r["case"], r["rank"]): r for r in lines}


# On 4 ranks (slower: 4 processes on 2 cores), the equality cases of the three models.
FOUR_RANK_CASES = ["mlp-sgdm-float64", "mlp-adamw-float64", "lenet-sgdm-float64",
                   "lenet-adamw-float64", "resnet18-sgdm-float64",
                   "resnet18-adamw-float64"]  # fmt: skip


def _launch(tmp_path_factory, ranks: int, cases: list[str]) -> dict[tuple[str, int], dict]:
    script = tmp_path_factory.mktemp("sharded") / "worker.py"
    script.write_text(_WORKER)
    return _reports(run_ranks(script, ranks, cases, timeout=600))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(tmp_path_factory, 2, CASES)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _launch(tmp_path_factory, 4, FOUR_RANK_CASES)


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_process_on_the_whole_batch(two_ranks, name):
    report = two_ranks[name, 0]
    print(f"{name}: {report['seconds']} s on rank 0, worst {report['worst_of_scale']:.2g}")
    assert report["error"] is None, report["error"]


@pytest.mark.parametrize("name", ["mlp-adamw-float64", "resnet18-adamw-float64"])
def test_each_rank_holds_about_half_of_params_and_optimizer_state(two_ranks, name):
    for rank in (0, 1):
        report = two_ranks[name, rank]
        # Large leaves are halved; small ones (biases, the MLP's 10x32 head) are replicated.
        assert "S(0)" in report["placements"].values()
        assert "R" in report["placements"].values()
        bound = 0.6 if name.startswith("mlp") else 0.51
        assert 0.45 < report["params_share"] < bound, report
        assert 0.45 < report["opt_share"] < bound, report


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR_RANK_CASES)
def test_four_ranks_equal_one_process_on_the_whole_batch(four_ranks, name):
    report = four_ranks[name, 0]
    print(f"{name}: {report['seconds']} s on rank 0, worst {report['worst_of_scale']:.2g}")
    assert report["error"] is None, report["error"]


@pytest.mark.slow
def test_each_of_four_ranks_holds_a_quarter_and_batch_norm_policies_hold(four_ranks):
    for rank in range(4):
        share = four_ranks["resnet18-share", rank]
        # ResNet-18's replicated leaves (BatchNorm affine params, biases) are 0.07% of it.
        assert 0.249 < share["params_share"] < 0.252, share
        assert 0.249 < share["opt_share"] < 0.252, share
        for name in ("bn-synchronised", "bn-per-shard"):
            assert four_ranks[name, rank]["error"] is None, four_ranks[name, rank]["error"]


def test_placement_rule_and_user_placements():
    tree = {
        "fc.weight": torch.ones(64, 32),
        "fc.bias": torch.ones(64),
        "tiny.weight": torch.ones(1, 2048),
        "step": torch.zeros((), dtype=torch.int64),
    }
    assert sharded.placements_for(tree, 2) == {
        "fc.weight": Shard(0),
        "fc.bias": Replicate(),  # fewer than DEFAULT_MIN_NUMEL elements
        "tiny.weight": Replicate(),  # fewer rows than ranks
        "step": Replicate(),  # 0-dim, integer
    }
    assert sharded.placements_for(tree, 2, min_numel=1)["fc.bias"] == Shard(0)
    chosen = sharded.placements_for(tree, 2, {"fc.*": Replicate(), "fc.weight": Shard(1)})
    assert chosen["fc.weight"] == Replicate()  # the first selector that picks a leaf wins
    assert sharded.placements_for(tree, 2, {"fc.weight": Shard(1)})["fc.weight"] == Shard(1)
    with pytest.raises(ValueError, match=r"leaf 'fc.bias' of shape \(64,\) cannot take"):
        sharded.placements_for(tree, 2, {"fc.bias": Shard(1)})
    with pytest.raises(ValueError, match="matches no leaf"):
        sharded.placements_for(tree, 2, {"conv.*": Replicate()})


def test_make_mesh_without_a_process_group_says_what_to_do():
    with pytest.raises(sharded.DistributedError, match="init_from_env"):
        sharded.make_mesh()


_DYING_WORKER = """
import os, sys, torch
from torch import nn
from functorch_diary import data, init_train_state, models, optim
from functorch_diary.training import distributed, sharded

world = distributed.init_from_env("gloo", timeout_s=float(sys.argv[1]))
model, opt = models.mlp(in_features=64, hidden=(32,), num_classes=10), optim.sgd(0.1)
ts = sharded.shard_train_state(init_train_state(model, opt, seed=0), sharded.make_mesh())
calls = []

def loss_fn(outputs, targets):
    calls.append(1)
    if world.rank == int(sys.argv[2]) and len(calls) == 3:
        os._exit(7)  # dies mid-step: after the all-gathers, before the reduce-scatters
    return nn.functional.cross_entropy(outputs, targets)

step = sharded.make_sharded_train_step(model, loss_fn, opt)
for i in range(50):
    ts, _ = step(ts, distributed.shard(data.digits_batch(i, 16), world.rank, world.world_size))
print("finished", flush=True)
"""


# Among 4, the ranks that notice first take ~2 s to name rank 3, then seconds to exit (a
# sharded step's pending collectives); a rank blocked on one of them fails only then, and
# names rank 3 from what it watched since the alarm: ~12 s in all under load.
@pytest.mark.parametrize(
    ("ranks", "dead", "timeout_s"),
    [(2, 1, 20), pytest.param(4, 3, 60, marks=pytest.mark.slow)],
    ids=["2-ranks", "4-ranks"],
)
def test_a_rank_dying_mid_step_is_named_by_every_survivor_quickly(tmp_path, ranks, dead, timeout_s):
    script = tmp_path / "worker.py"
    script.write_text(_DYING_WORKER)
    procs = start_ranks(script, ranks, [str(timeout_s), str(dead)])
    waited = assert_survivors_name_the_dead_rank(
        procs,
        timeout_s,
        f"rank {{rank}} of {ranks}: a collective of the sharded step failed: rank {dead} died",
        dead=dead,
    )
    print(f"the last survivor failed {waited:.1f}s after rank {dead} died")


def test_torchrun_shard_trains_sharded_and_equals_one_process(tmp_path):
    out = tmp_path / "sharded.ckpt"
    torchrun(["--shard", "--steps", "4", "--batch-size", "16", "--optimizer", "adam", "--lr",
              "0.01", "--dtype", "float64", "--out", str(out)], cwd=tmp_path)  # fmt: skip
    ts = torchrun_reference(steps=4, batch_size=16)
    assert checkpoint.read_metadata(out) == {"world_size": 2, "sharded": True}
    got = checkpoint.load(out)
    assert int(got.step) == 4
    fd.assert_trees_close(got.params, ts.params, rtol=1e-12, atol=1e-15)
    fd.assert_trees_close(got.opt_state, ts.opt_state, rtol=1e-12, atol=1e-15)


@pytest.fixture
def one_rank_group():
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        yield sharded.make_mesh()
    finally:
        torch.distributed.destroy_process_group()


def test_on_one_rank_the_sharded_step_is_the_step_bit_for_bit_and_pure(one_rank_group):
    model = fd.Model(SmallBNNet)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    whole = fd.init_train_state(model, opt, seed=0, dtype=torch.float64)
    ts = sharded.shard_train_state(whole, one_rank_group, min_numel=1)
    before = fd.tree.tree_clone(sharded.gather_train_state(ts))
    step = sharded.make_sharded_train_step(model, nn.functional.cross_entropy, opt)
    ref_step = fd.make_train_step(model, nn.functional.cross_entropy, opt)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64), torch.arange(6) % 10)
    new, metrics = step(ts, batch)
    ref, ref_metrics = ref_step(whole, batch)
    fd.assert_trees_close(sharded.gather_train_state(new), ref)
    fd.assert_trees_close(metrics["loss"], ref_metrics["loss"])
    fd.assert_trees_close(sharded.gather_train_state(ts), before)  # the input is untouched
    for leaf in fd.tree.tree_leaves((new, metrics)):
        local = leaf.to_local() if isinstance(leaf, DTensor) else leaf
        assert not local.requires_grad and local.grad_fn is None
    assert {type(leaf) for leaf in fd.tree.tree_leaves((new.params, new.state))} == {DTensor}


def test_empty_train_state_is_placed_like_a_sharded_one(one_rank_group):
    model, opt = fd.Model(SmallBNNet), optim.sgd(0.1, momentum=0.9)
    empty = sharded.empty_train_state(model, opt, one_rank_group, dtype=torch.float64)
    full = sharded.shard_train_state(
        fd.init_train_state(model, opt, dtype=torch.float64), one_rank_group
    )
    describe = lambda tree: [  # noqa: E731
        (path, type(x), tuple(x.shape), x.dtype, getattr(x, "placements", None))
        for path, x in fd.tree.tree_flatten_with_paths(tree)
    ]
    assert describe(empty) == describe(full)


@pytest.mark.parametrize("name", ["contract", "clip-global-norm", "muon-replicated"])
def test_the_train_step_s_contract_clipping_and_muon_equal_one_process(two_ranks, name):
    """A loss that sees the params, a dict batch and auxiliary metrics (donating the
    state, as make_train_step(donate=True) does); global-norm
    clipping over both ranks' shards; muon on a weight the user keeps whole."""
    for rank in (0, 1):
        report = two_ranks[name, rank]
        assert report["placements"]["net.1.weight"] == (
            "R" if name == "muon-replicated" else "S(0)"
        )
        assert report["error"] is None, report["error"]
    if name == "contract":
        assert two_ranks[name, 0]["metrics"] == ["accuracy", "fit", "loss"]
    if name == "clip-global-norm":
        assert two_ranks[name, 0]["clip_changed_step_by"] > 1e-3


def test_stages_that_need_a_whole_leaf_refuse_a_split_one(two_ranks):
    for rank in (0, 1):
        report = two_ranks["refusals", rank]
        for name, needs in [
            ("muon", "orthogonalises each whole 2-D matrix"),
            ("adafactor", "reads each whole leaf"),
        ]:
            assert report[name] is not None, f"{name} ran on a split leaf"
            assert report[name].startswith(f"{name} {needs}"), report[name]
            assert "param 'net.1.weight' is split across ranks (S(0))" in report[name]
            assert "placements={'net.1.weight': Replicate()}" in report[name]
        assert "make_dp_train_step" in report["dp_aggregate"]
        assert report["all_ranks"] is False  # rank 0's False reaches rank 1


@pytest.mark.parametrize("name", ["bn-synchronised", "bn-per-shard"])
def test_batch_norm_policies_and_a_dim_1_placement(two_ranks, name):
    for rank in (0, 1):
        report = two_ranks[name, rank]
        assert report["placements"]["head.weight"] == "S(1)"
        assert report["placements"]["features.1.weight"] == "S(0)"
        # synchronised: the single process on the whole batch; per shard: data parallel
        assert report["error"] is None, report["error"]


def test_a_donating_sharded_step_refuses_a_state_it_consumed(one_rank_group):
    model, opt = fd.Model(SmallBNNet), optim.adamw(1e-2)
    whole = fd.init_train_state(model, opt, seed=0, dtype=torch.float64)
    ts = sharded.shard_train_state(whole, one_rank_group, min_numel=1)
    step = sharded.make_sharded_train_step(model, nn.functional.cross_entropy, opt, donate=True)
    ref_step = fd.make_train_step(model, nn.functional.cross_entropy, opt)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64), torch.arange(6) % 10)
    new, _ = step(ts, batch)
    fd.assert_trees_close(sharded.gather_train_state(new), ref_step(whole, batch)[0])
    with pytest.raises(ValueError, match="donated to an earlier step"):
        step(ts, batch)
