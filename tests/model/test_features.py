"""features.py against hooks: ``register_forward_hook`` for values, ``register_hook`` for
gradients, on the module version of the same model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import vmap
from torch.nn import functional as F

from functorch_diary import models
from functorch_diary.model import features
from functorch_diary.model.core import Model
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone

F64 = {"rtol": 1e-10, "atol": 1e-12}


def lenet64():
    model = models.lenet()
    params, state = model.init(seed=0, dtype=torch.float64)
    module = models.LeNet().double()
    module.load_state_dict(model.state_dict(params, state))
    return model, params, state, module


def hooked_values(module: nn.Module, names: list[str], *inputs):
    """The imperative reference: forward hooks that copy each module's output."""
    seen, handles = {}, []
    for name in names:

        def save(mod, args, output, name=name):
            seen[name] = output.detach().clone()

        handles.append(module.get_submodule(name).register_forward_hook(save))
    out = module(*inputs)
    for handle in handles:
        handle.remove()
    return seen, out


def test_intermediates_equal_forward_hooks_and_keep_keys_and_init():
    model, params, state, module = lenet64()
    names = ["conv.1", "conv.4", "fc.1", "fc.4"]
    taps = features.intermediates(model, names)
    assert taps.param_specs == model.param_specs and taps.state_specs == model.state_specs
    assert_trees_close(taps.init(seed=3), model.init(seed=3))
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    before = tree_clone((params, state))
    values, _ = taps.apply(params, state, x)
    expected, _ = hooked_values(module, names, x)
    assert list(values) == names
    assert_trees_close(values, expected, **F64)
    assert_trees_close((params, state), before)


def test_intermediates_of_torchvision_resnet_module_paths_and_aliases():
    net = torchvision.models.resnet18(num_classes=5).eval()
    model, params, state = Model.from_module(net)
    taps = features.intermediates(model, {"layer1": "low", "layer3.1.add": "mid", "fc": "logits"})
    x = torch.randn(2, 3, 32, 32)
    values, _ = taps.apply(params, state, x)
    expected, out = hooked_values(net, ["layer1", "fc"], x)
    assert list(values) == ["low", "mid", "logits"]
    assert_trees_close(values["low"], expected["layer1"], rtol=1e-5, atol=1e-6)
    assert_trees_close(values["logits"], out.detach(), rtol=1e-5, atol=1e-6)
    assert values["mid"].shape == (2, 256, 2, 2)


def test_inplace_relu_does_not_overwrite_an_earlier_intermediate():
    # Seed 000 item 6: torchvision's ReLU(inplace=True) rewrites the conv output returned
    # by the previous slice. Here features.0 stays the conv output.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3))
    model, params, state = Model.from_module(net)
    values, _ = features.intermediates(model, ["0", "1"]).apply(
        params, state, torch.randn(1, 3, 8, 8)
    )
    assert bool((values["0"] < 0).any())
    assert_trees_close(values["1"], values["0"].relu())


def test_train_mode_state_threading_and_dropout_rng():
    def factory():
        return nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3), nn.BatchNorm1d(3)
        )

    model = Model(factory)
    params, state = model.init(seed=0, dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64)
    taps = features.intermediates(model, ["1", "2", "4"])
    before = tree_clone(state)
    values, new_state = taps.apply(params, state, x, train=True, rng=5)
    out, expected_state = model.apply(params, state, x, train=True, rng=5)
    assert_trees_close(values["4"], out, **F64)
    assert_trees_close(new_state, expected_state, **F64)
    assert_trees_close(state, before)
    assert bool((values["2"] == 0).any())  # dropout was active, with the key of rng=5
    with pytest.raises(ValueError, match="pass rng="):
        taps.apply(params, state, x, train=True)


def test_unknown_name_lists_available_names():
    with pytest.raises(ValueError, match=r"no intermediate named 'conv\.9'.*conv\.0"):
        features.intermediates(models.lenet(), ["conv.9"])
    assert features.node_names(models.lenet())[:3] == ["img", "conv.0", "conv.1"]


def hooked_grads(module: nn.Module, names: list[str], x, y):
    """The imperative reference: register_hook on each module's output tensor."""
    grads, handles = {}, []
    for name in names:

        def tap(mod, args, output, name=name):
            output.register_hook(lambda g: grads.__setitem__(name, g.clone()))

        handles.append(module.get_submodule(name).register_forward_hook(tap))
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    for handle in handles:
        handle.remove()
    return grads, loss.detach()


@settings(max_examples=5, deadline=None)
@given(
    batch=st.integers(1, 4),
    names=st.sets(st.sampled_from(["conv.0", "conv.2", "fc.0", "fc.4"]), min_size=1),
)
def test_intermediate_grads_equal_register_hook(batch, names):
    model, params, state, module = lenet64()
    names = sorted(names)
    x = torch.randn(batch, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    before = tree_clone((params, state))
    got = features.intermediate_grads(model, F.cross_entropy, names)(params, state, x, y)
    expected, loss = hooked_grads(module, names, x, y)
    assert_trees_close(got.grads, expected, **F64)
    assert_trees_close(got.loss, loss, **F64)
    assert_trees_close(got.values, hooked_values(module, names, x)[0], **F64)
    assert_trees_close((params, state), before)


def test_intermediate_grads_with_batchnorm_train_mode_and_per_sample_vmap():
    def factory():
        return nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)
        )

    model = Model(factory)
    params, state = model.init(seed=0, dtype=torch.float64)
    module = factory().double()
    module.load_state_dict(model.state_dict(params, state))
    x, y = torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    f = features.intermediate_grads(model, F.cross_entropy, ["1"])
    got = f(params, state, x, y, train=True)
    expected, _ = hooked_grads(module.train(), ["1"], x, y)
    assert_trees_close(got.grads, expected, **F64)
    assert_trees_close(got.state, dict(module.named_buffers()), **F64)
    # Per-example intermediate gradients (eval mode) by vmap, against a loop of hooks.
    per_example = vmap(lambda xi, yi: f(params, state, xi[None], yi[None]).grads["1"][0])(x, y)
    module.load_state_dict(model.state_dict(params, state))  # back to the initial statistics
    module.eval()
    for i in range(4):
        one, _ = hooked_grads(module, ["1"], x[i : i + 1], y[i : i + 1])
        assert_trees_close(per_example[i], one["1"][0], **F64)


class ReadsPlainTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scale = torch.ones(2)  # neither a parameter nor a buffer: apply cannot swap it

    def forward(self, x):
        return self.fc(x) * self.scale


def test_forward_reading_a_plain_tensor_attribute_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a parameter nor a buffer"):
        features.intermediates(Model(ReadsPlainTensor), ["fc"])
