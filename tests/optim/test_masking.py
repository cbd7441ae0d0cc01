"""Freezing, parameter groups and masks against torch's ``requires_grad``/``param_groups``."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import grad

from functorch_diary import Model, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone, tree_paths

F64 = {"rtol": 1e-10, "atol": 1e-10}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh()),
            classifier=nn.Linear(16, 3),
        )
    ).double()


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 10, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(n)
    ]


def _step(opt, grads, state, params, path: str):
    """One step: "update" (``update`` + ``apply_updates``) or "fused" (``apply_gradients``,
    where each group takes its own fused step)."""
    if path == "fused":
        return optim.apply_gradients(opt, grads, state, params)
    updates, state = opt.update(grads, state, params)
    return optim.apply_updates(params, updates), state


PATHS = pytest.mark.parametrize("path", ["update", "fused"])


def _train_functional(model, params, opt, batches, path: str = "update"):
    def loss(p, x, y):
        return nn.functional.cross_entropy(model.apply(p, {}, x)[0], y)

    state = opt.init(params)
    for x, y in batches:
        params, state = _step(opt, grad(loss)(params, x, y), state, params, path)
    return params, state


def _train_torch(module, opt, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return dict(module.named_parameters())


@PATHS
def test_frozen_subtree_is_untouched_after_100_steps_and_rest_matches_torch(path):
    """Seed 002's "update only a few nodes": torch freezes with requires_grad_(False)."""
    module = _net()
    model, params, _ = Model.from_module(module)
    batches = _batches(100)
    for p in module.features.parameters():
        p.requires_grad_(False)
    torch_opt = torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad],
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-2,
    )
    expected = _train_torch(module, torch_opt, batches)

    opt = optim.freeze(optim.sgd(0.05, momentum=0.9, weight_decay=1e-2), "features.*")
    frozen_before = {k: v.clone() for k, v in params.items() if k.startswith("features.")}
    actual, state = _train_functional(model, params, opt, batches, path)
    for name, before in frozen_before.items():
        assert torch.equal(actual[name], before), name  # bit for bit
    assert_trees_close(actual, expected, **F64)
    # The frozen leaves carry no optimiser state at all: no momentum buffer, no count.
    assert not [p for p in tree_paths(state) if "features." in p]


@PATHS
def test_frozen_leaves_keep_negative_zero_and_nan_bits(path):
    params = {"frozen": torch.tensor([-0.0, float("nan"), 1.5]), "w": torch.ones(3)}
    opt = optim.freeze(optim.adam(0.1, weight_decay=0.1), ["frozen"])
    state = opt.init(params)
    new = params
    for _ in range(3):
        new, state = _step(opt, {"frozen": torch.ones(3), "w": torch.ones(3)}, state, new, path)
    as_bits = lambda t: t.view(torch.int32)  # noqa: E731
    assert torch.equal(as_bits(new["frozen"]), as_bits(params["frozen"]))
    assert not torch.equal(new["w"], params["w"])


@PATHS
@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_freezing_every_leaf_leaves_a_group_with_nothing_to_train(name, path):
    # The trainable group is empty: every stage's fast path must pass, not run a kernel on
    # an empty tensor list (which torch refuses).
    params = {"p0": torch.tensor(-0.0), "b": torch.tensor([1.5, -2.0])}
    opt = optim.freeze(getattr(optim, name)(0.25), ["p0", "b"])
    state = opt.init(params)
    new = params
    for _ in range(2):
        new, state = _step(opt, {"p0": torch.tensor(1.0), "b": torch.ones(2)}, state, new, path)
    as_bits = lambda t: t.view(torch.int32)  # noqa: E731
    assert all(torch.equal(as_bits(new[k]), as_bits(params[k])) for k in params)


def test_the_three_torch_ways_of_freezing_differ_and_freeze_matches_skipping():
    """lr=0 and grad=0 still let weight decay and momentum move params in torch; skipping
    the parameter in step() is the one that keeps it fixed, and :func:`optim.freeze` is it."""
    module = _net()
    model, params, _ = Model.from_module(module)
    batches = _batches(5)
    features = list(module.features.parameters())
    classifier = list(module.classifier.parameters())

    grad_zeroed = _net()
    opt = torch.optim.SGD(grad_zeroed.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(grad_zeroed(x), y).backward()
        for p in grad_zeroed.features.parameters():
            p.grad.zero_()
        opt.step()
    moved = grad_zeroed.features[0].weight.detach()
    assert not torch.equal(moved, features[0].detach())  # weight decay still shrank it

    torch_opt = torch.optim.SGD(
        [{"params": features, "lr": 0.0}, {"params": classifier}],
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-2,
    )
    expected = _train_torch(module, torch_opt, batches)
    actual, _ = _train_functional(
        model,
        params,
        optim.freeze(optim.sgd(0.05, momentum=0.9, weight_decay=1e-2), "features.*"),
        batches,
    )
    assert_trees_close(actual, expected, **F64)  # lr=0 and freeze agree here (no NaN/-0.0)


@PATHS
def test_per_group_lr_and_weight_decay_match_param_groups_with_a_schedule(path):
    module = _net()
    model, params, _ = Model.from_module(module)
    batches = _batches(30)
    torch_opt = torch.optim.SGD(
        [
            {"params": module.features.parameters(), "lr": 0.01, "weight_decay": 1e-3},
            {"params": module.classifier.parameters()},
        ],
        lr=0.1,
        momentum=0.9,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(torch_opt, milestones=[10, 20], gamma=0.5)
    expected = _train_torch(module, torch_opt, batches, scheduler)

    opt = optim.multi_transform(
        {
            "backbone": optim.sgd(
                optim.multistep_lr(0.01, [10, 20], 0.5), momentum=0.9, weight_decay=1e-3
            ),
            "head": optim.sgd(optim.multistep_lr(0.1, [10, 20], 0.5), momentum=0.9),
        },
        {"backbone": "features.*", "head": "classifier.*"},
    )
    actual, state = _train_functional(model, params, opt, batches, path)
    assert_trees_close(actual, expected, **F64)
    for label, group in [("backbone", 0), ("head", 1)]:
        lr = float(optim.current_lr(state, group=label))
        assert lr == pytest.approx(torch_opt.param_groups[group]["lr"], rel=1e-12)


@PATHS
def test_labels_by_function_and_adamw_without_decay_on_biases(path):
    """nanoGPT's choice: decay the weights, not the biases; torch writes it as two groups."""
    module = _net()
    model, params, _ = Model.from_module(module)
    batches = _batches(10)
    decay = [p for n, p in module.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in module.named_parameters() if n.endswith("bias")]
    torch_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    expected = _train_torch(module, torch_opt, batches)

    by_function = optim.multi_transform(
        {
            "decay": optim.adamw(1e-2, weight_decay=0.1),
            "no_decay": optim.adamw(1e-2, weight_decay=0.0),
        },
        lambda path, leaf: "decay" if path.endswith("weight") else "no_decay",
    )
    by_mask = optim.chain(
        optim.scale_by_adam(),
        optim.masked(optim.add_decayed_weights(0.1), "*.weight"),
        optim.scale_by_learning_rate(1e-2),
    )
    for opt in (by_function, by_mask):
        actual, _ = _train_functional(model, params, opt, batches, path)
        assert_trees_close(actual, expected, **F64)


def test_masked_leaves_pass_through_and_hold_no_inner_state():
    params = {"a.w": torch.ones(2), "b.w": torch.ones(2)}
    opt = optim.masked(optim.trace(0.9), "a.*")
    state = opt.init(params)
    assert [p for p in tree_paths(state) if "trace" in p] == ["inner_states.True.trace.a.w"]
    grads = {"a.w": torch.ones(2), "b.w": torch.full((2,), 3.0)}
    _, state = opt.update(grads, state, params)
    updates, _ = opt.update(grads, state, params)
    assert_trees_close(
        updates, {"a.w": torch.full((2,), 1.9), "b.w": torch.full((2,), 3.0)}, rtol=1e-6
    )


@PATHS
def test_masks_are_pure(path):
    params = {"a.w": torch.ones(2), "b.w": torch.ones(2)}
    opt = optim.freeze(optim.adam(0.1), "a.*")
    state = opt.init(params)
    grads = {"a.w": torch.ones(2), "b.w": torch.ones(2)}
    _, state = opt.update(grads, state, params)
    before = tree_clone((params, grads, state))
    _step(opt, grads, state, params, path)
    assert_trees_close((params, grads, state), before, rtol=0.0, atol=0.0)


def test_group_errors_name_the_leaf():
    params = {"features.w": torch.ones(1), "classifier.w": torch.ones(1)}
    missing = optim.multi_transform({"a": optim.sgd(0.1)}, {"a": "features.*"})
    with pytest.raises(ValueError, match=r"leaf 'classifier.w' is selected by no group"):
        missing.init(params)
    twice = optim.multi_transform(
        {"a": optim.sgd(0.1), "b": optim.sgd(0.2)}, {"a": "*", "b": "features.*"}
    )
    with pytest.raises(ValueError, match=r"leaf 'features.w' is selected by \['a', 'b'\]"):
        twice.init(params)
    unknown = optim.multi_transform({"a": optim.sgd(0.1)}, lambda path, leaf: path.split(".")[0])
    with pytest.raises(ValueError, match=r"leaf 'classifier.w' got label 'classifier'"):
        unknown.init(params)
    with pytest.raises(ValueError, match="must name the same groups"):
        optim.multi_transform({"a": optim.sgd(0.1)}, {"b": "*"}).init(params)
    with pytest.raises(ValueError, match="matches no leaf"):
        optim.freeze(optim.sgd(0.1), "feature.*").init(params)
