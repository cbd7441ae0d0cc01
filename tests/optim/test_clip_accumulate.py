"""Clipping against ``torch.nn.utils.clip_grad_*_``, gradient accumulation against one big
batch and against seed 003's loop without ``zero_grad``, two losses summed, and the whole
optimiser compiled as one graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad

from functorch_diary import Model, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone

F64 = {"rtol": 1e-10, "atol": 1e-10}


def _grads(scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": scale * torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": scale * torch.randn(5, generator=gen, dtype=torch.float64),
    }


@pytest.mark.parametrize(
    ("scale", "max_norm"), [(1.0, 0.5), (1.0, 100.0), (1e-3, 1.0), (50.0, 2.0)]
)
def test_clip_by_global_norm_matches_clip_grad_norm_(scale, max_norm):
    grads = _grads(scale)
    tensors = [nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    clipped, _ = optim.clip_by_global_norm(max_norm).update(grads, optim.EmptyState())
    assert_trees_close(clipped, {k: t.grad for k, t in zip(grads, tensors, strict=True)}, **F64)


def test_clip_by_value_matches_clip_grad_value_():
    grads = _grads(2.0)
    tensors = [nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_value_(tensors, 0.7)
    clipped, _ = optim.clip(0.7).update(grads, optim.EmptyState())
    assert_trees_close(clipped, {k: t.grad for k, t in zip(grads, tensors, strict=True)})


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2)).double()


def _data(n: int, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randn(
        n, 2, generator=gen, dtype=torch.float64
    )


def _loss_fn(model):
    def loss(p, x, y):
        return nn.functional.mse_loss(model.apply(p, {}, x)[0], y)

    return loss


def test_clipped_training_matches_torch_loop():
    module = _mlp()
    model, params, _ = Model.from_module(module)
    xs, ys = _data(10 * 8)
    torch_opt = torch.optim.Adam(module.parameters(), lr=0.05)
    for x, y in zip(xs.split(8), ys.split(8), strict=True):
        torch_opt.zero_grad()
        nn.functional.mse_loss(module(x), y).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.1)
        torch_opt.step()
    opt = optim.chain(optim.clip_by_global_norm(0.1), optim.adam(0.05))
    state = opt.init(params)
    loss = _loss_fn(model)
    for x, y in zip(xs.split(8), ys.split(8), strict=True):
        updates, state = opt.update(grad(loss)(params, x, y), state, params)
        params = optim.apply_updates(params, updates)
    assert_trees_close(params, dict(module.named_parameters()), **F64)


@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_equal_one_step_on_k_times_b(k):
    module = _mlp()
    model, params, _ = Model.from_module(module)
    loss = _loss_fn(model)
    b, steps = 6, 3
    xs, ys = _data(k * b * steps)
    big = optim.adam(0.05, weight_decay=1e-2)
    big_params, big_state = params, big.init(params)
    acc = optim.accumulate_gradients(optim.adam(0.05, weight_decay=1e-2), every_k=k)
    acc_params, acc_state = params, acc.init(params)
    for x, y in zip(xs.split(k * b), ys.split(k * b), strict=True):
        updates, big_state = big.update(grad(loss)(big_params, x, y), big_state, big_params)
        big_params = optim.apply_updates(big_params, updates)
        for i, (mx, my) in enumerate(zip(x.split(b), y.split(b), strict=True)):
            before = acc_params
            updates, acc_state = acc.update(grad(loss)(acc_params, mx, my), acc_state, acc_params)
            acc_params = optim.apply_updates(acc_params, updates)
            if i < k - 1:
                for name in params:  # no step between micro-batches: bit-for-bit unchanged
                    assert torch.equal(acc_params[name], before[name]), name
        assert_trees_close(acc_params, big_params, **F64)


def test_accumulation_matches_seed_003_loop_without_zero_grad():
    """Torch: k backward passes add into .grad (no zero_grad), then one step."""
    module = _mlp()
    model, params, _ = Model.from_module(module)
    k, b = 3, 4
    xs, ys = _data(k * b * 4)
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(zip(xs.split(b), ys.split(b), strict=True)):
        nn.functional.mse_loss(module(x), y).backward()
        if (i + 1) % k == 0:
            torch_opt.step()
            torch_opt.zero_grad()
    opt = optim.accumulate_gradients(optim.sgd(0.1, momentum=0.9), every_k=k, average=False)
    state = opt.init(params)
    loss = _loss_fn(model)
    for x, y in zip(xs.split(b), ys.split(b), strict=True):
        updates, state = opt.update(grad(loss)(params, x, y), state, params)
        params = optim.apply_updates(params, updates)
    assert_trees_close(params, dict(module.named_parameters()), **F64)


def test_accumulate_is_pure_and_checks_k():
    params = {"w": torch.ones(3)}
    opt = optim.accumulate_gradients(optim.sgd(0.1, momentum=0.9), every_k=2)
    state = opt.init(params)
    _, state = opt.update({"w": torch.ones(3)}, state, params)
    before = tree_clone((params, state))
    opt.update({"w": torch.ones(3)}, state, params)
    assert_trees_close((params, state), before)
    with pytest.raises(ValueError, match="every_k"):
        optim.accumulate_gradients(optim.sgd(0.1), every_k=0)


def test_two_losses_summed_equal_seed_003_two_backward_passes():
    """Seed 003: two heads, two losses, two backward() calls into the same .grad; here
    one loss function returns their sum and one gradient is taken, no retain_graph."""
    torch.manual_seed(0)
    module = nn.ModuleDict(
        {"body": nn.Linear(5, 8), "head1": nn.Linear(8, 2), "head2": nn.Linear(8, 1)}
    ).double()
    xs, ys = _data(8)
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    torch_opt.zero_grad()
    nn.functional.mse_loss(module["head1"](torch.tanh(module["body"](xs))), ys).backward()
    nn.functional.l1_loss(module["head2"](torch.tanh(module["body"](xs))), ys[:, :1]).backward()
    torch_opt.step()

    def two_losses(p, x, y):
        h = torch.tanh(nn.functional.linear(x, p["body.weight"], p["body.bias"]))
        loss1 = nn.functional.mse_loss(
            nn.functional.linear(h, p["head1.weight"], p["head1.bias"]), y
        )
        loss2 = nn.functional.l1_loss(
            nn.functional.linear(h, p["head2.weight"], p["head2.bias"]), y[:, :1]
        )
        return loss1 + loss2

    opt = optim.sgd(0.1, momentum=0.9)
    updates, _ = opt.update(grad(two_losses)(params, xs, ys), opt.init(params), params)
    assert_trees_close(optim.apply_updates(params, updates), dict(module.named_parameters()), **F64)


def test_full_optimiser_compiles_as_one_graph_without_recompiling():
    """freeze + clip + accumulate + scheduled AdamW: one dynamo graph for every step."""
    torch._dynamo.reset()
    params = {"features.w": torch.randn(4, 3), "head.w": torch.randn(3), "head.b": torch.zeros(3)}
    opt = optim.freeze(
        optim.accumulate_gradients(
            optim.chain(
                optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_annealing_lr(0.1, 10))
            ),
            every_k=2,
        ),
        "features.*",
    )

    def step(p, s, g):
        updates, s = opt.update(g, s, p)
        return optim.apply_updates(p, updates), s

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    eager_p, eager_s = params, opt.init(params)
    comp_p, comp_s = params, opt.init(params)
    gen = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            g = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
            eager_p, eager_s = step(eager_p, eager_s, g)
            comp_p, comp_s = compiled(comp_p, comp_s, g)
    assert_trees_close(comp_p, eager_p, rtol=1e-6, atol=1e-7)
    assert torch.equal(comp_p["features.w"], params["features.w"])
    assert not torch.equal(comp_p["head.w"], params["head.w"])
