"""Hypothesis draws hyperparameters, leaf shapes and step counts for each new optimiser;
every draw is checked against ``torch.optim`` (its foreach step, to the bit, through
``apply_gradients``; ``update`` + ``apply_updates`` and the traced form, where the step's
numbers are tensors, to 1e-12 in float64) and for purity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from functorch_diary import optim
from functorch_diary.optim.orthogonal import ADJUST_LR_FNS
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone
from tests.helpers import TORCH

unit = st.floats(0.0, 0.99)
lrs = st.floats(1e-3, 0.3)
decays = st.one_of(st.just(0.0), st.floats(1e-4, 0.1))
epsilons = st.floats(1e-10, 1e-3)
shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)
matrix_shapes = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3)


def hyperparameters(name: str) -> st.SearchStrategy[dict]:
    """kwargs valid for both ``torch.optim.<Name>`` and ``optim.<name>``."""
    betas = st.tuples(unit, st.floats(0.5, 0.9999))
    common = {"lr": lrs, "maximize": st.booleans()}
    table = {
        "nadam": {
            **common,
            "betas": betas,
            "eps": epsilons,
            "weight_decay": decays,
            "momentum_decay": st.floats(0.0, 0.05),
            "decoupled_weight_decay": st.booleans(),
        },
        "radam": {
            **common,
            "betas": betas,
            "eps": epsilons,
            "weight_decay": decays,
            "decoupled_weight_decay": st.booleans(),
        },
        "adamax": {**common, "betas": betas, "eps": epsilons, "weight_decay": decays},
        "adadelta": {
            **common,
            "lr": st.floats(0.1, 2.0),
            "rho": st.floats(0.0, 0.99),
            "eps": st.floats(1e-8, 1e-3),
            "weight_decay": decays,
        },
        "asgd": {
            **common,
            "lambd": st.floats(0.0, 0.1),
            "alpha": st.floats(0.5, 1.0),
            "t0": st.floats(0.0, 6.0),
            "weight_decay": decays,
        },
        "rprop": {
            **common,
            "etas": st.tuples(st.floats(0.1, 0.9), st.floats(1.1, 2.0)),
            "step_sizes": st.tuples(st.floats(1e-6, 1e-3), st.floats(0.01, 50.0)),
        },
        "adafactor": {
            **common,
            "beta2_decay": st.floats(-1.0, -0.1),
            "eps": st.tuples(st.one_of(st.none(), st.floats(1e-30, 1e-3)), st.floats(0.0, 1e-2)),
            "d": st.floats(1.0, 3.0),
            "weight_decay": decays,
        },
        "muon": {
            "lr": lrs,
            "weight_decay": decays,
            "momentum": unit,
            "nesterov": st.booleans(),
            "eps": st.floats(1e-9, 1e-5),
            "ns_steps": st.integers(1, 6),
            "adjust_lr_fn": st.sampled_from(ADJUST_LR_FNS),
        },
    }
    return st.fixed_dictionaries(table[name])


def _tree(leaf_shapes, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=gen, dtype=dtype) for i, s in enumerate(leaf_shapes)}


def _torch_run(name, kwargs, params, grads):
    tensors = [nn.Parameter(v.clone()) for v in params.values()]
    torch_opt = TORCH[name](tensors, **({} if name == "muon" else {"foreach": True}), **kwargs)
    for g in grads:
        for t, gi in zip(tensors, g.values(), strict=True):
            t.grad = gi.clone()
        torch_opt.step()
    return {k: t.detach() for k, t in zip(params, tensors, strict=True)}


NAMES = ["nadam", "radam", "adamax", "adadelta", "asgd", "rprop", "adafactor", "muon"]


@pytest.mark.parametrize("name", NAMES)
def test_any_hyperparameters_match_torch(name):
    @settings(max_examples=10, deadline=None)
    @given(
        hyperparameters(name),
        matrix_shapes if name == "muon" else shapes,
        st.integers(1, 6),
        st.integers(0, 2**16),
        st.sampled_from([torch.float32, torch.float64]),
    )
    def check(kwargs, leaf_shapes, steps, seed, dtype):
        params = _tree(leaf_shapes, seed, dtype)
        grads = [_tree(leaf_shapes, seed + 1 + i, dtype) for i in range(steps)]
        opt = getattr(optim, name)(**kwargs)
        fused_state, update_state, traced_state = (
            opt.init(params),
            opt.init(params),
            opt.init(params),
        )
        fused, unfused = params, params
        # Params that autograd records: the step's numbers are tensors, as under compile.
        traced = {k: v.clone().requires_grad_() for k, v in params.items()}
        for g in grads:
            inputs = (g, fused_state, fused, update_state, unfused)
            before = tree_clone(inputs)
            fused, fused_state = optim.apply_gradients(opt, g, fused_state, fused)
            updates, update_state = opt.update(g, update_state, unfused)
            unfused = optim.apply_updates(unfused, updates)
            assert_trees_close(inputs, before, rtol=0.0, atol=0.0)  # no input written to
            traced, traced_state = optim.apply_gradients(opt, g, traced_state, traced)
        expected = _torch_run(name, kwargs, params, grads)
        assert_trees_close(fused, expected, rtol=0.0, atol=0.0)
        # update + apply_updates: new - p then p + (new - p), at most a rounding per step.
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_trees_close(unfused, expected, rtol=tol, atol=tol)
        assert_trees_close({k: v.detach() for k, v in traced.items()}, expected, rtol=tol, atol=tol)

    check()
