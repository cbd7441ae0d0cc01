"""``make_train_step(..., donate=True)``: JAX's buffer donation for the ``TrainState``.

The donated step writes its results into the tensors of the ``TrainState`` it is given
(eagerly the fused optimiser kernels run in place on them, as ``torch.optim`` does) and
must give the pure step's numbers bit for bit: a model with BatchNorm (state carried out
of the step), optimisers with state (SGD momentum, Adam, the finite guard), eager and
compiled (``aot_eager``: Dynamo + AOTAutograd, whose functionalisation is what turns the
writes into input mutations; no code generation, so it stays fast).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_diary as fd
from functorch_diary import optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone, tree_leaves

OPTIMIZERS = {
    "sgd_momentum": lambda: optim.sgd(0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda: optim.adam(1e-2),
    "guarded_adam": lambda: optim.apply_if_finite(optim.adam(1e-2)),
}
COMPILE = {
    "eager": {"compile": False},
    "aot_eager": {"compile": True, "compile_backend": "aot_eager"},
}


def _model() -> fd.Model:
    return fd.Model(
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)
        )
    )


def _batches(n: int = 3, nan_at: int | None = None):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(5, 1, 6, 6, generator=gen)
        if i == nan_at:
            x[0, 0, 0, 0] = float("nan")  # a non-finite gradient: the guard skips the step
        out.append((x, torch.randint(0, 4, (5,), generator=gen)))
    return out


def _run(step, ts, batches):
    for batch in batches:
        ts, _ = step(ts, batch)
    return ts


# Every optimiser eagerly (where the in-place kernels run); compiled, Adam (state of its
# own, on top of BatchNorm's): each aot_eager compile costs seconds on 2 cores.
CASES = [(name, "eager") for name in OPTIMIZERS] + [("adam", "aot_eager")]


@pytest.mark.parametrize(("opt_name", "mode"), CASES)
def test_donated_step_equals_pure_step_bit_for_bit(opt_name, mode):
    model, opt = _model(), OPTIMIZERS[opt_name]()
    ts0 = fd.init_train_state(model, opt, seed=0)
    batches = _batches(nan_at=1 if opt_name == "guarded_adam" else None)
    pure = fd.make_train_step(model, F.cross_entropy, opt, **COMPILE[mode])
    donated = fd.make_train_step(model, F.cross_entropy, opt, donate=True, **COMPILE[mode])

    want = _run(pure, tree_clone(ts0), batches)
    given = tree_clone(ts0)
    storage = {id(t): t.data_ptr() for t in tree_leaves((given.params, given.state))}
    got = _run(donated, given, batches)

    assert_trees_close(got, want)  # params, BatchNorm state, optimiser state, step
    # The results live in the storage of the TrainState that was given.
    for old, new in zip(
        tree_leaves((given.params, given.state)), tree_leaves((got.params, got.state)), strict=True
    ):
        assert new.data_ptr() == storage[id(old)]


def test_eager_fused_kernels_run_in_place_on_the_donated_state():
    model, opt = _model(), optim.adam(1e-2)
    ts = fd.init_train_state(model, opt, seed=0)
    mu = tree_leaves(ts.opt_state)
    pointers = [t.data_ptr() for t in tree_leaves((ts.params, ts.opt_state))]
    step = fd.make_train_step(model, F.cross_entropy, opt, donate=True, compile=False)
    new, _ = step(ts, _batches(1)[0])
    # Every leaf is the given tensor (nothing was copied back: no second buffer at all).
    assert all(a is b for a, b in zip(tree_leaves(new.opt_state), mu, strict=True))
    assert [t.data_ptr() for t in tree_leaves((new.params, new.opt_state))] == pointers


def test_a_donated_train_state_cannot_be_used_again():
    # The check runs outside the compiled graph, so eager shows it for both.
    model, opt = _model(), optim.sgd(0.1, momentum=0.9)
    ts = fd.init_train_state(model, opt, seed=0)
    step = fd.make_train_step(model, F.cross_entropy, opt, donate=True, compile=False)
    batch = _batches(1)[0]
    new, _ = step(ts, batch)
    with pytest.raises(ValueError, match="donated to an earlier step"):
        step(ts, batch)
    step(new, batch)  # the returned one is fine


@pytest.mark.parametrize("mode", COMPILE)
def test_the_step_without_donate_leaves_its_input_untouched(mode):
    model, opt = _model(), optim.adam(1e-2)
    ts = fd.init_train_state(model, opt, seed=0)
    ts = _run(fd.make_train_step(model, F.cross_entropy, opt, compile=False), ts, _batches(1))
    before = tree_clone(ts)
    step = fd.make_train_step(model, F.cross_entropy, opt, **COMPILE[mode])
    new, _ = step(ts, _batches(1)[0])
    assert_trees_close(ts, before)  # bit for bit, signed zeros included
    assert not {t.data_ptr() for t in tree_leaves(new.params)} & {
        t.data_ptr() for t in tree_leaves(ts.params)
    }
    step(ts, _batches(1)[0])  # and it may be stepped again
