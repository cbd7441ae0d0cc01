"""Hypothesis draws optimisers, hyperparameters, schedules, masks and parameter shapes; each
draw is checked against torch (float64, 1e-10) or against an invariant."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim import lr_scheduler as sched

from functorch_diary import optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone, tree_global_norm, tree_paths
from tests.helpers import TORCH

F64 = {"rtol": 1e-10, "atol": 1e-10}

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)
unit = st.floats(0.0, 0.99)
lrs = st.floats(1e-3, 0.3)
decays = st.one_of(st.just(0.0), st.floats(1e-4, 0.1))
epsilons = st.floats(1e-10, 1e-3)


@st.composite
def optimisers(draw):
    """(name, kwargs) valid for both ``torch.optim.<Name>`` and ``optim.<name>``."""
    name = draw(st.sampled_from(["sgd", "adam", "adamw", "rmsprop", "adagrad"]))
    kw = {"lr": draw(lrs), "weight_decay": draw(decays), "maximize": draw(st.booleans())}
    if name == "sgd":
        kw["momentum"] = draw(st.one_of(st.just(0.0), unit))
        kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
        kw["dampening"] = 0.0 if kw["nesterov"] else draw(st.floats(0.0, 0.5))
    elif name in ("adam", "adamw"):
        kw["betas"] = (draw(unit), draw(st.floats(0.5, 0.9999)))
        kw["eps"] = draw(epsilons)
        kw["amsgrad"] = draw(st.booleans())
    elif name == "rmsprop":
        kw["alpha"] = draw(st.floats(0.5, 0.999))
        kw["eps"] = draw(epsilons)
        kw["momentum"] = draw(st.one_of(st.just(0.0), unit))
        kw["centered"] = draw(st.booleans())
    else:
        kw["lr_decay"] = draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.1)))
        kw["initial_accumulator_value"] = draw(st.floats(0.0, 1.0))
        kw["eps"] = draw(epsilons)
    return name, kw


def _tree(leaf_shapes, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"p{i}": torch.randn(s, generator=gen, dtype=torch.float64)
        for i, s in enumerate(leaf_shapes)
    }


@settings(max_examples=100, deadline=None)
@given(optimisers(), shapes, st.integers(1, 5), st.integers(0, 2**16), st.booleans())
def test_any_optimiser_matches_torch(optimiser, leaf_shapes, steps, seed, fused):
    """``fused``: step with ``apply_gradients`` instead of ``update`` + ``apply_updates``."""
    name, kwargs = optimiser
    params = _tree(leaf_shapes, seed)
    grads = [_tree(leaf_shapes, seed + 1 + i) for i in range(steps)]

    def torch_run(**implementation: bool) -> dict[str, torch.Tensor]:
        tensors = [nn.Parameter(v.clone()) for v in params.values()]
        torch_opt = TORCH[name](tensors, **implementation, **kwargs)
        for g in grads:
            for t, gi in zip(tensors, g.values(), strict=True):
                t.grad = gi.clone()
            torch_opt.step()
        return {k: t.detach() for k, t in zip(params, tensors, strict=True)}

    opt = getattr(optim, name)(**kwargs)
    state = opt.init(params)
    new = params
    for g in grads:
        inputs = (g, state, new)
        before = tree_clone(inputs)
        if fused:
            stepped, state = optim.apply_gradients(opt, g, state, new)
        else:
            updates, state = opt.update(g, state, new)
            stepped = optim.apply_updates(new, updates)
        assert_trees_close(inputs, before)  # pure: no input is written to, whatever the options
        new = stepped
    assert_trees_close(new, torch_run(), **F64)
    # The fused path runs torch's fused kernel where torch has one: its step, to the bit
    # (Adagrad's lr_decay aside: the kernel computes the decayed lr in C++).
    if fused and name != "rmsprop" and not kwargs.get("lr_decay"):
        assert_trees_close(new, torch_run(fused=True), rtol=0.0, atol=0.0)


@st.composite
def schedules(draw, lr: float | None = None):
    """(lr, torch scheduler factory, functional schedule) meaning the same thing (at ``lr``
    when given, else at a drawn one)."""
    kind = draw(
        st.sampled_from(
            ["step", "multistep", "exponential", "cosine", "linear", "poly", "constant"]
        )
    )
    lr = draw(lrs) if lr is None else lr
    if kind == "step":
        size, gamma = draw(st.integers(1, 30)), draw(st.floats(0.1, 1.0))
        return lr, (lambda o: sched.StepLR(o, size, gamma)), optim.step_lr(lr, size, gamma)
    if kind == "multistep":
        stones, gamma = (
            draw(st.lists(st.integers(1, 59), min_size=1, max_size=4)),
            draw(st.floats(0.1, 1.0)),
        )
        return (
            lr,
            (lambda o: sched.MultiStepLR(o, stones, gamma)),
            optim.multistep_lr(lr, stones, gamma),
        )
    if kind == "exponential":
        gamma = draw(st.floats(0.5, 1.0))
        return lr, (lambda o: sched.ExponentialLR(o, gamma)), optim.exponential_lr(lr, gamma)
    if kind == "cosine":
        t_max, eta_min = draw(st.integers(1, 80)), draw(st.floats(0.0, 1e-3))
        return (
            lr,
            (lambda o: sched.CosineAnnealingLR(o, t_max, eta_min)),
            optim.cosine_annealing_lr(lr, t_max, eta_min),
        )
    if kind == "linear":
        start, end, total = (
            draw(st.floats(0.05, 1.0)),
            draw(st.floats(0.0, 1.0)),
            draw(st.integers(1, 50)),
        )
        return (
            lr,
            (lambda o: sched.LinearLR(o, start, end, total)),
            optim.linear_lr(lr, start, end, total),
        )
    if kind == "poly":
        total, power = draw(st.integers(1, 80)), draw(st.floats(0.5, 3.0))
        return (
            lr,
            (lambda o: sched.PolynomialLR(o, total, power)),
            optim.polynomial_lr(lr, total, power),
        )
    factor, total = draw(st.floats(0.05, 1.0)), draw(st.integers(1, 50))
    return lr, (lambda o: sched.ConstantLR(o, factor, total)), optim.constant_lr(lr, factor, total)


@settings(max_examples=60, deadline=None)
@given(schedules())
def test_any_schedule_matches_lr_scheduler_for_60_steps(drawn):
    lr, make_scheduler, schedule = drawn
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(torch_opt)
    expected = []
    for _ in range(60):
        expected.append(torch_opt.param_groups[0]["lr"])
        torch_opt.step()
        scheduler.step()
    actual = torch.stack([schedule(torch.tensor(t)) for t in range(60)])
    # torch updates most lrs recursively (lr *= ...): a few ulps apart from the closed form.
    assert_trees_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(optimisers(), shapes, st.data())
def test_frozen_leaves_never_change_and_hold_no_state(optimiser, leaf_shapes, data):
    name, kwargs = optimiser
    params = _tree(leaf_shapes, 0)
    frozen = data.draw(st.lists(st.sampled_from(list(params)), min_size=1, unique=True))
    opt = optim.freeze(getattr(optim, name)(**kwargs), frozen)
    state = opt.init(params)
    new = params
    for i in range(3):
        updates, state = opt.update(_tree(leaf_shapes, i + 1), state, new)
        new = optim.apply_updates(new, updates)
    for path in frozen:
        assert torch.equal(new[path].view(torch.int64), params[path].view(torch.int64)), path
        assert not [p for p in tree_paths(state) if p.endswith("." + path)], path


@settings(max_examples=30, deadline=None)
@given(shapes, st.floats(1e-3, 10.0), st.floats(1e-3, 10.0), st.integers(0, 2**16))
def test_clip_by_global_norm_matches_torch_and_is_pure(leaf_shapes, scale, max_norm, seed):
    grads = {k: scale * v for k, v in _tree(leaf_shapes, seed).items()}
    tensors = [nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    before = tree_clone(grads)
    clipped, _ = optim.clip_by_global_norm(max_norm).update(grads, optim.EmptyState())
    assert_trees_close(grads, before)
    assert_trees_close(clipped, {k: t.grad for k, t in zip(grads, tensors, strict=True)}, **F64)
    assert math.isclose(float(tree_global_norm(grads)), float(torch_norm), rel_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(optimisers(), shapes, st.integers(1, 4), st.integers(0, 2**16))
def test_accumulating_k_gradients_steps_once_with_their_mean(optimiser, leaf_shapes, k, seed):
    name, kwargs = optimiser
    params = _tree(leaf_shapes, seed)
    micro = [_tree(leaf_shapes, seed + 1 + i) for i in range(k)]
    mean = {p: sum(g[p] for g in micro) / k for p in params}
    single = getattr(optim, name)(**kwargs)
    updates, _ = single.update(mean, single.init(params), params)
    expected = optim.apply_updates(params, updates)

    acc = optim.accumulate_gradients(getattr(optim, name)(**kwargs), every_k=k)
    state, new = acc.init(params), params
    for g in micro:
        updates, state = acc.update(g, state, new)
        new = optim.apply_updates(new, updates)
    assert_trees_close(new, expected, **F64)
    assert int(state.micro_step) == 0


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit equal float64 trees: ``-0.0`` and ``+0.0`` differ."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.int64), b[k].view(torch.int64)) for k in a
    )


WRAPPERS = ["none", "apply_if_finite", "masked", "freeze", "multi_transform", "accumulate"]


def _wrapped(wrapper: str, name: str, kwargs: dict, k: int) -> optim.GradientTransformation:
    """``wrapper`` around ``optim.<name>(**kwargs)``; leaf ``p0`` is the one masked, frozen
    or put in the second parameter group (with its own lr and weight decay)."""
    inner = getattr(optim, name)(**kwargs)
    if wrapper == "apply_if_finite":
        return optim.apply_if_finite(inner)
    if wrapper == "masked":
        return optim.masked(inner, ["p0"])
    if wrapper == "freeze":
        return optim.freeze(inner, ["p0"])
    if wrapper == "multi_transform":
        other = {**kwargs, "lr": kwargs["lr"] / 2, "weight_decay": kwargs["weight_decay"] + 0.01}
        groups = {"head": getattr(optim, name)(**other), "body": inner}
        return optim.multi_transform(groups, lambda path, leaf: "head" if path == "p0" else "body")
    if wrapper == "accumulate":
        return optim.accumulate_gradients(inner, every_k=k)
    return inner


@settings(max_examples=120, deadline=None)
@given(
    optimisers(),
    st.sampled_from(WRAPPERS),
    st.booleans(),
    shapes,
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_update_then_apply_updates_is_apply_gradients(
    optimiser, wrapper, zero_lr, leaf_shapes, bad_steps, k, seed
):
    """The optax pair and the fused step give the same params: to rounding (1e-12 in float64),
    and bit for bit, signed zeros included, wherever the result is exact: a step skipped by
    ``apply_if_finite``, a frozen leaf, a zero learning rate. Every param leaf starts with a
    ``-0.0``; under ``apply_if_finite``, ``bad_steps`` puts a NaN in those steps' gradients."""
    name, kwargs = optimiser
    kwargs = {**kwargs, "lr": 0.0} if zero_lr else kwargs
    opt = _wrapped(wrapper, name, kwargs, k)
    params = _tree(leaf_shapes, seed)
    for leaf in params.values():
        leaf.view(-1)[0] = -0.0
    state_a = state_b = opt.init(params)
    by_update = by_apply = params
    for i, bad in enumerate(bad_steps):
        grads = _tree(leaf_shapes, seed + 1 + i)
        skipped = bad and wrapper == "apply_if_finite"
        if skipped:
            grads["p0"].view(-1)[-1] = float("nan")
        before_a, before_b = by_update, by_apply
        updates, state_a = opt.update(grads, state_a, by_update)
        by_update = optim.apply_updates(by_update, updates)
        by_apply, state_b = optim.apply_gradients(opt, grads, state_b, by_apply)
        if skipped:  # every leaf as it was, -0.0 included, on both paths
            assert _same_bits(by_update, before_a) and _same_bits(by_apply, before_b)
        assert_trees_close(by_update, by_apply, rtol=1e-12, atol=1e-12)
    if zero_lr or (wrapper == "apply_if_finite" and all(bad_steps)):
        assert _same_bits(by_update, by_apply)
    if wrapper == "freeze":
        frozen = {"p0": params["p0"]}
        assert _same_bits({"p0": by_update["p0"]}, frozen)
        assert _same_bits({"p0": by_apply["p0"]}, frozen)


def _torch_trajectory(
    make_scheduler, steps: int, key: str = "lr", optimiser: str = "sgd", lr: float = 0.1
):
    """``param_groups[0][key]`` before each of ``steps`` optimiser steps (``betas``' first
    entry for key ``"beta1"``), with the scheduler stepped after each."""
    param = nn.Parameter(torch.zeros(1))
    if optimiser == "adam":
        torch_opt = torch.optim.Adam([param], lr=lr)
    else:
        torch_opt = torch.optim.SGD([param], lr=lr, momentum=0.9)
    scheduler = make_scheduler(torch_opt)
    values = []
    for _ in range(steps):
        group = torch_opt.param_groups[0]
        values.append(group["betas"][0] if key == "beta1" else group[key])
        torch_opt.step()
        scheduler.step()
    return torch.tensor(values, dtype=torch.float64)


def _ours(schedule, steps: int) -> torch.Tensor:
    return torch.stack([schedule(torch.tensor(t)) for t in range(steps)])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 3), st.floats(0.0, 1e-3), lrs)
def test_cosine_annealing_warm_restarts_matches_torch(t_0, t_mult, eta_min, lr):
    expected = _torch_trajectory(
        lambda o: sched.CosineAnnealingWarmRestarts(o, t_0, t_mult, eta_min), 80, lr=lr
    )
    ours = optim.cosine_annealing_warm_restarts(lr, t_0, t_mult, eta_min)
    assert_trees_close(_ours(ours, 80), expected, rtol=1e-12, atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    st.floats(1e-4, 0.05),
    st.floats(0.06, 1.0),
    st.integers(1, 9),
    st.one_of(st.none(), st.integers(1, 9)),
    st.sampled_from(["triangular", "triangular2", "exp_range", "custom"]),
    st.floats(0.9, 1.0),
    st.sampled_from(["cycle", "iterations"]),
)
def test_cyclic_lr_and_its_momentum_match_torch(base, peak, up, down, mode, gamma, scale_mode):
    custom = mode == "custom"
    kwargs = {"step_size_up": up, "step_size_down": down, "gamma": gamma}
    if custom:
        kwargs |= {"scale_mode": scale_mode}
    torch_kwargs = kwargs | (
        {"scale_fn": lambda x: 1.0 / (1.0 + 0.1 * x)} if custom else {"mode": mode}
    )
    ours_kwargs = kwargs | (
        {"scale_fn": lambda x: 1.0 / (1.0 + 0.1 * x)} if custom else {"mode": mode}
    )

    def make(o):
        return sched.CyclicLR(o, base, peak, base_momentum=0.8, max_momentum=0.9, **torch_kwargs)

    steps = 3 * (up + (down or up)) + 2
    lr = optim.cyclic_lr(base, peak, **ours_kwargs)
    momentum = optim.cyclic_momentum(0.8, 0.9, **ours_kwargs)
    assert_trees_close(_ours(lr, steps), _torch_trajectory(make, steps), rtol=1e-12, atol=1e-15)
    assert_trees_close(
        _ours(momentum, steps), _torch_trajectory(make, steps, "momentum"), rtol=1e-12, atol=1e-15
    )


@settings(max_examples=60, deadline=None)
@given(
    st.floats(0.01, 1.0),
    st.integers(20, 60),  # pct_start * total_steps >= 2: torch divides by zero below that
    st.floats(0.1, 0.45),
    st.sampled_from(["cos", "linear"]),
    st.floats(2.0, 50.0),
    st.floats(10.0, 1e4),
    st.booleans(),
    st.booleans(),
)
def test_one_cycle_lr_and_its_beta1_match_torch(
    max_lr, total, pct, strategy, div, final_div, three_phase, adam
):
    def make(o):
        return sched.OneCycleLR(
            o,
            max_lr,
            total_steps=total,
            pct_start=pct,
            anneal_strategy=strategy,
            div_factor=div,
            final_div_factor=final_div,
            three_phase=three_phase,
        )

    optimiser, key = ("adam", "beta1") if adam else ("sgd", "momentum")
    lr = optim.one_cycle_lr(max_lr, total, pct, strategy, div, final_div, three_phase)
    momentum = optim.one_cycle_momentum(total, pct, strategy, three_phase=three_phase)
    expected_lr = _torch_trajectory(make, total, "lr", optimiser)
    assert_trees_close(_ours(lr, total), expected_lr, rtol=1e-12, atol=1e-15)
    expected_m = _torch_trajectory(make, total, key, optimiser)
    assert_trees_close(_ours(momentum, total), expected_m, rtol=1e-12, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.5, 1.0), st.integers(0, 7))
def test_multiplicative_lr_matches_torch_bit_for_bit(factor, every):
    def lr_lambda(epoch: int) -> float:  # a Python int, as torch passes it
        return factor if every and epoch % every == 0 else 1.0 - 0.01 * (epoch % 3)

    expected = _torch_trajectory(lambda o: sched.MultiplicativeLR(o, lr_lambda), 50)
    ours = optim.multiplicative_lr(0.1, lr_lambda, total_steps=50)
    assert_trees_close(_ours(ours, 50), expected, rtol=0.0, atol=0.0)


@settings(max_examples=40, deadline=None)
@given(lrs, st.data())
def test_join_schedules_is_sequential_lr(lr, data):
    """join_schedules covers SequentialLR: each part restarts at 0 at its milestone."""
    parts = data.draw(st.lists(schedules(lr), min_size=2, max_size=3))
    stones = sorted(
        data.draw(
            st.lists(
                st.integers(1, 40), min_size=len(parts) - 1, max_size=len(parts) - 1, unique=True
            )
        )
    )
    expected = _torch_trajectory(
        lambda o: sched.SequentialLR(o, [make(o) for _, make, _ in parts], stones), 60, lr=lr
    )
    joined = optim.join_schedules([schedule for _, _, schedule in parts], stones)
    assert_trees_close(_ours(joined, 60), expected, rtol=1e-10, atol=1e-14)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["min", "max"]),
    st.floats(0.05, 0.9),
    st.integers(0, 4),
    st.floats(0.0, 0.2),
    st.sampled_from(["rel", "abs"]),
    st.integers(0, 3),
    st.sampled_from([0.0, 1e-4, 0.02]),
    st.sampled_from([1e-8, 1e-3]),
    st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=40),
)
def test_reduce_lr_on_plateau_follows_torch_bit_for_bit(
    mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps, metrics
):
    options = {
        "mode": mode,
        "factor": factor,
        "patience": patience,
        "threshold": threshold,
        "threshold_mode": threshold_mode,
        "cooldown": cooldown,
        "min_lr": min_lr,
        "eps": eps,
    }
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = sched.ReduceLROnPlateau(torch_opt, **options)
    opt = optim.reduce_lr_on_plateau(0.1, **options)
    params = {"w": torch.ones(1, dtype=torch.float64)}
    state = opt.init(params)
    for metric in metrics:
        torch_opt.step()
        scheduler.step(metric)
        state = optim.report_metric(state, metric)
        assert float(optim.current_lr(state)) == torch_opt.param_groups[0]["lr"]
        updates, state = opt.update({"w": torch.ones(1, dtype=torch.float64)}, state, params)
        assert float(updates["w"]) == -torch_opt.param_groups[0]["lr"]
