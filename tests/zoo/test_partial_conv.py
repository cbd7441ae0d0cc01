"""The functional partial convolution against seed 002's ``PartialConv`` module."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad

from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone
from functorch_diary.zoo.partial_conv import PartialConv, partial_conv, partial_conv2d

F64 = {"rtol": 1e-10, "atol": 1e-12}


@settings(max_examples=30, deadline=None)
@given(
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    hole_fraction=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_partial_conv_matches_seed_module(
    c_in, c_out, k, stride, padding, dilation, bias, hole_fraction, seed
):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    twin = PartialConv(c_in, c_out, k, stride, padding, dilation, 1, bias).double()
    model = partial_conv(c_in, c_out, k, stride, padding, dilation, 1, bias)
    params = {n: p.detach().clone() for n, p in twin.named_parameters() if p.requires_grad}
    x = torch.randn(2, c_in, 6, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = (torch.rand(2, c_in, 6, 6, generator=gen) >= hole_fraction).double()
    before = tree_clone((params, x.detach(), mask))

    (out, new_mask), _ = model.apply(params, {}, x.detach(), mask)
    twin_out, twin_mask = twin(x, mask)
    assert_trees_close((out, new_mask), (twin_out.detach(), twin_mask), **F64)
    assert set(new_mask.unique().tolist()) <= {0.0, 1.0}

    # Gradients for the weights and for the input, through the renormalisation.
    named = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(twin_out.square().sum(), [*named.values(), x])
    expected = dict(zip([*named, "x"], grads, strict=True))

    def loss(params, x):
        (y, _), _ = model.apply(params, {}, x, mask)
        return y.square().sum()

    g_params, g_x = grad(loss, argnums=(0, 1))(params, x.detach())
    assert_trees_close({**g_params, "x": g_x}, expected, **F64)
    assert_trees_close((params, x.detach(), mask), before)  # nothing mutated


def test_holes_give_zero_output_and_zero_mask():
    x = torch.randn(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    out, new_mask = partial_conv2d(x, mask, torch.randn(2, 1, 3, 3), torch.randn(2), padding=1)
    assert torch.equal(out, torch.zeros(1, 2, 4, 4))
    assert torch.equal(new_mask, torch.zeros(1, 2, 4, 4))


def test_fully_valid_window_is_a_convolution_divided_by_the_window_size():
    # With no holes the seed divides by the window size: (conv(x) - b) / (k * k * C_in) + b.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(3, dtype=torch.float64, generator=gen)
    out, _ = partial_conv2d(x, torch.ones_like(x), w, b)
    plain = torch.nn.functional.conv2d(x, w, b)
    b4 = b.view(1, -1, 1, 1)
    assert_trees_close(out, (plain - b4) / 18 + b4, **F64)
