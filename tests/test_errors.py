"""One test per error the diaries record: impossible by construction, or a clear message
naming the layer/leaf path, both values and what to do. The table is docs/errors.md."""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import pytest
import torch
from torch import nn

import functorch_diary as fd
from functorch_diary import checkpoint, optim
from functorch_diary.model.checks import TreeMismatchError
from functorch_diary.model.diagnose import (
    LayerError,
    check_has_forward,
    layers_created_in_forward,
    locate_layer_error,
    stack_batch,
)
from functorch_diary.model.reparam import spectral_norm
from functorch_diary.training.projections import clip_params, project_step
from functorch_diary.tree import tree_clone, tree_leaves
from functorch_diary.zoo.losses import segmentation_cross_entropy


def _versions(tree) -> list[int]:
    """In-place writes bump a tensor's version counter; equal lists mean nothing was written."""
    return [leaf._version for leaf in tree_leaves(tree)]


def _layer_error(model, params, state, *inputs, train=False) -> LayerError:
    """The error ``model.apply`` raises, as a LayerError naming the layer.

    ``Model.apply`` raises the LayerError itself once functional.py calls
    ``diagnose.locate_layer_error`` on its error path; until then this builds it the same
    way from the raw error.
    """
    with pytest.raises(RuntimeError) as info:
        model.apply(params, state, *inputs, train=train)
    if isinstance(info.value, LayerError):
        return info.value
    template = model.template if train else copy.deepcopy(model.template).eval()
    located = locate_layer_error(template, {**params, **state}, inputs, {}, info.value)
    assert located is not None, f"could not locate {info.value}"
    return located


# --- seed 000 ---------------------------------------------------------------------------


class _ConvInForward(nn.Module):
    """Seed 000, Day 3: a layer built inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = nn.Conv2d(1, 4, 3)(x)  # not a registered submodule
        return self.head(x.mean(dim=(2, 3)))


def test_seed000_day3_layer_created_in_forward():
    model = fd.Model(_ConvInForward)
    params, state = model.init(seed=0)
    assert sorted(params) == ["head.bias", "head.weight"]  # the conv's weights are not params
    found = layers_created_in_forward(model.template, {**params, **state}, torch.ones(1, 1, 5, 5))
    assert found == [
        "Conv2d.weight (built in the forward of the model)",
        "Conv2d.bias (built in the forward of the model)",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seed000_day3_layer_created_in_forward_on_gpu_names_it():
    model = fd.Model(_ConvInForward)
    params, state = model.init(seed=0, device="cuda")
    error = _layer_error(model, params, state, torch.ones(1, 1, 5, 5, device="cuda"))
    assert "created during forward: Conv2d.weight" in str(error)
    assert "Create them in __init__" in str(error)


def test_seed000_error1_no_zero_grad_order_to_get_wrong():
    """zero_grad/backward/step: the step is one pure function of (state, batch)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    model, params, state = fd.Model.from_module(net)
    opt = optim.sgd(0.1, momentum=0.9)
    step = fd.make_train_step(model, nn.functional.mse_loss, opt)
    ts = fd.init_train_state(model, opt, params=params, state=state)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    once, _ = step(ts, (x, y))
    again, _ = step(ts, (x, y))  # nothing accumulated in between: the same result
    fd.assert_trees_close(again, once)
    torch_opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        torch_opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        torch_opt.step()
        ts, _ = step(ts, (x, y))
    fd.assert_trees_close(ts.params, dict(net.named_parameters()), rtol=1e-10)


def test_seed000_error9_weight_clipping_without_data():
    """``p.data.clamp_`` becomes a projection returning new params, same numbers."""
    torch.manual_seed(0)
    critic = nn.Linear(4, 1)
    model, params, state = fd.Model.from_module(critic)
    opt = optim.rmsprop(5e-2)
    step = project_step(
        fd.make_train_step(model, lambda out, _: out.mean(), opt), clip_params(-0.01, 0.01)
    )
    ts = fd.init_train_state(model, opt, params=params, state=state)
    before = tree_clone(ts)
    x = torch.randn(16, 4)
    new, _ = step(ts, (x, None))
    fd.assert_trees_close(ts, before)  # the old params were not clamped in place
    torch_opt = torch.optim.RMSprop(critic.parameters(), lr=5e-2)
    critic(x).mean().backward()
    torch_opt.step()
    for p in critic.parameters():
        p.data.clamp_(-0.01, 0.01)
    fd.assert_trees_close(new.params, dict(critic.named_parameters()), rtol=1e-6, atol=1e-9)


def test_seed000_error11_no_graph_survives_a_step():
    """Spectral norm's ``u`` without ``.detach()``: here u, v are state values with no graph."""
    model = spectral_norm(
        fd.Model(lambda: nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))), "*.weight"
    )
    opt = optim.adam(1e-3)
    ts = fd.init_train_state(model, opt, seed=0)
    step = fd.make_train_step(model, lambda out, _: out.mean(), opt)
    for _ in range(3):
        ts, metrics = step(ts, (torch.randn(5, 4), None))
    for leaf in tree_leaves(ts):
        assert leaf.grad_fn is None and not leaf.requires_grad
    assert metrics["loss"].grad_fn is None


def test_seed000_error13_eval_mode_is_the_default():
    """``model.eval()  # This is important!!!!``: here inference mode is what apply does
    unless ``train=True`` is asked for, and it never changes the running statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net.train()(torch.randn(32, 3) * 3 + 1)  # move the running statistics off their init
    model, params, state = fd.Model.from_module(net)
    x = torch.randn(5, 3)
    out, new_state = model.apply(params, state, x)
    fd.assert_trees_close(out, net.eval()(x), rtol=1e-6)
    assert new_state is state


# --- seed 002 ---------------------------------------------------------------------------


def test_seed002_nonleaf_requires_grad_partial_update():
    """``a.requires_grad = False`` on a computed tensor raises in torch; here freezing is
    a selector on the optimiser, and frozen leaves stay bit-for-bit unchanged."""
    a = torch.randn(2, 2, requires_grad=True) + 1
    with pytest.raises(RuntimeError, match="only change requires_grad flags of leaf"):
        a.requires_grad = False
    model = fd.Model(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    opt = optim.freeze(optim.sgd(0.5, momentum=0.9), "0.*")
    ts = fd.init_train_state(model, opt, seed=0)
    step = fd.make_train_step(model, nn.functional.cross_entropy, opt)
    new, _ = step(ts, (torch.randn(6, 3), torch.randint(0, 2, (6,))))
    for name in ("0.weight", "0.bias"):
        assert torch.equal(new.params[name], ts.params[name])
    assert not torch.equal(new.params["2.weight"], ts.params["2.weight"])


def test_seed002_float_tensor_vs_cuda_float_tensor():
    """Inputs on another device than the params: named before the first layer runs.
    (CPU-only check: params on the ``meta`` device stand for "another device".)"""
    model = fd.Model(lambda: nn.Linear(3, 2))
    params, state = model.init(seed=0, device="meta")
    with pytest.raises(
        TreeMismatchError, match=r"input 0: expected device meta.*got cpu.*x\.to\('meta'\)"
    ):
        model.apply(params, state, torch.ones(1, 3))
    params, state = model.init(seed=0)
    params["bias"] = params["bias"].to("meta")
    with pytest.raises(TreeMismatchError, match=r"params\['bias'\]: expected device cpu.*got meta"):
        model.apply(params, state, torch.ones(1, 3))


def test_seed002_float_vs_double():
    model = fd.Model(lambda: nn.Linear(3, 2))
    params, state = model.init(seed=0)
    x = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(
        TreeMismatchError, match=r"input 0: expected dtype torch\.float32.*float64.*x\.to"
    ):
        model.apply(params, state, x)
    params["weight"] = params["weight"].double()
    with pytest.raises(TreeMismatchError, match=r"params\['bias'\]: expected dtype torch\.float64"):
        model.apply(params, state, x)


# --- seed 003 ---------------------------------------------------------------------------


def test_seed003_data_vs_detach_silent_wrong_gradient():
    """torch: zeroing ``out.data`` gives a silently wrong gradient. Here nothing is ever
    written in place: a step leaves every tensor it was given at its version, and its
    gradient is the one autograd computes on an untouched module."""
    a = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = a.sigmoid()
    out.data.zero_()
    out.sum().backward()
    assert torch.equal(a.grad, torch.zeros(3))  # the diary's silent wrong gradient

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    model, params, state = fd.Model.from_module(net)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    versions = _versions((params, state, x, y))

    def loss(p):
        return nn.functional.mse_loss(model.apply(p, state, x, train=True)[0], y)

    grads = torch.func.grad(loss)(params)
    assert _versions((params, state, x, y)) == versions
    nn.functional.mse_loss(net(x), y).backward()
    fd.assert_trees_close(grads, {n: p.grad for n, p in net.named_parameters()}, rtol=1e-10)


def test_seed003_inplace_on_a_detached_tensor():
    """torch: ``c = out.detach(); c.zero_()`` breaks the backward of ``out``. Here the
    step writes into nothing the caller holds, so there is nothing to break."""
    a = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = a.sigmoid()
    out.detach().zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

    model = fd.Model(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    opt = optim.adam(1e-2)
    ts = fd.init_train_state(model, opt, seed=0)
    batch = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    versions = _versions((ts, batch))
    new, _ = fd.make_train_step(model, nn.functional.cross_entropy, opt)(ts, batch)
    assert _versions((ts, batch)) == versions
    assert (
        int(new.state["1.num_batches_tracked"]) == 1 and int(ts.state["1.num_batches_tracked"]) == 0
    )


def test_seed003_modulelist_has_no_forward():
    layers = nn.ModuleList([nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)])
    with pytest.raises(
        TypeError, match=r"ModuleList has no forward\(\).*nn\.Sequential\(\*layers\)"
    ):
        check_has_forward(layers)
    check_has_forward(nn.Sequential(*layers))
    # Model(...) rejects it once functional.py calls check_has_forward; until then the
    # first apply fails with torch's NotImplementedError.
    with pytest.raises((TypeError, NotImplementedError), match="forward"):
        model = fd.Model(lambda: nn.ModuleList([nn.Linear(4, 2)]))
        params, state = model.init(seed=0)
        model.apply(params, state, torch.ones(1, 4))


# --- seed 004 ---------------------------------------------------------------------------


class _DoubleConv(nn.Module):
    """Seed 004's DoubleConv with its bug: the second conv takes in_channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=3),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class _TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down1 = _DoubleConv(3, 64)
        self.head = nn.Conv2d(64, 4, 1)

    def forward(self, x):
        return self.head(self.down1(x))


def test_seed004_unet_channel_mismatch():
    model = fd.Model(_TinyUNet)
    params, state = model.init(seed=0)
    x = torch.randn(4, 3, 20, 20)
    before = tree_clone((params, state, x))
    error = _layer_error(model, params, state, x)
    message = str(error)
    assert error.path == "down1.double_conv.3"
    assert "layer 'down1.double_conv.3' (Conv2d(3, 64, kernel_size=(3, 3)" in message
    assert "failed on input (4, 64, 18, 18) float32 on cpu" in message
    assert "to have 3 channels, but got 64 channels instead" in message  # torch's own words
    assert "build it with in_channels=64" in message
    fd.assert_trees_close((params, state, x), before)  # the re-run touched nothing


def test_seed004_crossentropy_target_shape():
    logits = torch.randn(4, 4, 8, 8)
    labels = torch.randint(0, 4, (4, 8, 8))
    one_hot = nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"look one-hot encoded.*\(4, 4, 8, 8\).*argmax\(dim=1\)"):
        segmentation_cross_entropy(logits, one_hot)
    expected = nn.CrossEntropyLoss()(logits, labels)
    fd.assert_trees_close(segmentation_cross_entropy(logits, labels), expected, rtol=1e-6)


def test_seed004_mixed_image_sizes_in_a_batch():
    samples = [torch.zeros(3, 32, 32), torch.zeros(3, 32, 32), torch.zeros(3, 16, 16)]
    with pytest.raises(
        ValueError,
        match=r"sample 2 has shape \(3, 16, 16\) but sample 0 has \(3, 32, 32\).*Crop or resize",
    ):
        stack_batch(samples)
    assert stack_batch(samples[:2]).shape == (2, 3, 32, 32)


def test_seed004_cross_device_checkpoint_load(tmp_path):
    """Saved on ``cuda:3``, loaded on a machine without it: the stored device is never used."""
    path = tmp_path / "model.ckpt"
    model = fd.Model(lambda: nn.Linear(3, 2))
    params, state = model.init(seed=0)
    checkpoint.save(path, {"params": params, "state": state})
    raw = path.read_bytes()
    size = struct.unpack_from("<Q", raw, 8)[0]
    header = json.loads(raw[16 : 16 + size])
    for node in header["tree"]["c"][0]["c"]:
        node["device"] = "cuda:3"  # what a file written on cuda:3 records
    text = json.dumps(header).encode()
    body = raw[:8] + struct.pack("<Q", len(text)) + text + raw[16 + size : -32]
    path.write_bytes(body + hashlib.sha256(body).digest())
    loaded = checkpoint.load(path, like={"params": params, "state": state})
    assert {leaf.device.type for leaf in tree_leaves(loaded)} == {"cpu"}
    fd.assert_trees_close(loaded["params"], params)
