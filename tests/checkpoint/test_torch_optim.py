"""torch.optim interop (seed 000 item 12): continue a run in the other world, for every
mapped optimiser and wrapper, and refusals that name what has no torch equivalent."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

import functorch_diary as fd
from functorch_diary import checkpoint, optim
from functorch_diary.checkpoint.format import CheckpointError
from tests.helpers import INTEROP_BATCH, interop_net, torch_mse_steps


def _two_groups(make):
    """A torch optimiser with the first layer and the second layer in separate groups."""
    return lambda net: make(
        [{"params": net[0].parameters(), "lr": 0.05}, {"params": net[2].parameters(), "lr": 0.01}]
    )


class Row(NamedTuple):
    """A torch optimiser on a net, our optimiser, the net's frozen leaves (a glob) or None,
    and whether the net has biases (Muon takes matrices only)."""

    torch: Callable[[nn.Module], torch.optim.Optimizer]
    ours: Callable[[], optim.GradientTransformation]
    frozen: str | None = None
    bias: bool = True
    export_rtol: float = 1e-10


# torch.optim's load_state_dict casts every state tensor but `step` to its param's dtype, so
# a torch NAdam that loads a state keeps mu_product in float64 where its uninterrupted run
# keeps float32: torch resumed from its own state_dict drifts as far (2e-9 here, see
# test_torch_s_own_resume_casts_nadam_s_mu_product), and the round trip's mu_product
# agrees to float32's resolution.
_AFTER_TORCH_LOAD = 2e-7


# The new optimisers' torch twins run foreach=True, the step ours follows (torch's default
# on the CPU is its single-tensor loop, which rounds differently).
OPTIMIZERS = {
    "sgd": Row(
        lambda n: torch.optim.SGD(
            n.parameters(), 0.1, momentum=0.9, nesterov=True, weight_decay=1e-2
        ),
        lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    ),
    "adam": Row(
        lambda n: torch.optim.Adam(n.parameters(), lr=0.05, betas=(0.8, 0.99), weight_decay=1e-2),
        lambda: optim.adam(0.05, betas=(0.8, 0.99), weight_decay=1e-2),
    ),
    "adamw_amsgrad": Row(
        lambda n: torch.optim.AdamW(n.parameters(), lr=0.05, amsgrad=True),
        lambda: optim.adamw(0.05, amsgrad=True),
    ),
    "rmsprop": Row(
        lambda n: torch.optim.RMSprop(n.parameters(), lr=0.01, momentum=0.5, centered=True),
        lambda: optim.rmsprop(0.01, momentum=0.5, centered=True),
    ),
    "adagrad": Row(
        lambda n: torch.optim.Adagrad(
            n.parameters(), lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1
        ),
        lambda: optim.adagrad(0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    ),
    # Wrappers: torch.optim has no skip counters, keeps accumulated gradients in .grad,
    # expresses groups as param_groups and frozen leaves as parameters without gradients.
    "apply_if_finite(adam)": Row(
        lambda n: torch.optim.Adam(n.parameters(), lr=0.05),
        lambda: optim.apply_if_finite(optim.adam(0.05)),
    ),
    "accumulate_gradients(adam)": Row(
        lambda n: torch.optim.Adam(n.parameters(), lr=0.05),
        lambda: optim.accumulate_gradients(optim.adam(0.05), every_k=1),
    ),
    "multi_transform(adam, adam)": Row(
        _two_groups(torch.optim.Adam),
        lambda: optim.multi_transform(
            {"body": optim.adam(0.05), "head": optim.adam(0.01)}, {"body": "0.*", "head": "2.*"}
        ),
    ),
    "freeze(sgd)": Row(
        lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
        lambda: optim.freeze(optim.sgd(0.1, momentum=0.9), "0.*"),
        "0.*",
    ),
    # torch's param_groups hold the injected values: each direction takes the other's
    # (ours start elsewhere, so only the import makes the first test pass).
    "inject_hyperparams(sgd)": Row(
        lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9, dampening=0.1),
        lambda: optim.inject_hyperparams(optim.sgd)(lr=0.05, momentum=0.5, dampening=0.2),
    ),
    "nadam": Row(
        lambda n: torch.optim.NAdam(
            n.parameters(), lr=0.05, weight_decay=0.1, momentum_decay=0.01, foreach=True
        ),
        lambda: optim.nadam(0.05, weight_decay=0.1, momentum_decay=0.01),
        export_rtol=_AFTER_TORCH_LOAD,
    ),
    "nadamw": Row(
        lambda n: torch.optim.NAdam(
            n.parameters(), lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, foreach=True
        ),
        lambda: optim.nadam(0.05, weight_decay=0.1, decoupled_weight_decay=True),
        export_rtol=_AFTER_TORCH_LOAD,
    ),
    "radam": Row(
        # betas[1] = 0.9: the rectified branch starts at step 6, inside these runs
        lambda n: torch.optim.RAdam(n.parameters(), lr=0.05, betas=(0.9, 0.9), foreach=True),
        lambda: optim.radam(0.05, betas=(0.9, 0.9)),
    ),
    "adamax": Row(
        lambda n: torch.optim.Adamax(n.parameters(), lr=0.05, weight_decay=1e-2, foreach=True),
        lambda: optim.adamax(0.05, weight_decay=1e-2),
    ),
    "adadelta": Row(
        lambda n: torch.optim.Adadelta(n.parameters(), lr=0.5, rho=0.8, foreach=True),
        lambda: optim.adadelta(0.5, rho=0.8),
    ),
    "asgd": Row(
        lambda n: torch.optim.ASGD(n.parameters(), lr=0.05, lambd=0.1, t0=2, foreach=True),
        lambda: optim.asgd(0.05, lambd=0.1, t0=2),
    ),
    "rprop": Row(
        lambda n: torch.optim.Rprop(n.parameters(), lr=0.05, foreach=True),
        lambda: optim.rprop(0.05),
    ),
    "adafactor": Row(
        lambda n: torch.optim.Adafactor(n.parameters(), lr=0.05, weight_decay=0.1, foreach=True),
        lambda: optim.adafactor(0.05, weight_decay=0.1),
    ),
    "muon": Row(
        lambda n: torch.optim.Muon(n.parameters(), lr=0.05),
        lambda: optim.muon(0.05),
        bias=False,
    ),
}


def _our_steps(model, opt, ts, n):
    step = fd.make_train_step(model, nn.functional.mse_loss, opt)
    for _ in range(n):
        ts, _ = step(ts, INTEROP_BATCH)
    return ts


def _freeze(net, frozen):
    for name, p in net.named_parameters():
        p.requires_grad_(frozen is None or not fnmatch.fnmatchcase(name, frozen))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_torch_optim_state_imports_and_training_continues(name):
    make_torch, make_ours, frozen, bias, _ = OPTIMIZERS[name]
    net = interop_net(bias)
    _freeze(net, frozen)
    topt = make_torch(net)
    torch_mse_steps(net, topt, 3)
    model, params, state = fd.Model.from_module(net)
    opt = make_ours()
    sd = topt.state_dict()
    opt_state = checkpoint.import_optimizer_state(sd, opt.init(params), params)
    ts = fd.TrainState(params, state, opt_state, torch.tensor(3), fd.prng.key(0))
    ts = _our_steps(model, opt, ts, 3)
    torch_mse_steps(net, topt, 3)
    fd.assert_trees_close(ts.params, dict(net.named_parameters()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_our_optimizer_state_exports_to_torch_optim(name):
    make_torch, make_ours, frozen, bias, rtol = OPTIMIZERS[name]
    net = interop_net(bias)
    model, params, state = fd.Model.from_module(net)
    opt = make_ours()
    ts = _our_steps(model, opt, fd.init_train_state(model, opt, params=params, state=state), 3)
    net.load_state_dict(model.state_dict(ts.params, ts.state))
    _freeze(net, frozen)
    topt = make_torch(net)
    exported = checkpoint.export_optimizer_state(
        ts.opt_state, ts.params, topt.state_dict()["param_groups"]
    )
    topt.load_state_dict(exported)
    torch_mse_steps(net, topt, 3)
    ts = _our_steps(model, opt, ts, 3)
    fd.assert_trees_close(ts.params, dict(net.named_parameters()), rtol=rtol, atol=1e-12)
    # and back: the round trip through torch's format loses nothing
    again = checkpoint.import_optimizer_state(topt.state_dict(), opt.init(params), params, step=6)
    fd.assert_trees_close(again, ts.opt_state, rtol=rtol, atol=1e-12)


def test_torch_s_own_resume_casts_nadam_s_mu_product():
    """Why the NAdam rows export to 2e-7: torch's own save and load moves it as far."""
    runs = []
    for resume in (False, True):
        net = interop_net()
        topt = OPTIMIZERS["nadam"].torch(net)
        torch_mse_steps(net, topt, 3)
        if resume:
            saved = topt.state_dict()
            topt = OPTIMIZERS["nadam"].torch(net)
            topt.load_state_dict(saved)
            assert topt.state[net[0].weight]["mu_product"].dtype == torch.float64
        torch_mse_steps(net, topt, 3)
        runs.append(dict(net.named_parameters()))
    with pytest.raises(AssertionError, match="exceeds"):
        fd.assert_trees_close(runs[1], runs[0], rtol=1e-10, atol=1e-12)
    fd.assert_trees_close(runs[1], runs[0], rtol=_AFTER_TORCH_LOAD, atol=1e-12)


def test_optimizer_state_mismatch_is_clear():
    net = interop_net()
    topt = torch.optim.Adam(net.parameters())
    torch_mse_steps(net, topt, 1)
    _, params, _ = fd.Model.from_module(net)
    good = dict(params)
    params["0.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(
        CheckpointError,
        match=r"\[0\]\['exp_avg'\] \(param '0\.weight'\): expected shape \(3, 3\), got \(5, 4\)",
    ):
        checkpoint.import_optimizer_state(topt.state_dict(), optim.adam().init(params), params)
    # Adam's moments into an SGD state: refused, not silently dropped.
    with pytest.raises(CheckpointError, match=r"\['exp_avg'\] \(param '0\.weight'\) has no place"):
        checkpoint.import_optimizer_state(topt.state_dict(), optim.sgd(0.1).init(good), good)


def test_accumulation_midway_is_refused_naming_the_wrapper():
    params = {"w": torch.ones(2)}
    opt = optim.accumulate_gradients(optim.adam(0.1), every_k=2)
    _, opt_state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    groups = torch.optim.Adam([torch.ones(2, requires_grad=True)]).state_dict()["param_groups"]
    with pytest.raises(CheckpointError, match=r"accumulate_gradients state at opt_state.*1 micro"):
        checkpoint.export_optimizer_state(opt_state, params, groups)
    _, opt_state = opt.update({"w": torch.ones(2)}, opt_state, params)
    exported = checkpoint.export_optimizer_state(opt_state, params, groups)
    assert exported["state"][0]["step"] == 1


class _UnknownState(NamedTuple):
    velocity: dict


def test_a_state_with_no_mapping_is_refused_with_its_name_and_path():
    params = {"w": torch.ones(2)}
    state = optim.apply_if_finite(optim.adam()).init(params)
    state = state._replace(inner=(*state.inner, _UnknownState({"w": torch.zeros(2)})))
    groups = [{"params": [0], "lr": 1e-3}]
    with pytest.raises(CheckpointError, match=r"_UnknownState at opt_state\.inner\[3\].*register"):
        checkpoint.export_optimizer_state(state, params, groups)
    with pytest.raises(CheckpointError, match=r"_UnknownState at opt_state\.inner\[3\]"):
        checkpoint.import_optimizer_state({"state": {}, "param_groups": groups}, state, params)


def test_masked_weight_decay_is_torch_param_groups_in_their_order():
    """``chain(masked(add_decayed_weights), adam)`` is torch's Adam with weight decay in
    the weights' group only; torch numbers parameters group by group, so ``params`` is
    given in that order."""
    net = interop_net()
    model, params, state = fd.Model.from_module(net)
    opt = optim.chain(optim.masked(optim.add_decayed_weights(0.1), "*.weight"), optim.adam(0.05))
    ts = _our_steps(model, opt, fd.init_train_state(model, opt, params=params, state=state), 3)
    net.load_state_dict(model.state_dict(ts.params, ts.state))
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    topt = torch.optim.Adam(
        [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
        lr=0.05,
    )
    order = sorted(ts.params, key=lambda n: not n.endswith("weight"))  # torch's numbering
    in_torch_order = {n: ts.params[n] for n in order}
    topt.load_state_dict(
        checkpoint.export_optimizer_state(
            ts.opt_state, in_torch_order, topt.state_dict()["param_groups"]
        )
    )
    torch_mse_steps(net, topt, 3)
    ts = _our_steps(model, opt, ts, 3)
    fd.assert_trees_close(ts.params, dict(net.named_parameters()), rtol=1e-10, atol=1e-12)
    back = checkpoint.import_optimizer_state(
        topt.state_dict(), opt.init(params), {n: params[n] for n in order}
    )
    fd.assert_trees_close(back, ts.opt_state, rtol=1e-10, atol=1e-12)


def test_learning_rates_of_groups_that_cannot_be_told_apart_are_refused():
    net = interop_net()
    _, params, _ = fd.Model.from_module(net)
    groups = _two_groups(torch.optim.SGD)(net).state_dict()
    opt = optim.multi_transform(
        {"body": optim.sgd(0.05), "head": optim.sgd(0.01)}, {"body": "0.*", "head": "2.*"}
    )
    # Plain SGD keeps no per-parameter tensors: which torch group is "body"?
    with pytest.raises(CheckpointError, match=r"opt_state\.body.*no per-parameter tensors"):
        checkpoint.import_optimizer_state(groups, opt.init(params), params)
    with pytest.raises(CheckpointError, match=r"different 'lr'.*no per-parameter tensors"):
        checkpoint.export_optimizer_state(opt.init(params), params, groups["param_groups"])
    # One optimiser over parameters in groups of different learning rates.
    topt = _two_groups(torch.optim.Adam)(net)
    torch_mse_steps(net, topt, 1)
    with pytest.raises(CheckpointError, match=r"different learning rates \[0\.01, 0\.05\]"):
        checkpoint.import_optimizer_state(topt.state_dict(), optim.adam().init(params), params)
