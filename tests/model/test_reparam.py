"""Reparametrisations against torch's own ``parametrize`` versions (the imperative twins)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad
from torch.nn.utils import parametrizations, parametrize

from functorch_diary import (
    Model,
    TreeMismatchError,
    extract,
    init_train_state,
    make_train_step,
    optim,
)
from functorch_diary.model import reparam
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone

F64 = {"rtol": 1e-10, "atol": 1e-12}


def _torch_twin(factory, paths, seed, register):
    """torch.manual_seed(seed); build; register on each path in order; then float64."""
    torch.manual_seed(seed)
    module = factory()
    for path in paths:
        prefix, _, name = path.rpartition(".")
        register(module.get_submodule(prefix), name)
    return module.double()


def _grads(module: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters())
    return dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))


def _layer(kind: str, c_in: int, c_out: int, k: int):
    if kind == "linear":
        return lambda: nn.Sequential(nn.Flatten(), nn.Linear(c_in * 9, c_out)), (2, c_in, 3, 3)
    if kind == "conv":
        return lambda: nn.Conv2d(c_in, c_out, k, padding=1), (2, c_in, 5, 5)
    return lambda: nn.ConvTranspose2d(c_in, c_out, k, stride=2), (2, c_in, 4, 4)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv", "conv_transpose"]),
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 5),
    k=st.integers(1, 3),
    n_power_iterations=st.integers(1, 3),
    modes=st.lists(st.booleans(), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_spectral_norm_matches_torch_parametrization(
    kind, c_in, c_out, k, n_power_iterations, modes, seed
):
    factory, x_shape = _layer(kind, c_in, c_out, k)
    base = Model(factory)
    paths = base.paths_of(nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    model = reparam.spectral_norm(base, paths, n_power_iterations=n_power_iterations)
    twin = _torch_twin(
        factory,
        paths,
        seed,
        lambda m, name: parametrizations.spectral_norm(m, name, n_power_iterations),
    )
    params, state = model.init(seed, dtype=torch.float64)
    # Same seed, same draws, same warm-up: bit-for-bit equal u, v and weights.
    assert_trees_close((params, state), extract(twin))
    x = torch.randn(x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for train in modes:
        twin.train(train)
        loss = twin(x).sin().sum()
        expected_grads = _grads(twin, loss)

        def objective(params, state, train=train):
            y, new_state = model.apply(params, state, x, train=train)
            return y.sin().sum(), new_state

        grads, state = grad(objective, has_aux=True)(params, state)
        assert_trees_close(state, dict(twin.named_buffers()))  # u, v updated bit for bit
        assert_trees_close(grads, expected_grads, **F64)
        twin.eval()  # reading the weight in eval mode does not iterate
        for path in paths:
            prefix, _, name = path.rpartition(".")
            key = f"{prefix}.parametrizations.{name}".removeprefix(".")
            w_sn, _, _ = reparam.spectral_normalize(
                params[f"{key}.original"],
                state[f"{key}.0._u"],
                state[f"{key}.0._v"],
                train=False,
                dim=1 if kind == "conv_transpose" else 0,
            )
            assert_trees_close(w_sn, getattr(twin.get_submodule(prefix), name), **F64)


def test_spectral_norm_model_keys_state_dict_and_training_match_torch():
    def factory():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(4, 2, 3),
            nn.Flatten(),
            nn.Linear(2 * 6 * 6, 1),
        )

    base = Model(factory)
    paths = base.paths_of(nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    model = reparam.spectral_norm(base, paths)
    twin = _torch_twin(factory, paths, 7, parametrizations.spectral_norm)
    assert list(model.param_specs) == [n for n, _ in twin.named_parameters()]
    assert list(model.state_specs) == [n for n, _ in twin.named_buffers()]
    params, state = model.init(7, dtype=torch.float64)
    assert list(model.state_dict(params, state)) == list(twin.state_dict())
    assert_trees_close(model.from_state_dict(twin.state_dict()), extract(twin))
    # Ten optimiser steps through make_train_step against torch.optim on the twin.
    opt = optim.adam(1e-2)
    step = make_train_step(model, nn.functional.mse_loss, opt, compile=False)
    ts = init_train_state(model, opt, seed=7, params=params, state=state)
    torch_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        x = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=gen)
        y = torch.randn(4, 1, dtype=torch.float64, generator=gen)
        ts, _ = step(ts, (x, y))
        torch_opt.zero_grad()
        nn.functional.mse_loss(twin(x), y).backward()
        torch_opt.step()
    # Adam divides by sqrt(v): last-bit differences in the gradients grow to ~1e-9 in ten steps.
    assert_trees_close((ts.params, ts.state), extract(twin), rtol=1e-7, atol=1e-9)


def test_spectral_norm_respects_eval_mode_of_the_built_module():
    # torch's registration check iterates once more only if the module is in training mode.
    def factory():
        return nn.Linear(5, 3).eval()

    model = reparam.spectral_norm(Model(factory), "weight", n_power_iterations=4)
    twin = _torch_twin(factory, ["weight"], 0, lambda m, n: parametrizations.spectral_norm(m, n, 4))
    assert_trees_close(model.init(0, dtype=torch.float64), extract(twin))


def test_spectral_norm_of_a_vector_is_its_direction():
    model = reparam.spectral_norm(Model(lambda: nn.BatchNorm1d(3)), "weight")
    params, state = model.init(0)
    assert "parametrizations.weight.0._u" not in state
    params["parametrizations.weight.original"] = torch.tensor([3.0, 0.0, 4.0])
    twin = parametrizations.spectral_norm(nn.BatchNorm1d(3), "weight").eval()
    twin.parametrizations.weight.original.data = torch.tensor([3.0, 0.0, 4.0])
    x = torch.randn(4, 3)
    assert_trees_close(model.apply(params, state, x)[0], twin(x), rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(2, 12), cols=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_spectral_norm_converges_to_unit_spectral_norm(rows, cols, seed):
    model = reparam.spectral_norm(Model(lambda: nn.Linear(cols, rows)), "weight", 100)
    params, state = model.init(seed, dtype=torch.float64)
    x = torch.zeros(1, cols, dtype=torch.float64)
    for _ in range(2):  # 15 + 100 warm-up iterations, then 200 more
        _, state = model.apply(params, state, x, train=True)
    w_sn, _, _ = reparam.spectral_normalize(
        params["parametrizations.weight.original"],
        state["parametrizations.weight.0._u"],
        state["parametrizations.weight.0._v"],
        train=False,
    )
    assert abs(torch.linalg.matrix_norm(w_sn, ord=2).item() - 1.0) < 1e-3


def test_apply_is_pure_and_eval_leaves_state_alone():
    model = reparam.spectral_norm(Model(lambda: nn.Linear(4, 3)), "weight")
    params, state = model.init(0)
    before = tree_clone((params, state))
    _, new_state = model.apply(params, state, torch.randn(2, 4), train=True)
    assert_trees_close((params, state), before)
    assert new_state is not state and set(new_state) == set(state)
    _, same = model.apply(params, state, torch.randn(2, 4), train=False)
    assert same is state


def test_bad_state_names_the_leaf_and_both_shapes():
    model = reparam.spectral_norm(Model(lambda: nn.Linear(4, 3)), "weight")
    params, state = model.init(0)
    bad = {**state, "parametrizations.weight.0._u": torch.zeros(4)}
    with pytest.raises(TreeMismatchError, match=r"parametrizations\.weight\.0\._u.*\(3,\).*\(4,\)"):
        model.apply(params, bad, torch.randn(2, 4), train=True)


def test_selectors_that_cannot_work_are_errors():
    base = Model(lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="matches no leaf"):
        reparam.spectral_norm(base, "conv*.weight")
    once = reparam.spectral_norm(base, "0.weight")
    with pytest.raises(ValueError, match="already reparametrised"):
        reparam.weight_norm(once, "0.*")
    with pytest.raises(ValueError, match="n_power_iterations"):
        reparam.spectral_norm(base, "0.weight", n_power_iterations=0)


def test_nested_reparametrisations_match_torch():
    def factory():
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))

    model = reparam.spectral_norm(reparam.weight_norm(Model(factory), "0.weight"), "3.weight")

    def register(module, name):
        if isinstance(module, nn.Conv2d):
            parametrizations.weight_norm(module, name)
        else:
            parametrizations.spectral_norm(module, name)

    twin = _torch_twin(factory, ["0.weight", "3.weight"], 1, register)
    params, state = model.init(1, dtype=torch.float64)
    assert_trees_close((params, state), extract(twin))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    loss = twin(x).pow(2).sum()
    grads, new_state = grad(
        lambda p: (lambda out: (out[0].pow(2).sum(), out[1]))(model.apply(p, state, x, train=True)),
        has_aux=True,
    )(params)
    assert_trees_close(grads, _grads(twin, loss), **F64)
    assert_trees_close(new_state, dict(twin.named_buffers()))
    assert model.paths_of(nn.Conv2d) == [
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
    ]


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_matches_torch(dim):
    def factory():
        return nn.Conv2d(3, 4, 2)

    model = reparam.weight_norm(Model(factory), "weight", dim=dim)
    twin = _torch_twin(factory, ["weight"], 0, lambda m, n: parametrizations.weight_norm(m, n, dim))
    params, state = model.init(0, dtype=torch.float64)
    assert_trees_close((params, state), extract(twin))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    grads = grad(lambda p: model.apply(p, state, x)[0].tanh().sum())(params)
    assert_trees_close(grads, _grads(twin, twin(x).tanh().sum()), **F64)


class SeedConv2d(nn.Conv2d):
    """Seed 004's ``Conv2d`` for ``weight_std=True`` (DeepLabv3), verbatim: the twin."""

    def forward(self, x):
        weight = self.weight
        weight_mean = (
            weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        )
        weight = weight - weight_mean
        std = weight.view(weight.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        weight = weight / std.expand_as(weight)
        return nn.functional.conv2d(
            x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def test_weight_standardization_matches_seed_004_conv():
    def factory():
        return nn.Sequential(SeedConv2d(3, 5, 3, padding=1), nn.ReLU(), SeedConv2d(5, 2, 1))

    twin_module = factory().double()
    plain = Model(
        lambda: nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1))
    )
    model = reparam.weight_standardization(plain, plain.paths_of(nn.Conv2d))
    raw, _ = extract(twin_module)
    params = {
        (k.replace("weight", "parametrizations.weight.original") if k.endswith("weight") else k): v
        for k, v in raw.items()
    }
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y, _ = model.apply(params, {}, x)
    assert_trees_close(y, twin_module(x), **F64)
    grads = grad(lambda p: model.apply(p, {}, x)[0].square().sum())(params)
    expected = _grads(twin_module, twin_module(x).square().sum())
    assert_trees_close(
        grads,
        {
            (
                k.replace("weight", "parametrizations.weight.original")
                if k.endswith("weight")
                else k
            ): v
            for k, v in expected.items()
        },
        **F64,
    )
    # And the torch parametrization twin gives the same layer.
    registered = parametrize.register_parametrization(
        nn.Conv2d(3, 5, 3).double(), "weight", reparam.WeightStandardization()
    )
    assert_trees_close(
        registered.weight, reparam.standardize_weight(registered.parametrizations.weight.original)
    )


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(
        st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)
    ).filter(lambda s: s[1] * s[2] * s[3] >= 2),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_weight_standardization_gives_zero_mean_unit_variance(shape, scale, seed):
    w = scale * torch.randn(
        shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    w = w + 3.0  # an offset that standardisation must remove
    eps = 1e-5
    out = reparam.standardize_weight(w, eps).flatten(1)
    std = (w.flatten(1) - w.flatten(1).mean(1, keepdim=True)).std(1)
    assert out.mean(1).abs().max() < 1e-9 * (1 + w.abs().max())
    # Unbiased variance is (std / (std + eps))^2: 1 up to the eps the standardisation adds,
    # which matters only for rows whose own spread is near eps (two nearly equal weights).
    assert_trees_close(out.var(1), (std / (std + eps)) ** 2, rtol=1e-9)
    spread = std > 1e3 * eps
    assert_trees_close(out.var(1)[spread], torch.ones(int(spread.sum()), dtype=w.dtype), rtol=3e-3)


def test_spectral_norm_step_compiles_as_one_graph():
    model = reparam.spectral_norm(Model(lambda: nn.Linear(4, 2)), "weight")
    params, state = model.init(0)
    x = torch.randn(3, 4)
    compiled = torch.compile(lambda p, s: model.apply(p, s, x, train=True), fullgraph=True)
    y, new_state = compiled(params, state)
    y_eager, eager_state = model.apply(params, state, x, train=True)
    assert_trees_close((y, new_state), (y_eager, eager_state), rtol=1e-5, atol=1e-6)


def test_tools_that_rebuild_from_the_factory_are_told_to_wrap_the_inner_model():
    from functorch_diary.model import features

    base = Model(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)))
    with pytest.raises(TypeError, match="reparametrise its result"):
        features.intermediates(reparam.spectral_norm(base, "*.weight"), ["1"])
    model = reparam.spectral_norm(features.intermediates(base, ["1"]), "*.weight")
    params, state = model.init(0)
    out, new_state = model.apply(params, state, torch.randn(1, 1, 6, 6), train=True)
    assert list(out) == ["1"] and set(new_state) == set(state)


def test_a_reparametrized_model_is_a_model_whose_factory_builds_its_imperative_twin():
    base = Model(lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    model = reparam.weight_norm(reparam.spectral_norm(base, "0.weight"), "2.weight")
    assert isinstance(model, Model)
    params, state = model.init(seed=3)
    twin = model.factory()  # torch's parametrizations registered on the same weights
    twin.load_state_dict(model.state_dict(params, state))
    x = torch.randn(6, 4)
    out, _ = model.apply(params, state, x, train=False)
    assert_trees_close(out, twin.eval()(x), rtol=1e-6, atol=1e-6)
    assert set(twin.state_dict()) == set(model.state_dict(params, state))
