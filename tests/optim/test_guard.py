"""Non-finite guard: bad steps change nothing and are counted; good steps are untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functorch_diary as fd
from functorch_diary import optim
from functorch_diary.optim import shards
from functorch_diary.optim.guard import (
    FiniteGuardState,
    all_finite,
    apply_if_finite,
    nonfinite_paths,
)
from functorch_diary.training.guard import guard_train_step
from functorch_diary.tree import tree_clone

NAN, INF = float("nan"), float("inf")


def _params():
    return {"a": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), "b": torch.ones(2)}


def _grads(value: float = 0.5, bad: float | None = None):
    grads = {"a": torch.full((3, 2), value), "b": torch.full((2,), -value)}
    if bad is not None:
        grads["b"] = grads["b"].clone()
        grads["b"][1] = bad
    return grads


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_bad_gradients_give_zero_update_keep_state_and_count(bad):
    opt = apply_if_finite(optim.adam(0.1))
    params = _params()
    state = opt.init(params)
    _, state = opt.update(_grads(), state, params)  # one good step: non-trivial moments
    before = tree_clone(state)
    updates, new = opt.update(_grads(bad=bad), state, params)
    # A skipped step's update is -0.0 (optim.NO_UPDATE): adding it keeps every param bit.
    fd.assert_trees_close(updates, {"a": torch.full((3, 2), -0.0), "b": torch.full((2,), -0.0)})
    fd.assert_trees_close(new.inner, before.inner)  # bit for bit
    assert (int(new.skipped), int(new.consecutive)) == (1, 1)
    _, again = opt.update(_grads(bad=bad), new, params)
    assert (int(again.skipped), int(again.consecutive)) == (2, 2)
    _, good = opt.update(_grads(), again, params)
    assert (int(good.skipped), int(good.consecutive)) == (2, 0)
    fd.assert_trees_close(state, before)  # inputs untouched


def test_good_steps_match_the_unwrapped_optimizer_exactly():
    inner = optim.sgd(0.1, momentum=0.9)
    guarded = apply_if_finite(inner)
    params = _params()
    s_in, s_g = inner.init(params), guarded.init(params)
    for i in range(4):
        u_in, s_in = inner.update(_grads(0.1 * (i + 1)), s_in, params)
        u_g, s_g = guarded.update(_grads(0.1 * (i + 1)), s_g, params)
        fd.assert_trees_close(u_g, u_in)
    fd.assert_trees_close(s_g.inner, s_in)


def test_raise_mode_names_the_bad_leaf():
    opt = apply_if_finite(optim.sgd(0.1), on_nonfinite="raise")
    params = _params()
    with pytest.raises(FloatingPointError, match=r"non-finite gradient leaves: b\b"):
        opt.update(_grads(bad=NAN), opt.init(params), params)
    with pytest.raises(ValueError, match="'skip' or 'raise'"):
        apply_if_finite(optim.sgd(0.1), on_nonfinite="ignore")


def test_raise_mode_on_shards_says_another_rank_s_piece_is_not_finite():
    """On shards the flag is and-ed over the ranks: a rank whose own pieces are finite
    raises too, and says the bad values are another rank's (it named no leaf)."""
    opt = apply_if_finite(optim.sgd(0.1), on_nonfinite="raise")
    params = _params()
    # A stand-in for the all-reduce of the failure flags: another rank failed.
    another_failed = shards.local_shards({"a": "Shard(0)"}, lambda failed: failed + 1)
    with another_failed, pytest.raises(FloatingPointError, match="another rank's shard of a"):
        opt.update(_grads(), opt.init(params), params)


def test_all_finite_and_paths():
    tree = {"x": torch.ones(2), "n": torch.tensor([1, 2]), "y": (torch.tensor([0.0, INF]),)}
    assert not bool(all_finite(tree))
    assert nonfinite_paths(tree) == ["y.0"]
    assert bool(all_finite({"x": torch.ones(2)})) and bool(all_finite({}))


def _bn_model():
    return fd.Model(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)


def test_guarded_step_skips_a_nan_batch_entirely():
    model = _bn_model()
    opt = apply_if_finite(optim.adam(1e-2))
    step = guard_train_step(fd.make_train_step(model, nn.functional.cross_entropy, opt))
    ts, _ = step(fd.init_train_state(model, opt, seed=0), _batch(0))
    before = tree_clone(ts)
    x, y = _batch(1)
    x[2, 1] = NAN  # poisons the loss, the gradients and the BatchNorm statistics
    new, metrics = step(ts, (x, y))
    assert bool(metrics["skipped"]) and not bool(torch.isfinite(metrics["loss"]))
    fd.assert_trees_close(new.params, before.params)
    fd.assert_trees_close(new.state, before.state)
    fd.assert_trees_close(new.opt_state.inner, before.opt_state.inner)
    assert int(new.opt_state.skipped) == 1 and int(new.step) == int(before.step) + 1
    fd.assert_trees_close(ts, before)  # the input TrainState is untouched


def test_guarded_step_skips_a_nonfinite_loss_with_finite_gradients():
    model = _bn_model()
    opt = apply_if_finite(optim.sgd(0.1))

    def loss_fn(outputs, targets):
        # an inf constant: the gradient is finite, the loss is not
        return nn.functional.cross_entropy(outputs, targets) + torch.tensor(INF)

    ts = fd.init_train_state(model, opt, seed=0)
    new, metrics = guard_train_step(fd.make_train_step(model, loss_fn, opt))(ts, _batch(0))
    assert bool(metrics["skipped"]) and int(new.opt_state.skipped) == 1
    fd.assert_trees_close(new.params, ts.params)
    fd.assert_trees_close(new.state, ts.state)


def test_guarded_good_step_equals_the_unguarded_train_step():
    model = _bn_model()
    opt = apply_if_finite(optim.adam(1e-2))
    ts = fd.init_train_state(model, opt, seed=0)
    guarded = guard_train_step(fd.make_train_step(model, nn.functional.cross_entropy, opt))
    plain_opt = optim.adam(1e-2)
    plain = fd.make_train_step(model, nn.functional.cross_entropy, plain_opt)
    b = fd.init_train_state(model, plain_opt, seed=0)
    a = ts
    for i in range(3):
        a, ma = guarded(a, _batch(i))
        b, mb = plain(b, _batch(i))
        assert not bool(ma["skipped"])
        fd.assert_trees_close(ma["loss"], mb["loss"])
    fd.assert_trees_close(a.params, b.params)
    fd.assert_trees_close(a.state, b.state)
    fd.assert_trees_close(a.opt_state.inner, b.opt_state)


def test_guarded_step_needs_a_guarded_state():
    model = _bn_model()
    ts = fd.init_train_state(model, optim.sgd(0.1), seed=0)
    opt = apply_if_finite(optim.sgd(0.1))
    step = guard_train_step(fd.make_train_step(model, nn.functional.cross_entropy, opt))
    with pytest.raises(TypeError, match="apply_if_finite"):
        step(ts, _batch(0))


def test_guarded_step_compiles_to_one_graph_and_skips():
    """make_train_step compiles with fullgraph=True: a Python branch on a tensor value in
    apply_if_finite would be a compile error."""
    model = fd.Model(lambda: nn.Linear(3, 2))
    opt = apply_if_finite(optim.sgd(0.1, momentum=0.9))
    loss = nn.functional.cross_entropy
    eager = guard_train_step(fd.make_train_step(model, loss, opt, compile=False))
    compiled = guard_train_step(fd.make_train_step(model, loss, opt, compile=True))
    ts_e = ts_c = fd.init_train_state(model, opt, seed=0)
    bad_x = _batch(5)[0].clone()
    bad_x[0, 0] = INF
    for batch in (_batch(0), (bad_x, _batch(5)[1]), _batch(1)):
        ts_e, m_e = eager(ts_e, batch)
        ts_c, m_c = compiled(ts_c, batch)
        assert bool(m_e["skipped"]) == bool(m_c["skipped"])
    assert int(ts_c.opt_state.skipped) == 1
    fd.assert_trees_close(ts_c.params, ts_e.params, rtol=1e-4, atol=1e-6)
    assert isinstance(ts_c.opt_state, FiniteGuardState)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_a_skipped_step_keeps_a_negative_zero_param_on_both_paths(name):
    """Issue 14's example: update + apply_updates used to add a +0.0 update and turn -0.0
    into +0.0 where apply_gradients kept -0.0; a skipped step now emits -0.0."""
    opt = optim.apply_if_finite(getattr(optim, name)(lr=0.1))
    params = {"w": torch.tensor([-0.0, 0.0, 1.0])}
    grads = {"w": torch.tensor([1.0, float("nan"), 1.0])}
    state = opt.init(params)
    updates, _ = opt.update(grads, state, params)
    by_update = optim.apply_updates(params, updates)["w"]
    by_apply = optim.apply_gradients(opt, grads, state, params)[0]["w"]
    bits = params["w"].view(torch.int32)
    assert torch.equal(by_update.view(torch.int32), bits)
    assert torch.equal(by_apply.view(torch.int32), bits)
