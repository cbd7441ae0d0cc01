"""func.py against its imperative twins: loops of ``.backward()``, ``torch.autograd.functional``,
``requires_grad_(False)``, separate training runs."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from functorch_diary import func, models, optim, prng
from functorch_diary.model.core import Model
from functorch_diary.testing import assert_trees_close
from functorch_diary.training import ensemble as ens
from functorch_diary.training.step import init_train_state, make_train_step
from functorch_diary.tree import tree_clone

F64 = {"rtol": 1e-10, "atol": 1e-12}


class BNNet(nn.Module):
    """A small CNN with BatchNorm (run in eval mode for per-sample gradients)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


class DropNet(nn.Module):
    def __init__(self, features: int = 5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)


def module_loop_grads(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy):
    """The imperative reference: one backward per example, grads copied out of .grad."""
    per_example = []
    for i in range(x.shape[0]):
        module.zero_grad()
        loss_fn(module(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append({n: p.grad.clone() for n, p in module.named_parameters()})
    return {n: torch.stack([g[n] for g in per_example]) for n in per_example[0]}


def twin(model: Model, module_cls, params, state, *args) -> nn.Module:
    module = module_cls(*args).double()
    module.load_state_dict(model.state_dict(params, state))
    return module


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 6), features=st.integers(1, 7), hidden=st.integers(1, 9))
def test_per_sample_grads_mlp_equal_loop(batch, features, hidden):
    model = models.mlp(in_features=features, hidden=(hidden,), num_classes=3)
    params, state = model.init(seed=batch, dtype=torch.float64)
    x = torch.randn(batch, features, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    before = tree_clone((params, state))
    grads, losses = func.per_sample_grads(model, F.cross_entropy)(params, state, x, y)
    module = twin(model, models.MLP, params, state, features, (hidden,), 3)
    assert_trees_close(grads, module_loop_grads(module, x, y), **F64)
    expected = torch.stack(
        [F.cross_entropy(module(x[i : i + 1]), y[i : i + 1]) for i in range(batch)]
    )
    assert_trees_close(losses, expected.detach(), **F64)
    assert_trees_close((params, state), before)  # pure: inputs untouched


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 5), chunk=st.sampled_from([None, 1, 2]))
def test_per_sample_grads_lenet_equal_loop(batch, chunk):
    model = models.lenet()
    params, state = model.init(seed=0, dtype=torch.float64)
    x = torch.randn(batch, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    grads, _ = func.per_sample_grads(model, F.cross_entropy, chunk_size=chunk)(params, state, x, y)
    module = twin(model, models.LeNet, params, state)
    assert_trees_close(grads, module_loop_grads(module, x, y), **F64)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 5), size=st.integers(3, 8), width=st.integers(1, 5))
def test_per_sample_grads_batchnorm_eval_equal_loop(batch, size, width):
    model = Model(lambda: BNNet(width))
    params, state = model.init(seed=1, dtype=torch.float64)
    # Non-trivial running statistics, as after some training.
    state = {
        **state,
        "bn.running_mean": torch.randn(width, dtype=torch.float64),
        "bn.running_var": torch.rand(width, dtype=torch.float64) + 0.5,
    }
    x = torch.randn(batch, 1, size, size, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    before = tree_clone(state)
    grads, _ = func.per_sample_grads(model, F.cross_entropy)(params, state, x, y)
    module = twin(model, BNNet, params, state, width).eval()
    assert_trees_close(grads, module_loop_grads(module, x, y), **F64)
    assert_trees_close(state, before)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 6), features=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_per_sample_grads_dropout_same_keys_equal_loop(batch, features, seed):
    model = Model(lambda: DropNet(features))
    params, state = model.init(seed=0, dtype=torch.float64)
    x = torch.randn(batch, features, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    keys = prng.fold_in(prng.key(seed), torch.arange(batch))
    grads, losses = func.per_sample_grads(model, F.cross_entropy, train=True)(
        params, state, x, y, rng=keys
    )
    # The loop: plain autograd on one example at a time, with that example's key.
    for i in range(batch):
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        out, _ = model.apply(leaves, state, x[i : i + 1], train=True, rng=keys[i])
        loss = F.cross_entropy(out, y[i : i + 1])
        expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        assert_trees_close({n: g[i] for n, g in grads.items()}, expected, **F64)
        assert_trees_close(losses[i], loss.detach(), **F64)
    # One key is split as fold_in(key, i): the same numbers.
    again, _ = func.per_sample_grads(model, F.cross_entropy, train=True)(
        params, state, x, y, rng=seed
    )
    assert_trees_close(again, grads)


def test_per_sample_dropout_masks_differ_between_examples():
    model = Model(lambda: DropNet(4))
    params, state = model.init(seed=0, dtype=torch.float64)
    x = torch.randn(1, 4, dtype=torch.float64).expand(6, 4)  # six copies of one example
    y = torch.zeros(6, dtype=torch.long)
    grads, _ = func.per_sample_grads(model, F.cross_entropy, train=True)(params, state, x, y, rng=0)
    first = grads["net.0.weight"][0]
    assert any(not torch.allclose(first, g) for g in grads["net.0.weight"][1:])


def test_per_sample_grads_wrt_subset_and_errors():
    model = Model(lambda: BNNet(3))
    params, state = model.init(seed=0, dtype=torch.float64)
    x, y = torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    full, _ = func.per_sample_grads(model, F.cross_entropy)(params, state, x, y)
    some, _ = func.per_sample_grads(model, F.cross_entropy, wrt="fc.*")(params, state, x, y)
    assert sorted(some) == ["fc.bias", "fc.weight"]
    assert_trees_close(some, {n: full[n] for n in some})
    with pytest.raises(ValueError, match="batch statistics"):
        func.per_sample_grads(model, F.cross_entropy, train=True)
    drop = Model(lambda: DropNet(2))
    p, s = drop.init(seed=0)
    with pytest.raises(ValueError, match="3 per-sample keys for a batch of 2"):
        func.per_sample_grads(drop, F.cross_entropy, train=True)(
            p, s, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), rng=torch.arange(3)
        )


class EnsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8, bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(8, 3),
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(
    ("per_member", "make_opt"),
    [
        (False, lambda: optim.adam(1e-2)),
        (True, lambda: optim.sgd(0.1, momentum=0.9, weight_decay=1e-3)),
    ],
    ids=["adam-shared-batch", "sgd-batch-per-member"],
)
def test_ensemble_equals_separate_trainings(per_member, make_opt):
    model, opt, seeds = Model(EnsNet), make_opt(), [3, 7, 11]
    ensemble = ens.init_ensemble(model, opt, seeds, dtype=torch.float64)
    step = ens.make_ensemble_train_step(model, F.cross_entropy, opt, batch_per_member=per_member)
    single = make_train_step(model, F.cross_entropy, opt)
    members = [init_train_state(model, opt, s, dtype=torch.float64) for s in seeds]
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        shape = (len(seeds), 16) if per_member else (16,)
        x = torch.randn(*shape, 4, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 3, shape, generator=gen)
        previous, before = ensemble, tree_clone(ensemble)
        ensemble, metrics = step(previous, (x, y))
        assert_trees_close(previous, before)  # pure: the state passed in is untouched
        results = [single(m, (x[i], y[i]) if per_member else (x, y)) for i, m in enumerate(members)]
        members = [r[0] for r in results]
        assert_trees_close(metrics["loss"], torch.stack([r[1]["loss"] for r in results]), **F64)
    for got, want in zip(ens.unstack(ensemble), members, strict=True):
        assert_trees_close(got, want, **F64)


def test_ensemble_apply_and_stack_roundtrip():
    model = Model(EnsNet)
    trees = [model.init(seed) for seed in range(4)]
    params, state = ens.stack([p for p, _ in trees]), ens.stack([s for _, s in trees])
    assert_trees_close(ens.unstack(params), [p for p, _ in trees])
    x = torch.randn(5, 4)
    out = ens.ensemble_apply(model, params, state, x)
    expected = torch.stack([model.apply(p, s, x)[0] for p, s in trees])
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-6)


def _flat_reference(params):
    """Independent flattening for the reference Hessian (sorted keys, as optree orders)."""
    names = sorted(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unflat(vec):
        return {
            n: part.reshape(s)
            for n, part, s in zip(names, torch.split(vec, sizes), shapes, strict=True)
        }

    return torch.cat([params[n].reshape(-1) for n in names]), unflat


def _small_problem():
    model = Model(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    params, state = model.init(seed=0, dtype=torch.float64)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    return model, params, state, x, y


def test_hvp_equals_full_hessian_times_vector():
    model, params, state, x, y = _small_problem()
    loss = func.loss_of_params(model, F.cross_entropy, state, x, y)
    vector = {n: torch.randn_like(p) for n, p in params.items()}
    before = tree_clone(params)
    got = func.hvp(loss, params, vector)
    flat, unflat = _flat_reference(params)
    hessian = torch.autograd.functional.hessian(lambda v: loss(unflat(v)), flat)
    vec, _ = _flat_reference(vector)
    assert_trees_close(got, unflat(hessian @ vec), **F64)
    assert_trees_close(params, before)


def test_jacobian_and_jvp_equal_autograd_functional():
    model, params, state, x, _ = _small_problem()

    def outputs(p):
        return model.apply(p, state, x)[0]

    flat, unflat = _flat_reference(params)
    reference = torch.autograd.functional.jacobian(lambda v: outputs(unflat(v)), flat)
    assert_trees_close(func.jacobian(outputs, params, flat=True), reference.reshape(12, -1), **F64)
    tree_jac = func.jacobian(outputs, params)
    assert tree_jac["0.weight"].shape == (6, 2, 4, 3)
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    value, directional = func.jvp(outputs, params, tangent)
    vec, _ = _flat_reference(tangent)
    _, ref_jvp = torch.autograd.functional.jvp(lambda v: outputs(unflat(v)), flat, vec)
    assert_trees_close(value, outputs(params), **F64)
    assert_trees_close(directional, ref_jvp, **F64)
    vector, unravel = func.ravel(params)
    assert_trees_close(vector, flat)
    assert_trees_close(unravel(vector), params)


def test_input_grads_and_saliency_equal_requires_grad_on_inputs():
    model = models.lenet()
    params, state = model.init(seed=0, dtype=torch.float64)
    module = twin(model, models.LeNet, params, state)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    got, loss = func.input_grads(model, F.cross_entropy)(params, state, x, y)
    leaf = x.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(module(leaf), y)
    ref_loss.backward()
    assert_trees_close(got, leaf.grad, **F64)
    assert_trees_close(loss, ref_loss.detach(), **F64)
    leaf = x.clone().requires_grad_(True)
    logits = module(leaf)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    assert_trees_close(func.saliency(model, params, state, x), leaf.grad, **F64)


def test_subset_grads_equal_requires_grad_false_and_partial_sgd():
    model = models.mlp(in_features=5, hidden=(6, 6), num_classes=3)
    params, state = model.init(seed=0, dtype=torch.float64)
    module = twin(model, models.MLP, params, state, 5, (6, 6), 3)
    chosen = ["net.3.*", "net.5.bias"]
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith("net.3.") or name == "net.5.bias")
    opt, ref_opt = optim.sgd(0.1, momentum=0.9), None
    ref_opt = torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    f = func.subset_grads(model, F.cross_entropy, chosen)
    sub = {n: p for n, p in params.items() if n.startswith("net.3.") or n == "net.5.bias"}
    opt_state = opt.init(sub)
    for _ in range(3):
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
        grads, (loss, _) = f(params, state, x, y)
        assert_trees_close(loss, F.cross_entropy(module(x), y).detach(), **F64)
        ref_opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        assert sorted(grads) == ["net.3.bias", "net.3.weight", "net.5.bias"]
        assert_trees_close(
            grads, {n: p.grad for n, p in module.named_parameters() if n in grads}, **F64
        )
        assert all(p.grad is None for n, p in module.named_parameters() if n not in grads)
        updates, opt_state = opt.update(grads, opt_state, sub)
        sub = optim.apply_updates(sub, updates)
        params = {**params, **sub}
        ref_opt.step()
    expected = {n: p.detach() for n, p in module.named_parameters()}
    assert_trees_close(params, expected, **F64)


def test_unstack_rejects_ragged_and_stack_rejects_empty():
    with pytest.raises(ValueError, match="one common leading size"):
        ens.unstack({"a": torch.zeros(2, 1), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="at least one tree"):
        ens.stack([])
    assert copy.deepcopy(ens.unstack({"a": torch.zeros(2), "n": torch.tensor(5)}))[1]["n"] == 5
