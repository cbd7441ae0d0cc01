"""Pure means pure: apply and the train and eval steps never mutate their inputs.

Every named optimiser: tests/optim/test_optimizers.py::test_update_and_apply_gradients_are_pure;
random draws: tests/model/test_randomness.py.
"""

import gc

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from functorch_diary import Model, init_train_state, make_eval_step, make_train_step, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone, tree_flatten_with_paths
from tests.helpers import SmallBNNet

MODEL = Model(lambda: nn.Sequential(SmallBNNet(), nn.Dropout(0.3)))
BATCH = (torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)))


def test_apply_mutates_nothing():
    params, state = MODEL.init(seed=0)
    before = tree_clone((params, state, BATCH))
    _, new_state = MODEL.apply(params, state, BATCH[0], train=True, rng=0)
    assert_trees_close((params, state, BATCH), before)
    assert not torch.equal(
        new_state["0.features.1.running_mean"], state["0.features.1.running_mean"]
    )


def test_train_and_eval_steps_mutate_nothing():
    opt = optim.sgd(0.1, momentum=0.9)
    ts = init_train_state(MODEL, opt, seed=0)
    ts, _ = make_train_step(MODEL, F.cross_entropy, opt, compile=False)(
        ts, BATCH
    )  # non-zero momentum
    before = tree_clone((ts, BATCH))
    new_ts, _ = make_train_step(MODEL, F.cross_entropy, opt, compile=False)(ts, BATCH)
    make_eval_step(MODEL, F.cross_entropy, compile=False)(ts, BATCH)
    assert_trees_close((ts, BATCH), before)
    assert int(new_ts.step) == int(ts.step) + 1


# --- values in, values out: nothing returned carries autograd history --------------------

def _autograd_leaves(tree):
    return [
        path
        for path, leaf in tree_flatten_with_paths(tree)
        if isinstance(leaf, torch.Tensor) and (leaf.requires_grad or leaf.grad_fn is not None)
    ]


def test_200_steps_from_named_parameters_keep_no_graph():
    """The diaries' out-of-memory error: a graph kept across steps. Here params taken
    straight from ``named_parameters()`` never chain one step's graph to the next."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    model, _, _ = Model.from_module(net)
    opt = optim.adam(1e-3)
    ts = init_train_state(
        model, opt, params=dict(net.named_parameters()), state=dict(net.named_buffers())
    )
    step = make_train_step(model, F.cross_entropy, opt, compile=False)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    gc.collect()
    live = []
    for i in range(200):
        ts, metrics = step(ts, (x, y))
        assert not _autograd_leaves((ts, metrics)), f"step {i}"
        if i in (20, 199):
            gc.collect()
            live.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
    assert live[1] <= live[0], f"live tensors grew from {live[0]} to {live[1]}"
    assert all(p.grad is None for p in net.parameters())  # the module was not touched


def test_params_without_state_are_used_not_discarded():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model, _, _ = Model.from_module(net)
    ts = init_train_state(model, optim.sgd(0.1), params=dict(net.named_parameters()))
    assert_trees_close(ts.params, {k: v.detach() for k, v in net.named_parameters()})
    assert_trees_close(ts.state, model.init(0)[1])
    assert not _autograd_leaves(ts)


@st.composite
def _hostile_params(draw):
    """Params as a caller may pass them: Parameters, leaves with a grad_fn, views."""
    kinds = draw(st.lists(st.sampled_from(["parameter", "grad_fn", "strided", "plain"]),
                          min_size=2, max_size=2))
    base = {"0.weight": torch.randn(3, 3), "0.bias": torch.randn(3)}
    out = {}
    for (name, value), kind in zip(base.items(), kinds, strict=True):
        if kind == "parameter":
            value = nn.Parameter(value)
        elif kind == "grad_fn":
            value = value.requires_grad_() * 1.0
        elif kind == "strided":
            value = torch.randn(value.shape[::-1]).t() if value.dim() == 2 else value[::1]
        out[name] = value
    return out


@settings(max_examples=12)
@given(params=_hostile_params(), compiled=st.booleans(), name=st.sampled_from(["sgd", "adam"]))
def test_any_input_gives_values_out_and_stays_untouched(params, compiled, name):
    model = Model(lambda: nn.Sequential(nn.Linear(3, 3)))
    opt = optim.sgd(0.1, momentum=0.9) if name == "sgd" else optim.adam(0.1)
    before = {k: v.detach().clone() for k, v in params.items()}
    ts = init_train_state(model, opt, params=params)
    step = make_train_step(
        model, F.mse_loss, opt, compile=compiled, compile_backend="aot_eager"
    )
    for _ in range(2):
        ts, metrics = step(ts, (torch.randn(4, 3), torch.randn(4, 3)))
    assert not _autograd_leaves((ts, metrics))
    assert_trees_close({k: v.detach() for k, v in params.items()}, before, rtol=0, atol=0)


def test_gan_and_ensemble_steps_return_values_from_parameter_leaves():
    from functorch_diary.training import ensemble, gan

    g = Model(lambda: nn.Sequential(nn.Linear(2, 3)))
    d = Model(lambda: nn.Sequential(nn.Linear(3, 1)))
    gs = gan.init_gan_state(g, d, optim.adam(1e-3), optim.adam(1e-3))
    as_parameters = lambda ts: ts._replace(  # noqa: E731
        params={k: nn.Parameter(v.clone()) for k, v in ts.params.items()}
    )
    gs = gan.GANState(as_parameters(gs.generator), as_parameters(gs.critic))
    critic = gan.make_critic_step(g, d, gan.wasserstein_critic_loss, optim.adam(1e-3))
    generator = gan.make_generator_step(g, d, gan.wasserstein_generator_loss, optim.adam(1e-3))
    real, z1, z2 = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 2)
    before = torch.get_rng_state()
    gs, m1 = critic(gs, real, z1)
    gs, m2 = generator(gs, z2)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator untouched
    assert not _autograd_leaves((gs, m1, m2))
    model = Model(lambda: nn.Linear(3, 2))
    members = ensemble.init_ensemble(model, optim.sgd(0.1), seeds=[0, 1])
    members = as_parameters(members)
    step = ensemble.make_ensemble_train_step(model, F.mse_loss, optim.sgd(0.1))
    members, metrics = step(members, (torch.randn(4, 3), torch.randn(4, 2)))
    assert not _autograd_leaves((members, metrics))
