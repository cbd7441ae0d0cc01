"""Pure means pure: apply and the train and eval steps never mutate their inputs.

Every named optimiser's ``update`` is checked in ``test_optim_parity.py::test_update_is_pure``.
"""

import torch
from torch import nn
from torch.nn import functional as F

from functorch_diary import Model, init_train_state, make_eval_step, make_train_step, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone
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
