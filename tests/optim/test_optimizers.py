"""Every named optimiser and option against its ``torch.optim`` twin, step for step.

The imperative side sets ``.grad`` and calls ``step()``; the functional side calls
``update`` and ``apply_updates``, or the fused ``apply_gradients``. Both see the same
gradient sequence; params (and the optimiser's buffers where torch exposes them) must agree
to 1e-10 in float64, and the fused path is torch's to the bit where it follows torch's order
of rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad

from functorch_diary import Model, optim
from functorch_diary.model.checks import TreeMismatchError
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone
from tests.helpers import TORCH

F64 = {"rtol": 1e-10, "atol": 1e-10}
STEPS = 20


def _params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (5, 7), "scale": ()}
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


def _grad_sequence(params: dict, steps: int = STEPS, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    # A shared component makes consecutive gradients correlated, so momentum matters.
    base = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    return [
        {
            k: base[k] + 0.5 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            for k, v in params.items()
        }
        for _ in range(steps)
    ]


def run_torch(make, params, grads_seq, schedule_make=None):
    """Train copies of ``params`` with ``make(tensors)``; return params, optimiser, tensors."""
    tensors = [nn.Parameter(v.clone()) for v in params.values()]
    opt = make(tensors)
    scheduler = schedule_make(opt) if schedule_make else None
    for grads in grads_seq:
        for t, g in zip(tensors, grads.values(), strict=True):
            # In the param's layout, as autograd makes it (torch's fused kernels assume so).
            t.grad = torch.empty_like(t).copy_(g)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {k: t.detach() for k, t in zip(params, tensors, strict=True)}, opt, tensors


def run_functional(opt, params, grads_seq, path: str = "update"):
    """``path``: "update" (``update`` + ``apply_updates``) or "fused" (``apply_gradients``)."""
    state = opt.init(params)
    for grads in grads_seq:
        if path == "fused":
            params, state = optim.apply_gradients(opt, grads, state, params)
        else:
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
    return params, state


def _find(opt_state, state_type):
    """The one stage state of ``state_type`` in a chain's state (stages move, types don't)."""
    (found,) = [s for s in opt_state if isinstance(s, state_type)]
    return found


CASES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.1, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "maximize": True}),
    ("adam", {"lr": 1e-2}),
    ("adam", {"lr": 1e-2, "weight_decay": 1e-1}),
    ("adam", {"lr": 1e-2, "amsgrad": True}),
    ("adam", {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-3, "maximize": True}),
    ("adam", {"lr": 1e-2, "weight_decay": 1e-1, "amsgrad": True, "maximize": True}),
    ("adamw", {"lr": 1e-2}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.3, "amsgrad": True}),
    ("adamw", {"lr": 1e-2, "betas": (0.8, 0.95), "maximize": True}),
    ("rmsprop", {"lr": 1e-2}),
    ("rmsprop", {"lr": 5e-3, "alpha": 0.9, "eps": 1e-4}),
    ("rmsprop", {"lr": 1e-2, "centered": True}),
    ("rmsprop", {"lr": 1e-2, "momentum": 0.9}),
    ("rmsprop", {"lr": 1e-2, "momentum": 0.5, "centered": True, "weight_decay": 1e-2}),
    ("rmsprop", {"lr": 1e-2, "maximize": True, "weight_decay": 1e-2}),
    ("adagrad", {"lr": 1e-1}),
    ("adagrad", {"lr": 1e-1, "lr_decay": 0.05}),
    ("adagrad", {"lr": 1e-1, "weight_decay": 1e-2, "initial_accumulator_value": 0.1}),
    ("adagrad", {"lr": 1e-1, "eps": 1e-3, "maximize": True}),
]


@pytest.mark.parametrize("path", ["update", "fused"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_params_match_torch_optim_float64(name, kwargs, path):
    params = _params()
    seq = _grad_sequence(params)
    expected, _, _ = run_torch(lambda ts: TORCH[name](ts, **kwargs), params, seq)
    actual, _ = run_functional(getattr(optim, name)(**kwargs), params, seq, path)
    assert_trees_close(actual, expected, **F64)


# Where apply_gradients runs torch's kernels in torch's order: torch's fused CPU kernels for
# SGD, Adam, AdamW and Adagrad, its foreach kernels for RMSprop. RMSprop's momentum is the
# exception: trace fuses torch's two passes (buf * m, then + g) into one, a last-bit change.
# And Adagrad's lr_decay: torch's kernel computes the decayed lr in C++, the schedule here in
# torch ops, 4e-16 apart in float64 (float32's rounding of the lr hides it).
BIT_EXACT = [
    (n, k)
    for n, k in CASES
    if not (n == "rmsprop" and k.get("momentum")) and not (n == "adagrad" and k.get("lr_decay"))
]
TORCH_TWIN = {"sgd": "fused", "adam": "fused", "adamw": "fused", "adagrad": "fused"}


def _torch_twin(name: str, kwargs: dict):
    """``torch.optim``'s implementation that ``apply_gradients`` follows on the CPU."""
    implementation = {TORCH_TWIN.get(name, "foreach"): True}
    return lambda ts: TORCH[name](ts, **implementation, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "kwargs"), BIT_EXACT, ids=[f"{n}-{k}" for n, k in BIT_EXACT])
def test_fused_path_is_torch_bit_for_bit(name, kwargs, dtype):
    params = _params(dtype)
    seq = _grad_sequence(params)
    expected, _, _ = run_torch(_torch_twin(name, kwargs), params, seq)
    actual, _ = run_functional(getattr(optim, name)(**kwargs), params, seq, "fused")
    assert_trees_close(actual, expected, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_float32_matches_both_torch_code_paths(name, foreach):
    kwargs = dict(next(k for n, k in CASES if n == name))
    params = _params(torch.float32)
    seq = _grad_sequence(params)
    expected, _, _ = run_torch(lambda ts: TORCH[name](ts, foreach=foreach, **kwargs), params, seq)
    actual, _ = run_functional(getattr(optim, name)(**kwargs), params, seq)
    assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"momentum": 0.9}, {"momentum": 0.9, "centered": True}, {"centered": True}],
)
def test_rmsprop_buffers_match_torch_state(kwargs):
    params = _params()
    seq = _grad_sequence(params)
    _, torch_opt, tensors = run_torch(
        lambda ts: torch.optim.RMSprop(ts, lr=1e-2, **kwargs), params, seq
    )
    _, state = run_functional(optim.rmsprop(lr=1e-2, **kwargs), params, seq)
    rms_state = _find(state, optim.ScaleByRmsState)
    torch_state = [torch_opt.state[t] for t in tensors]
    keys = list(params)
    assert_trees_close(
        rms_state.square_avg,
        {k: s["square_avg"] for k, s in zip(keys, torch_state, strict=True)},
        **F64,
    )
    if kwargs.get("centered"):
        expected = {k: s["grad_avg"] for k, s in zip(keys, torch_state, strict=True)}
        assert_trees_close(rms_state.grad_avg, expected, **F64)
    if kwargs.get("momentum"):
        expected = {k: s["momentum_buffer"] for k, s in zip(keys, torch_state, strict=True)}
        assert_trees_close(_find(state, optim.TraceState).trace, expected, **F64)


def test_adam_moments_match_torch_state_with_amsgrad():
    params = _params()
    seq = _grad_sequence(params)
    _, torch_opt, tensors = run_torch(
        lambda ts: torch.optim.Adam(ts, lr=1e-2, amsgrad=True), params, seq
    )
    _, state = run_functional(optim.adam(lr=1e-2, amsgrad=True), params, seq)
    adam_state = _find(state, optim.ScaleByAdamState)
    keys = list(params)
    for field, torch_key in [("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq")]:
        expected = {k: torch_opt.state[t][torch_key] for k, t in zip(keys, tensors, strict=True)}
        assert_trees_close(getattr(adam_state, field), expected, **F64)
    assert int(adam_state.count) == STEPS


def test_real_model_rmsprop_wgan_critic_steps_match_torch():
    """WGAN's critic: RMSprop(lr=5e-5) on a small conv net, gradients from a real loss."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 6 * 6, 1)
    ).double()
    model, params, _ = Model.from_module(module)
    xs = [torch.randn(8, 1, 8, 8, dtype=torch.float64) for _ in range(10)]
    torch_opt = torch.optim.RMSprop(module.parameters(), lr=5e-5)
    for x in xs:
        torch_opt.zero_grad()
        (-module(x).mean()).backward()
        torch_opt.step()

    def loss(p, x):
        return -model.apply(p, {}, x)[0].mean()

    opt = optim.rmsprop(lr=5e-5)
    state = opt.init(params)
    for x in xs:
        updates, state = opt.update(grad(loss)(params, x), state, params)
        params = optim.apply_updates(params, updates)
    assert_trees_close(params, dict(module.named_parameters()), **F64)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
        ("adam", {"lr": 1e-2, "amsgrad": True}),
        ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
        ("rmsprop", {"lr": 1e-2, "centered": True}),
        ("adagrad", {"lr": 1e-1}),
    ],
)
def test_fused_path_keeps_each_leaf_s_layout_bit_for_bit(name, kwargs):
    """torch's fused kernels index raw memory: a channels_last param and a transposed one
    keep their layout, a strided view comes back dense, and gradients laid out differently
    from their param (contiguous here, as a user may pass them) are read element by element
    right."""
    gen = torch.Generator().manual_seed(0)
    params = {
        "nhwc": torch.randn(8, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last),
        "transposed": torch.randn(7, 4, generator=gen).t(),
        "strided": torch.randn(6, 10, generator=gen)[:, ::2],
        "small": torch.randn(3, generator=gen),
    }
    seq = _grad_sequence(params, steps=3)
    # torch gets its gradients in each param's layout, as autograd makes them.
    expected, _, _ = run_torch(_torch_twin(name, kwargs), params, seq)
    contiguous = [{k: g.contiguous() for k, g in grads.items()} for grads in seq]
    actual, _ = run_functional(getattr(optim, name)(**kwargs), params, contiguous, "fused")
    assert_trees_close(actual, expected, rtol=0.0, atol=0.0)
    assert actual["nhwc"].is_contiguous(memory_format=torch.channels_last)
    assert actual["transposed"].stride() == params["transposed"].stride()
    assert actual["strided"].is_contiguous()


@pytest.mark.parametrize("path", ["update", "fused"])
@pytest.mark.parametrize("name", optim.optimizers.__all__)  # every named optimiser
def test_update_and_apply_gradients_are_pure(name, path):
    kwargs = dict(next(k for n, k in CASES if n == name and len(k) > 1))
    opt = getattr(optim, name)(**kwargs)
    params = _params()
    grads = _grad_sequence(params, steps=1)[0]
    state = opt.init(params)
    _, state = opt.update(grads, state, params)  # a non-initial state, buffers non-zero
    before = tree_clone((params, grads, state))
    if path == "fused":
        assert opt.update_and_apply is not None, f"{name} lost its fused path"
        optim.apply_gradients(opt, grads, state, params)
    else:
        opt.update(grads, state, params)
    assert_trees_close((params, grads, state), before, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("make", [lambda: optim.adam(1e-2), lambda: optim.sgd(0.1, momentum=0.9)])
@pytest.mark.parametrize("context", ["torch.func.grad", "autograd"])
def test_fused_path_falls_back_where_it_cannot_write_in_place(context, make):
    """Under torch.func transforms and while autograd records, apply_gradients takes the
    update + apply_updates path: same numbers, and still differentiable."""
    opt = make()
    params = _params()
    grads = _grad_sequence(params, steps=1)[0]
    state = opt.init(params)
    expected = run_functional(opt, params, [grads])[0]

    def total(p):
        return sum(v.sum() for v in optim.apply_gradients(opt, grads, state, p)[0].values())

    # d/dp of sum(new params) is all ones: neither update depends on p.
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    if context == "torch.func.grad":
        assert_trees_close(grad(total)(params), ones, rtol=0.0, atol=0.0)
    else:
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        actual = optim.apply_gradients(opt, grads, state, leaves)[0]
        assert_trees_close({k: v.detach() for k, v in actual.items()}, expected, **F64)
        total(leaves).backward()
        assert_trees_close({k: v.grad for k, v in leaves.items()}, ones, rtol=0.0, atol=0.0)


def test_nesterov_without_momentum_is_an_error():
    with pytest.raises(ValueError, match="Nesterov"):
        optim.sgd(0.1, nesterov=True)


def test_sgd_and_adam_keep_their_positional_signatures():
    params = _params()
    seq = _grad_sequence(params, steps=3)
    expected, _, _ = run_torch(
        lambda ts: torch.optim.SGD(ts, 0.1, 0.9, 0.1, weight_decay=1e-3), params, seq
    )
    assert_trees_close(
        run_functional(optim.sgd(0.1, 0.9, 0.1, False, 1e-3), params, seq)[0], expected, **F64
    )
    expected, _, _ = run_torch(
        lambda ts: torch.optim.Adam(ts, 1e-2, (0.8, 0.9), 1e-6, 1e-2), params, seq
    )
    assert_trees_close(
        run_functional(optim.adam(1e-2, (0.8, 0.9), 1e-6, 1e-2), params, seq)[0], expected, **F64
    )


NAMED = {
    "sgd": lambda: optim.sgd(0.1, momentum=0.9),
    "adam": optim.adam,
    "adamw": optim.adamw,
    "rmsprop": optim.rmsprop,
    "adagrad": optim.adagrad,
}
BAD_GRADS = {
    "broadcastable shape": ({"w": torch.ones(1)}, ["grads['w']", "(3,)", "(1,)"]),
    "float64 for float32": (
        {"w": torch.ones(3, dtype=torch.float64)},
        ["grads['w']", "torch.float32", "torch.float64"],
    ),
    "missing key": ({}, ["missing 'w'", "(3,)"]),
}


@pytest.mark.parametrize("case", list(BAD_GRADS))
@pytest.mark.parametrize("name", list(NAMED))
def test_update_called_directly_checks_the_grads(name, case):
    """The optax way (``update`` without ``apply_gradients``) refuses what apply_gradients
    refuses, naming the leaf and both shapes/dtypes, and modifies nothing."""
    grads, words = BAD_GRADS[case]
    opt = NAMED[name]()
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    before = tree_clone((grads, state, params))
    with pytest.raises(TreeMismatchError) as caught:
        opt.update(grads, state, params)
    for word in words:
        assert word in str(caught.value)
    assert_trees_close((grads, state, params), before)


@pytest.mark.parametrize(("name", "made_by"), [(a, b) for a in NAMED for b in NAMED if a != b])
def test_a_state_from_another_optimiser_is_refused_naming_both(name, made_by):
    opt, other = NAMED[name](), NAMED[made_by]()
    params = {"w": torch.ones(3)}
    state = other.init(params)
    expected_types = [type(s).__name__ for s in opt.init(params)]
    got_types = [type(s).__name__ for s in state]
    with pytest.raises(TreeMismatchError) as caught:
        opt.update({"w": torch.ones(3)}, state, params)
    message = str(caught.value)
    assert f"({', '.join(got_types)})" in message
    assert f"({', '.join(expected_types)})" in message
