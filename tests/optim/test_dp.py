"""DP-SGD: ``dp_aggregate`` on ``vmap`` per-sample gradients equals a loop of single-example
``torch.autograd`` gradients, each clipped and summed, plus the same noise; ``prng.normal``'s
statistics; the global generator is never touched."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from functorch_diary import Model, func, init_train_state, optim, prng
from functorch_diary.testing import assert_trees_close
from tests.helpers import SmallBNNet, dynamo_counts

F64 = {"rtol": 1e-12, "atol": 1e-14}
CLIP, NOISE = 1.5, 1.1  # per-example norms here run 1.2-3.8: some are clipped, some not


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _looped_dp(net, x, y, state, clip=CLIP, noise_multiplier=NOISE):
    """The imperative DP-SGD aggregate: one backward per example, clip it to ``clip``, sum,
    add N(0, (clip * noise_multiplier)^2) noise drawn from the state's keys, divide by n."""
    names = [name for name, _ in net.named_parameters()]
    total = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    clipped = 0
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        grads = dict(zip(names, torch.autograd.grad(loss, list(net.parameters())), strict=True))
        norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
        factor = min(1.0, clip / float(norm))
        clipped += factor < 1.0
        for name, g in grads.items():
            total[name] += g * factor
    # The noise of leaf i (canonical, i.e. sorted, order) comes from dp_noise_key(state, i).
    for index, name in enumerate(sorted(names)):
        noise = prng.normal(optim.dp_noise_key(state, index), total[name].shape, torch.float64)
        total[name] = (total[name] + clip * noise_multiplier * noise) / x.shape[0]
    return total, clipped


def test_dp_aggregate_equals_a_loop_of_clipped_single_example_grads():
    net = _net()
    model, params, state = Model.from_module(net)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.arange(7) % 3
    dp = optim.dp_aggregate(CLIP, NOISE, key=prng.key(3))
    dp_state = dp.init(params)
    rng_before = torch.get_rng_state()
    seen_clipped = []
    for step in range(2):
        per_example, _ = func.per_sample_grads(model, nn.functional.cross_entropy)(
            params, state, x, y
        )
        want, clipped = _looped_dp(net, x, y, dp_state)
        got, new_state = dp.update(per_example, dp_state, params)
        assert_trees_close(got, want, **F64)
        seen_clipped.append(clipped)
        assert int(new_state.count) == step + 1
        dp_state = new_state
        x = x * 3  # larger inputs: other norms on the second step
    assert seen_clipped == [2, 7]  # both sides of the clip, then every example clipped
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_noise_is_keyed_fresh_each_step_and_has_the_right_scale():
    dp = optim.dp_aggregate(2.0, 1.5, key=7)
    zeros = {"a": torch.zeros(4, 300, 10, dtype=torch.float64), "b": torch.zeros(4, 1000)}
    state = dp.init({"a": torch.zeros(300, 10)})
    first, state1 = dp.update(zeros, state)
    again, _ = dp.update(zeros, state)
    second, _ = dp.update(zeros, state1)
    assert_trees_close(first, again)  # same key and count: the same noise
    assert not torch.equal(first["a"], second["a"])  # the next step draws new noise
    assert first["a"].dtype == torch.float64 and first["b"].dtype == torch.float32
    for leaf in first.values():  # (sum + N(0, 3^2)) / 4 with a zero sum
        assert float((leaf * 4).std()) == pytest.approx(3.0, rel=0.05)
    assert abs(float(torch.corrcoef(torch.stack([first["b"], second["b"]]))[0, 1])) < 0.1


def test_inputs_untouched_and_errors():
    dp = optim.dp_aggregate(1.0, 1.0, key=0)
    grads = {"w": torch.ones(3, 2)}
    before = grads["w"].clone()
    dp.update(grads, dp.init({"w": torch.ones(2)}))
    assert torch.equal(grads["w"], before)
    with pytest.raises(ValueError, match=r"leaf 'w' has shape \(\)"):
        dp.update({"v": torch.ones(3, 2), "w": torch.tensor(1.0)}, dp.init({}))
    with pytest.raises(ValueError, match=r"batch \(3\).*leaf 'w' has shape \(2, 2\)"):
        dp.update({"v": torch.ones(3, 2), "w": torch.ones(2, 2)}, dp.init({}))
    with pytest.raises(ValueError, match="l2_norm_clip > 0 and noise_multiplier >= 0, got 0"):
        optim.dp_aggregate(0.0, 1.0, key=0)


def test_make_dp_train_step_is_per_example_clip_noise_then_sgd():
    net = _net()
    model, params, _ = Model.from_module(net)
    opt = optim.chain(optim.dp_aggregate(CLIP, NOISE, key=prng.key(5)), optim.sgd(0.1))
    ts = init_train_state(model, opt, seed=0)
    ts = ts._replace(params=params)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    step = optim.make_dp_train_step(model, nn.functional.cross_entropy, opt)
    new_ts, metrics = step(ts, (x, y))
    want, _ = _looped_dp(net, x, y, ts.opt_state[0])
    expected = {name: p - 0.1 * want[name] for name, p in params.items()}
    assert_trees_close(new_ts.params, expected, **F64)
    loss = nn.functional.cross_entropy(net(x), y, reduction="none").mean()
    assert float(metrics["loss"]) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert int(new_ts.step) == 1 and int(new_ts.opt_state[0].count) == 1


def test_make_dp_train_step_refuses_batch_norm():
    model = Model(SmallBNNet)
    opt = optim.chain(optim.dp_aggregate(1.0, 1.0, key=0), optim.sgd(0.1))
    with pytest.raises(ValueError, match="batch statistics"):
        optim.make_dp_train_step(model, nn.functional.cross_entropy, opt)


def test_prng_normal_statistics():
    key = prng.key(11)
    x = prng.normal(key, (400, 500), torch.float64)
    assert x.shape == (400, 500) and x.dtype == torch.float64
    assert torch.equal(x, prng.normal(key, (400, 500), torch.float64))
    assert not torch.equal(x, prng.normal(prng.fold_in(key, 1), (400, 500), torch.float64))
    flat = x.flatten()
    # 200k draws: the mean's standard error is 0.0022 and the std's 0.0016.
    assert abs(float(flat.mean())) < 0.01
    assert abs(float(flat.std()) - 1.0) < 0.01
    # Kolmogorov-Smirnov distance to the normal CDF (5% critical value 0.003 at n=200k).
    ecdf = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
    assert float((ecdf - torch.special.ndtr(flat.sort().values)).abs().max()) < 0.004
    assert float(flat.abs().max()) < 5.8  # the documented tail cut of 24-bit uniforms
    assert prng.normal(key, (3,)).dtype == torch.float32


def test_dp_aggregate_compiles_to_one_graph_across_steps():
    dp = optim.dp_aggregate(1.0, 1.1, key=2)
    state = eager_state = dp.init({"w": torch.zeros(3)})
    compiled = torch.compile(dp.update, fullgraph=True, backend="eager")
    with dynamo_counts() as seen:
        for i in range(3):
            grads = {"w": torch.full((4, 3), float(i + 1))}
            want, eager_state = dp.update(grads, eager_state)
            got, state = compiled(grads, state)
            assert_trees_close(got, want)
    assert seen == {"graphs": 1, "breaks": 0}


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 3), max_size=2).map(tuple), min_size=1, max_size=3),
    st.integers(1, 5),
    st.floats(0.05, 5.0),
    st.floats(0.0, 2.0),
    st.integers(0, 2**16),
)
def test_dp_aggregate_property_equals_the_example_loop(shapes, batch, clip, multiplier, seed):
    gen = torch.Generator().manual_seed(seed)
    per_example = {
        f"p{i}": torch.randn((batch, *s), generator=gen, dtype=torch.float64)
        for i, s in enumerate(shapes)
    }
    dp = optim.dp_aggregate(clip, multiplier, key=seed)
    state = dp.init({})
    got, _ = dp.update(per_example, state)
    names = sorted(per_example)
    want = {name: torch.zeros(per_example[name].shape[1:], dtype=torch.float64) for name in names}
    for i in range(batch):
        norm = math.sqrt(sum(float(per_example[n][i].square().sum()) for n in names))
        factor = min(1.0, clip / norm)
        for name in names:
            want[name] += per_example[name][i] * factor
    for index, name in enumerate(names):
        noise = prng.normal(optim.dp_noise_key(state, index), want[name].shape, torch.float64)
        want[name] = (want[name] + clip * multiplier * noise) / batch
    assert_trees_close(got, want, **F64)
