"""``Model.apply`` on array-likes: a message naming the input and the conversion, not
torch's ``conv2d() received an invalid combination of arguments``."""

import numpy as np
import pytest
import torch
from torch import nn

from functorch_diary.model.checks import TreeMismatchError
from functorch_diary.model.core import Model


@pytest.fixture
def conv():
    model = Model(lambda: nn.Conv2d(1, 2, 3))
    params, state = model.init(0)
    return model, params, state


def test_numpy_input_names_the_input_its_shape_and_the_fix(conv):
    model, params, state = conv
    x = np.zeros((1, 1, 5, 5), np.float32)
    with pytest.raises(TreeMismatchError, match=r"input 0: .*numpy array of shape \(1, 1, 5, 5\)"
                       r".*float32.*torch\.from_numpy\(x\)"):  # fmt: skip
        model.apply(params, state, x)


def test_list_of_numbers_names_the_input_and_the_fix(conv):
    model, params, state = conv
    with pytest.raises(TreeMismatchError, match=r"input 0: .*Python list.*torch\.tensor\(x"):
        model.apply(params, state, [[[[0.0] * 5] * 5]])


def test_a_list_of_tensors_is_left_to_the_forward():
    class Sum(nn.Module):
        def forward(self, xs):
            return sum(xs)

    model = Model(Sum)
    out, _ = model.apply(*model.init(0), [torch.ones(2), torch.ones(2)])
    assert torch.equal(out, torch.full((2,), 2.0))
