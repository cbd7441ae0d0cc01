"""Wrong params, state or inputs fail before any computation, naming the key and both values."""

import re

import pytest
import torch

from functorch_diary import TreeMismatchError, models, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone

MODEL = models.lenet()
PARAMS, STATE = MODEL.init(seed=0)
X = torch.randn(2, 1, 28, 28)


def _apply_expecting_error(params, state=STATE, x=X) -> str:
    before = tree_clone((params, state, x))
    with pytest.raises(TreeMismatchError) as info:
        MODEL.apply(params, state, x)
    assert_trees_close((params, state, x), before)  # nothing touched
    return str(info.value)


def test_missing_key_names_it_and_its_shape():
    params = {k: v for k, v in PARAMS.items() if k != "fc.4.weight"}
    message = _apply_expecting_error(params)
    assert "'fc.4.weight'" in message and "(10, 84)" in message and "float32" in message


def test_extra_key_names_it_and_suggests_the_right_one():
    params = dict(PARAMS, **{"fc.4.wieght": PARAMS["fc.4.weight"]})
    message = _apply_expecting_error(params)
    assert "'fc.4.wieght'" in message and "'fc.4.weight'" in message


def test_wrong_shape_names_both_shapes():
    params = dict(PARAMS, **{"conv.0.weight": torch.zeros(6, 3, 5, 5)})
    message = _apply_expecting_error(params)
    assert "'conv.0.weight'" in message and "(6, 1, 5, 5)" in message and "(6, 3, 5, 5)" in message


def test_wrong_dtype_names_both_dtypes():
    params = dict(PARAMS, **{"fc.0.bias": PARAMS["fc.0.bias"].double()})
    message = _apply_expecting_error(params)
    assert "'fc.0.bias'" in message and "torch.float32" in message and "torch.float64" in message


def test_leaf_on_another_device_names_both_devices():
    # 'meta' is a real second device on every machine, so this runs without a GPU.
    params = dict(PARAMS, **{"fc.2.weight": PARAMS["fc.2.weight"].to("meta")})
    message = _apply_expecting_error(params)
    assert "'fc.2.weight'" in message and "cpu" in message and "meta" in message


def test_input_dtype_and_device_are_checked():
    assert "input 0" in _apply_expecting_error(PARAMS, x=X.double())
    assert "meta" in _apply_expecting_error(PARAMS, x=X.to("meta"))


def test_non_tensor_leaf_and_non_dict_params():
    assert "expected a tensor" in _apply_expecting_error(dict(PARAMS, **{"fc.0.bias": [0.0]}))
    with pytest.raises(TreeMismatchError, match="must be a dict"):
        MODEL.apply(list(PARAMS.values()), STATE, X)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda g: {k: v for k, v in g.items() if k != "fc.4.bias"}, "missing 'fc.4.bias'"),
        (
            lambda g: dict(g, **{"fc.4.bias": torch.zeros(3)}),
            "grads['fc.4.bias']: expected shape (10,)",
        ),
        (
            # Broadcasting would run the step: it must not.
            lambda g: dict(g, **{"fc.4.bias": torch.zeros(1)}),
            "grads['fc.4.bias']: expected shape (10,), got (1,)",
        ),
        (
            # Type promotion would turn the param into float64: it must not.
            lambda g: dict(g, **{"fc.4.bias": torch.zeros(10, dtype=torch.float64)}),
            "grads['fc.4.bias']: expected dtype torch.float32",
        ),
    ],
    ids=["missing", "shape", "broadcastable", "dtype"],
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.sgd(0.1, momentum=0.9),
        lambda: optim.adam(1e-3),
        lambda: optim.rmsprop(1e-2),
        lambda: optim.adagrad(0.1),
    ],
    ids=["sgd", "adam", "rmsprop", "adagrad"],
)
def test_apply_gradients_names_the_bad_gradient_and_leaves_state_alone(make, change, expected):
    opt = make()
    opt_state = opt.init(PARAMS)
    grads = change({k: torch.ones_like(v) for k, v in PARAMS.items()})
    before = tree_clone((PARAMS, grads, opt_state))
    with pytest.raises(TreeMismatchError, match=re.escape(expected)):
        optim.apply_gradients(opt, grads, opt_state, PARAMS)
    assert_trees_close((PARAMS, grads, opt_state), before)
