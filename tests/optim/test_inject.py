"""Hyperparameters as state (optax's inject_hyperparams): the same steps as the plain
optimiser, torch's steps when ``param_groups[0]['lr']`` changes between them, and no
recompilation of a compiled step when they change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from functorch_diary import optim
from functorch_diary.testing import assert_trees_close
from tests.helpers import TORCH, dynamo_counts

KWARGS = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
    "adam": {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-2},
    "adamw": {"lr": 1e-2, "betas": (0.85, 0.995), "weight_decay": 0.1},
    "rmsprop": {"lr": 1e-2, "weight_decay": 1e-2},
    "adagrad": {"lr": 0.1, "weight_decay": 1e-2},
}
LRS = [0.1, 0.05, 0.2, 0.0, 0.01]


def _tree(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "b": torch.randn(2, generator=gen, dtype=torch.float64),
    }


def _side_by_side(torch_opt, opt, changes: list[dict], path: str) -> None:
    """Steps of ``torch_opt`` (over params equal to ``_tree(0)``) and of ``opt`` on the same
    gradients; before step i, ``changes[i]`` is set in torch's ``param_groups[0]`` and in
    ours by ``set_hyperparams``. The params end equal to 1e-12."""
    tensors = torch_opt.param_groups[0]["params"]
    params = _tree(0)
    state = opt.init(params)
    for step, change in enumerate(changes):
        grads = _tree(step + 1)
        torch_opt.param_groups[0].update(change)
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = g.clone()
        torch_opt.step()
        if change:
            state = optim.set_hyperparams(state, **change)
        if "lr" in change:
            assert float(optim.current_lr(state)) == change["lr"]
        if path == "update":
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        else:
            params, state = optim.apply_gradients(opt, grads, state, params)
    expected = {k: t.detach() for k, t in zip(params, tensors, strict=True)}
    assert_trees_close(params, expected, rtol=1e-12, atol=1e-12)


def _torch_twin(name: str, **kwargs):
    return TORCH[name]([nn.Parameter(v.clone()) for v in _tree(0).values()], **kwargs)


@pytest.mark.parametrize("path", ["update", "apply_gradients"])
@pytest.mark.parametrize("name", list(KWARGS))
def test_changing_the_injected_lr_between_steps_is_torch_setting_param_groups(name, path):
    kwargs = KWARGS[name]
    opt = optim.inject_hyperparams(getattr(optim, name))(**kwargs)
    changes = [{"lr": lr} for lr in LRS]
    _side_by_side(_torch_twin(name, foreach=True, **kwargs), opt, changes, path)


# torch's param_groups[0] values before each step: momentum (and SGD's dampening) change
# as a loop or a momentum-cycling scheduler changes them. Never 0 then back: see the
# inject_hyperparams docstring.
MOMENTA = [0.9, 0.5, 0.95, 0.3, 0.7]
DAMPENINGS = [0.0, 0.1, 0.0, 0.3, 0.2]


@pytest.mark.parametrize("path", ["update", "apply_gradients"])
@pytest.mark.parametrize("name", ["sgd", "rmsprop"])
def test_changing_the_injected_momentum_between_steps_is_torch_setting_param_groups(name, path):
    kwargs = {"lr": 0.05, "momentum": MOMENTA[0], "weight_decay": 1e-2}
    opt = optim.inject_hyperparams(getattr(optim, name))(**kwargs)
    changes = [{"momentum": m} for m in MOMENTA]
    if name == "sgd":
        changes = [{**c, "dampening": d} for c, d in zip(changes, DAMPENINGS, strict=True)]
    _side_by_side(_torch_twin(name, foreach=True, **kwargs), opt, changes, path)


@pytest.mark.parametrize("path", ["update", "apply_gradients"])
def test_an_injected_sgd_momentum_of_zero_is_torch_s_plain_sgd(path):
    # torch's fused SGD kernel takes no momentum buffers at momentum 0, and the injected
    # stage always keeps one: the step must still run (it raised in the kernel before).
    kwargs = {"lr": 0.05, "momentum": 0.0, "weight_decay": 1e-2}
    opt = optim.inject_hyperparams(optim.sgd)(**kwargs)
    _side_by_side(_torch_twin("sgd", **kwargs), opt, [{}, {}, {}], path)


def test_injected_hyperparameters_are_checked_as_torch_checks_them():
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        optim.inject_hyperparams(optim.sgd)(lr=0.1, momentum=0.0, nesterov=True)


def test_set_hyperparams_names_what_is_not_injected():
    state = optim.inject_hyperparams(optim.adam)(lr=0.1).init(_tree(0))
    with pytest.raises(ValueError, match="eps"):
        optim.set_hyperparams(state, eps=1e-6)


def test_a_compiled_step_does_not_recompile_when_hyperparameters_change():
    """Adam's lr, weight decay and betas change every step: 0 new graphs after the first
    (one optimiser: a compile takes seconds here; the others share its stages)."""
    name = "adam"
    torch._dynamo.reset()
    opt = optim.inject_hyperparams(getattr(optim, name))(**KWARGS[name])
    params = {k: v.float() for k, v in _tree(0).items()}
    state = opt.init(params)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(grads, state, params):
        return optim.apply_gradients(opt, grads, state, params)

    grads = {k: v.float() for k, v in _tree(1).items()}
    params, state = step(grads, state, params)
    with dynamo_counts() as seen:
        for i in range(4):
            changes = {"lr": 0.01 * (i + 1), "weight_decay": 1e-3 * i}
            changes["betas"] = (0.8 + 0.01 * i, 0.99 + 0.001 * i)
            state = optim.set_hyperparams(state, **changes)
            params, state = step(grads, state, params)
    assert seen == {"graphs": 0, "breaks": 0}
    assert float(optim.current_lr(state)) == pytest.approx(0.04)


def test_a_compiled_sgd_step_does_not_recompile_when_its_momentum_changes():
    """SGD's lr, momentum and dampening change every step: 0 new graphs after the first,
    and the params are torch's with param_groups[0] changed the same way."""
    torch._dynamo.reset()
    kwargs = {"lr": 0.05, "momentum": MOMENTA[0], "weight_decay": 1e-2}
    opt = optim.inject_hyperparams(optim.sgd)(**kwargs)
    params = _tree(0)
    tensors = [nn.Parameter(v.clone()) for v in params.values()]
    torch_opt = torch.optim.SGD(tensors, foreach=True, **kwargs)
    state = opt.init(params)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(grads, state, params):
        return optim.apply_gradients(opt, grads, state, params)

    def both(i):
        nonlocal params, state
        changes = {"lr": 0.05 / (i + 1), "momentum": MOMENTA[i], "dampening": DAMPENINGS[i]}
        grads = _tree(i + 1)
        torch_opt.param_groups[0].update(changes)
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = g.clone()
        torch_opt.step()
        params, state = step(grads, optim.set_hyperparams(state, **changes), params)

    both(0)
    with dynamo_counts() as seen:
        for i in range(1, len(MOMENTA)):
            both(i)
    assert seen == {"graphs": 0, "breaks": 0}
    expected = {k: t.detach() for k, t in zip(params, tensors, strict=True)}
    assert_trees_close(params, expected, rtol=1e-12, atol=1e-12)


# One Adam relative (betas) and one classic optimiser (L2 decay) of those written as
# torch's foreach step (the others share their code paths), and Muon (momentum) and
# Adafactor (decoupled decay) on a matrix (a state without one unfactored leaf, which did
# not compile while a missing factor was None): one compile for all four (a compile takes
# seconds here).
NEW = {
    "nadam": {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-2},
    "asgd": {"lr": 1e-2, "weight_decay": 1e-2},
    "muon": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2},
    "adafactor": {"lr": 1e-2, "weight_decay": 1e-2},
}
MATRICES_ONLY = ("muon", "adafactor")


def _leaves(name: str, tree: dict) -> dict:
    return {"w": tree["w"]} if name in MATRICES_ONLY else tree


def test_a_compiled_step_of_the_new_optimisers_does_not_recompile_when_hyperparameters_change():
    """Their lr, weight decay, betas and momentum change every step, in one compiled
    function: 0 new graphs after the first, and torch's params (foreach=True where torch
    has it) with param_groups[0] changed the same way, to 1e-12. (Dynamo's eager backend:
    recompiles are Dynamo's whatever the backend, and it traces in half aot_eager's time.)"""
    torch._dynamo.reset()
    opts = {n: optim.inject_hyperparams(getattr(optim, n))(**kw) for n, kw in NEW.items()}
    params = {n: _leaves(n, _tree(0)) for n in NEW}
    tensors = {n: [nn.Parameter(v.clone()) for v in params[n].values()] for n in NEW}
    torch_opts = {
        n: TORCH[n](tensors[n], **kw, **({} if n == "muon" else {"foreach": True}))
        for n, kw in NEW.items()
    }
    states = {n: opts[n].init(params[n]) for n in NEW}

    @torch.compile(backend="eager", fullgraph=True)
    def step(grads, states, params):
        new = {n: optim.apply_gradients(opts[n], grads[n], states[n], params[n]) for n in opts}
        return {n: p for n, (p, _) in new.items()}, {n: s for n, (_, s) in new.items()}

    def both(i):
        nonlocal params, states
        grads = {n: _leaves(n, _tree(i + 1)) for n in NEW}
        for n, kw in NEW.items():
            changes = {"lr": kw["lr"] * (1 + 0.5 * i), "weight_decay": 1e-2 * i}
            if "betas" in kw:
                changes["betas"] = (kw["betas"][0] + 0.02 * i, kw["betas"][1] - 0.001 * i)
            if "momentum" in kw:
                changes["momentum"] = kw["momentum"] - 0.1 * i
            torch_opts[n].param_groups[0].update(changes)
            for t, g in zip(tensors[n], grads[n].values(), strict=True):
                t.grad = g.clone()
            torch_opts[n].step()
            states[n] = optim.set_hyperparams(states[n], **changes)
        params, states = step(grads, states, params)

    both(0)
    with dynamo_counts() as seen:
        for i in range(1, 3):
            both(i)
    assert seen == {"graphs": 0, "breaks": 0}
    for n in NEW:
        expected = {k: t.detach() for k, t in zip(params[n], tensors[n], strict=True)}
        assert_trees_close(params[n], expected, rtol=1e-12, atol=1e-12)
