"""``lookahead`` against the paper's imperative loop written here over torch tensors (torch.optim
has no Lookahead), and against optax's documented behaviour."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from functorch_diary import Model, init_train_state, make_train_step, optim
from functorch_diary.testing import assert_trees_close
from tests.helpers import dynamo_counts

F64 = {"rtol": 1e-12, "atol": 1e-14}


def _loss(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((x @ weight.T + bias).tanh() - 0.3).square().mean()


def _imperative(params, batches, make_opt, sync_period, alpha, reset_state):
    """The paper's two loops: k torch.optim steps on the fast weights, then
    slow += alpha * (fast - slow); fast = slow (and a fresh optimiser state if asked)."""
    fast = {name: nn.Parameter(p.clone()) for name, p in params.items()}
    slow = {name: p.clone() for name, p in params.items()}
    opt = make_opt(list(fast.values()))
    trajectory = []
    for step, x in enumerate(batches, start=1):
        opt.zero_grad()
        _loss(fast["weight"], fast["bias"], x).backward()
        opt.step()
        if step % sync_period == 0:
            with torch.no_grad():
                for name, p in fast.items():
                    slow[name] += alpha * (p - slow[name])
                    p.copy_(slow[name])
            if reset_state:
                opt.state.clear()  # torch.optim re-creates its buffers lazily, as at step 0
        trajectory.append(
            (
                {n: p.detach().clone() for n, p in fast.items()},
                {n: s.clone() for n, s in slow.items()},
            )
        )
    return trajectory


@pytest.mark.parametrize("reset_state", [False, True], ids=["keep", "reset"])
@pytest.mark.parametrize(
    ("fast", "torch_fast"),
    [
        (optim.sgd(0.2, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)),
        (optim.adam(0.05), lambda ps: torch.optim.Adam(ps, lr=0.05)),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_lookahead_matches_the_imperative_loop(fast, torch_fast, reset_state):
    gen = torch.Generator().manual_seed(0)
    params = {
        "weight": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "bias": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    batches = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(11)]
    want = _imperative(
        params, batches, torch_fast, sync_period=3, alpha=0.4, reset_state=reset_state
    )
    opt = optim.lookahead(fast, sync_period=3, slow_step_size=0.4, reset_state=reset_state)
    state = opt.init(params)
    for step, (x, (want_fast, want_slow)) in enumerate(zip(batches, want, strict=True)):
        grads = torch.func.grad(lambda p, x=x: _loss(p["weight"], p["bias"], x))(params)
        params, state = optim.apply_gradients(opt, grads, state, params)
        assert_trees_close(params, want_fast, **F64)
        assert_trees_close(optim.slow_params(state), want_slow, **F64)
        assert int(state.steps_since_sync) == (step + 1) % 3
    # Synchronised on the last multiple of 3 and moved on since: fast and slow differ now.
    assert not torch.equal(params["weight"], optim.slow_params(state)["weight"])


def test_reset_state_restores_the_fast_state_at_each_sync():
    opt = optim.lookahead(optim.adam(0.1), sync_period=2, slow_step_size=0.5, reset_state=True)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    fresh = opt.init(params).fast_state
    params, state = optim.apply_gradients(opt, {"w": torch.ones(2)}, state, params)
    assert int(state.fast_state[-1].count) == 1 and state.fast_state[-1].mu["w"].abs().sum() > 0
    params, state = optim.apply_gradients(opt, {"w": torch.ones(2)}, state, params)
    assert_trees_close(state.fast_state, fresh)


def test_optax_documented_example():
    # optax.lookahead's docstring: sgd(1e-2), sync_period=5, slow_step_size=0.5 on ones(2);
    # after one update the slow params are untouched, loss(slow) = sum(p ** 2) = 2.
    opt = optim.lookahead(optim.sgd(1e-2), sync_period=5, slow_step_size=0.5)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    grads = torch.func.grad(lambda p: p["w"].square().sum())(params)
    params, state = optim.apply_gradients(opt, grads, state, params)
    assert float(optim.slow_params(state)["w"].square().sum()) == 2.0
    assert params["w"].tolist() == pytest.approx([0.98, 0.98])


def test_sync_period_one_is_an_average_every_step_and_inputs_stay():
    opt = optim.lookahead(optim.sgd(1.0), sync_period=1, slow_step_size=0.25)
    params = {"w": torch.tensor([8.0])}
    state = opt.init(params)
    new_params, new_state = optim.apply_gradients(opt, {"w": torch.tensor([4.0])}, state, params)
    # fast 8 -> 4; slow 8 + 0.25 * (4 - 8) = 7; fast jumps to 7.
    assert new_params["w"].tolist() == [7.0] and new_state.slow["w"].tolist() == [7.0]
    assert params["w"].tolist() == [8.0] and state.slow["w"].tolist() == [8.0]
    assert state.slow["w"].data_ptr() != params["w"].data_ptr()


def test_lookahead_runs_in_make_train_step():
    model = Model(lambda: nn.Linear(3, 1))
    opt = optim.lookahead(optim.sgd(0.1), sync_period=2, slow_step_size=0.5)
    ts = init_train_state(model, opt, seed=0)
    step = make_train_step(model, nn.functional.mse_loss, opt)
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    for _ in range(2):
        ts, _ = step(ts, batch)
    assert_trees_close(ts.params, optim.slow_params(ts.opt_state), rtol=1e-6, atol=1e-7)


def test_lookahead_errors():
    with pytest.raises(ValueError, match="sync_period must be at least 1, got 0"):
        optim.lookahead(optim.sgd(0.1), sync_period=0, slow_step_size=0.5)
    opt = optim.lookahead(optim.sgd(0.1), sync_period=2, slow_step_size=0.5)
    with pytest.raises(ValueError, match="needs the fast params"):
        opt.update({"w": torch.ones(1)}, opt.init({"w": torch.ones(1)}))


def test_lookahead_update_compiles_to_one_graph_across_syncs():
    opt = optim.lookahead(optim.sgd(0.1, momentum=0.9), 2, 0.5, reset_state=True)
    params = {"w": torch.randn(3, dtype=torch.float64)}
    eager_p, eager_s = compiled_p, compiled_s = params, opt.init(params)
    compiled = torch.compile(opt.update, fullgraph=True, backend="eager")
    with dynamo_counts() as seen:
        for _ in range(4):  # two synchronising and two plain steps, one graph
            grads = {"w": eager_p["w"].sin()}
            u, eager_s = opt.update(grads, eager_s, eager_p)
            eager_p = optim.apply_updates(eager_p, u)
            u, compiled_s = compiled({"w": compiled_p["w"].sin()}, compiled_s, compiled_p)
            compiled_p = optim.apply_updates(compiled_p, u)
    assert seen == {"graphs": 1, "breaks": 0}
    assert_trees_close((compiled_p, compiled_s), (eager_p, eager_s))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 5),
    st.floats(0.0, 1.0),
    st.booleans(),
    st.floats(0.0, 0.95),
    st.integers(1, 12),
    st.integers(0, 2**16),
)
def test_lookahead_property_matches_the_imperative_loop(k, alpha, reset, momentum, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "weight": torch.randn(2, 4, generator=gen, dtype=torch.float64),
        "bias": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    batches = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(steps)]
    want = _imperative(
        params,
        batches,
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum),
        sync_period=k,
        alpha=alpha,
        reset_state=reset,
    )
    opt = optim.lookahead(optim.sgd(0.1, momentum=momentum), k, alpha, reset_state=reset)
    state = opt.init(params)
    for x in batches:
        grads = torch.func.grad(lambda p, x=x: _loss(p["weight"], p["bias"], x))(params)
        params, state = optim.apply_gradients(opt, grads, state, params)
    assert_trees_close(params, want[-1][0], **F64)
    assert_trees_close(optim.slow_params(state), want[-1][1], **F64)
