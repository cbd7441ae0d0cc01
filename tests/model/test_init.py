"""Initialisers equal torch.nn.init run by the diaries' module loops, and are pure."""

import math

import pytest
import torch
from torch import nn

from functorch_diary import Model
from functorch_diary.model import init
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone
from tests.helpers import SmallBNNet

MODEL = Model(lambda: nn.Sequential(SmallBNNet(), nn.Linear(10, 5)))
CASES = {
    "gaussian": (init.normal(0.0, 0.02), lambda w, g: nn.init.normal_(w, 0.0, 0.02, generator=g)),
    "xavier": (
        init.xavier_normal(math.sqrt(2)),
        lambda w, g: nn.init.xavier_normal_(w, math.sqrt(2), generator=g),
    ),
    "xavier_uniform": (init.xavier_uniform(), lambda w, g: nn.init.xavier_uniform_(w, generator=g)),
    "kaiming_in": (
        init.kaiming_normal(0, "fan_in"),
        lambda w, g: nn.init.kaiming_normal_(w, 0, "fan_in", generator=g),
    ),
    "kaiming_out_leaky": (
        init.kaiming_normal(0.2, "fan_out", "leaky_relu"),
        lambda w, g: nn.init.kaiming_normal_(w, 0.2, "fan_out", "leaky_relu", generator=g),
    ),
    "kaiming_uniform": (
        init.kaiming_uniform(),
        lambda w, g: nn.init.kaiming_uniform_(w, math.sqrt(5), generator=g),
    ),
    "orthogonal": (
        init.orthogonal(math.sqrt(2)),
        lambda w, g: nn.init.orthogonal_(w, math.sqrt(2), generator=g),
    ),
    "uniform": (init.uniform(-0.1, 0.1), lambda w, g: nn.init.uniform_(w, -0.1, 0.1, generator=g)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_weights_init_loop_of_seed_002(name):
    """seed 002's ``weights_init``: Conv/Linear weights drawn, biases set to 0, in module order."""
    functional_init, torch_init = CASES[name]
    params, _ = MODEL.init(seed=0)
    before = tree_clone(params)
    new = init.initialize(
        params,
        [
            (MODEL.paths_of(nn.Conv2d, nn.Linear), functional_init),
            (MODEL.paths_of(nn.Conv2d, nn.Linear, leaf="bias"), init.zeros()),
        ],
        seed=11,
    )
    assert_trees_close(params, before)  # pure

    torch.manual_seed(0)
    module = nn.Sequential(SmallBNNet(), nn.Linear(10, 5))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in module.modules():
            if type(m).__name__.startswith(("Conv", "Linear")):
                torch_init(m.weight, generator)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
    assert_trees_close(new, dict(module.named_parameters()))


def test_seed_000_bn_constant_init_and_untouched_leaves():
    params, _ = MODEL.init(seed=0)
    new = init.initialize(
        params, [(MODEL.paths_of(nn.BatchNorm2d), init.ones()), ("*features.1.bias", init.zeros())]
    )
    assert torch.equal(new["0.features.1.weight"], torch.ones(4))
    assert torch.equal(new["0.features.1.bias"], torch.zeros(4))
    assert new["1.weight"] is params["1.weight"]  # not selected: returned as it was


def test_initialisers_keep_dtype_and_draw_the_same_numbers_in_float64():
    params, _ = MODEL.init(seed=0, dtype=torch.float64)
    new = init.initialize(params, [("1.weight", init.normal(0, 1))], seed=5)
    assert new["1.weight"].dtype == torch.float64
    expected = nn.init.normal_(
        torch.empty(5, 10, dtype=torch.float64), 0, 1, generator=torch.Generator().manual_seed(5)
    )
    assert_trees_close(new["1.weight"], expected)
