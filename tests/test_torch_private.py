"""The private torch APIs the package relies on (all in functorch_diary/_torch.py): each is
still there, and its public fallback, which the package takes when it is gone, is run too."""

import pytest
import torch
from torch.func import grad, vmap
from torch.nn.utils import parametrizations

from functorch_diary import _torch
from functorch_diary.testing import assert_trees_close


def test_the_functorch_interpreter_stack_is_still_readable():
    assert _torch.functorch_transform_active() is False, (
        "torch._C._functorch.peek_interpreter_stack is gone or changed: the eager step "
        "now always takes torch.func.grad_and_value (correct, ~25% slower on small nets)"
    )
    seen = []
    grad(lambda x: seen.append(_torch.functorch_transform_active()) or x.sum())(torch.ones(2))
    vmap(lambda x: seen.append(_torch.functorch_transform_active()) or x)(torch.ones(2, 1))
    assert seen == [True, True]


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_weight_norm_kernel_and_its_public_fallback_match_torch(dim):
    assert _torch.optional(torch, "_weight_norm") is not None, (
        "torch._weight_norm is gone: weight_norm now takes its public fallback"
    )
    lin = torch.nn.Linear(4, 3).double()
    parametrizations.weight_norm(lin, dim=None if dim == -1 else dim)
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    want = lin.weight.detach()
    assert_trees_close(_torch.weight_norm(v, g, dim).detach(), want)
    assert_trees_close(_torch.weight_norm(v, g, dim, private=False).detach(), want, rtol=1e-14)


def test_optional_names_a_missing_symbol_as_none():
    assert _torch.optional(torch, "_no_such_kernel") is None
