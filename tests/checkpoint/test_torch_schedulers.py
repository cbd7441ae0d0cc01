"""torch.optim.lr_scheduler interop: a scheduled run moves to and from torch mid-training
(the optimiser's state with it), and scheduler states that do not fit are refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler, swa_utils

import functorch_diary as fd
from functorch_diary import checkpoint, optim
from functorch_diary.checkpoint.format import CheckpointError
from tests.helpers import INTEROP_BATCH, interop_net, torch_mse_steps

# Schedules mid-run. name -> (torch optimiser and scheduler on a net, our optimiser, the
# values a loop sets in our state before the step at a count (torch's momentum cycling)).
_N, _M = 3, 4  # steps in the first world, then in the other: past restarts and phases
_TOTAL = _N + _M + 1
_PLATEAU_METRICS = [1.0, 0.9, 0.95, 0.92, 0.91, 0.8, 0.85, 0.86]  # counters matter


def _one_cycle_momentum(count):
    return {"momentum": float(optim.one_cycle_momentum(_TOTAL)(torch.tensor(count)))}


def _cyclic_beta1(count):
    beta1 = optim.cyclic_momentum(0.8, 0.9, step_size_up=2)(torch.tensor(count))
    return {"betas": (float(beta1), 0.999)}


def _halves(epoch: int) -> float:
    return 0.9 if epoch % 2 else 0.8


class Scheduled(NamedTuple):
    torch: Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]]
    ours: Callable[[], optim.GradientTransformation]
    set_before: Callable[[int], dict[str, Any]] | None = None
    on_plateau: bool = False  # reads _PLATEAU_METRICS once a step


def _with(make_opt, make_sched):
    def make(net):
        topt = make_opt(net)
        return topt, make_sched(topt)

    return make


SCHEDULED = {
    "cosine_annealing_warm_restarts(sgd)": Scheduled(
        _with(
            lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
            lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=0.01),
        ),
        lambda: optim.sgd(
            optim.cosine_annealing_warm_restarts(0.1, T_0=2, T_mult=2, eta_min=0.01), momentum=0.9
        ),
    ),
    "multistep_lr(sgd)": Scheduled(
        _with(
            lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
            lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 4, 4, 6], gamma=0.5),
        ),
        lambda: optim.sgd(optim.multistep_lr(0.1, [2, 4, 4, 6], gamma=0.5), momentum=0.9),
    ),
    "exponential_lr(adam)": Scheduled(
        _with(
            lambda n: torch.optim.Adam(n.parameters(), 0.05),
            lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),
        ),
        lambda: optim.adam(optim.exponential_lr(0.05, gamma=0.8)),
    ),
    "cosine_annealing_lr(sgd), past T_max": Scheduled(
        _with(
            lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
            lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=0.01),
        ),
        lambda: optim.sgd(optim.cosine_annealing_lr(0.1, T_max=5, eta_min=0.01), momentum=0.9),
    ),
    "linear_lr(adamw)": Scheduled(
        _with(
            lambda n: torch.optim.AdamW(n.parameters(), 0.05),
            lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
        ),
        lambda: optim.adamw(optim.linear_lr(0.05, start_factor=0.25, total_iters=4)),
    ),
    "polynomial_lr(adagrad)": Scheduled(
        _with(
            lambda n: torch.optim.Adagrad(n.parameters(), 0.1),
            lambda o: lr_scheduler.PolynomialLR(o, total_iters=5, power=2.0),
        ),
        lambda: optim.adagrad(optim.polynomial_lr(0.1, total_iters=5, power=2.0)),
    ),
    "constant_lr(sgd)": Scheduled(
        _with(
            lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
            lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
        ),
        lambda: optim.sgd(optim.constant_lr(0.1, factor=0.5, total_iters=4), momentum=0.9),
    ),
    "lambda_lr(rmsprop)": Scheduled(
        _with(
            lambda n: torch.optim.RMSprop(n.parameters(), 0.01),
            lambda o: lr_scheduler.LambdaLR(o, lambda epoch: 0.9**epoch),
        ),
        lambda: optim.rmsprop(optim.lambda_lr(0.01, lambda step: 0.9**step)),
    ),
    "step_lr(rmsprop)": Scheduled(
        _with(
            lambda n: torch.optim.RMSprop(n.parameters(), 0.01, momentum=0.5),
            lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        ),
        lambda: optim.rmsprop(optim.step_lr(0.01, step_size=2, gamma=0.5), momentum=0.5),
    ),
    "multiplicative_lr(adam)": Scheduled(
        _with(
            lambda n: torch.optim.Adam(n.parameters(), 0.05),
            lambda o: lr_scheduler.MultiplicativeLR(o, _halves),
        ),
        lambda: optim.adam(optim.multiplicative_lr(0.05, _halves, total_steps=_TOTAL)),
    ),
    "one_cycle_lr(sgd), cycling momentum": Scheduled(
        _with(
            lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
            lambda o: lr_scheduler.OneCycleLR(o, 0.1, total_steps=_TOTAL),
        ),
        lambda: optim.inject_hyperparams(optim.sgd)(
            lr=optim.one_cycle_lr(0.1, total_steps=_TOTAL), momentum=0.95
        ),
        _one_cycle_momentum,
    ),
    "cyclic_lr(adam), cycling beta1": Scheduled(
        _with(
            lambda n: torch.optim.Adam(n.parameters(), 0.05),
            lambda o: lr_scheduler.CyclicLR(
                o, 0.01, 0.05, step_size_up=2, base_momentum=0.8, max_momentum=0.9
            ),
        ),
        lambda: optim.inject_hyperparams(optim.adam)(
            lr=optim.cyclic_lr(0.01, 0.05, step_size_up=2), betas=(0.9, 0.999)
        ),
        _cyclic_beta1,
    ),
    "swa_lr(sgd)": Scheduled(
        _with(
            lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
            lambda o: swa_utils.SWALR(o, swa_lr=0.02, anneal_epochs=5),
        ),
        lambda: optim.sgd(optim.swa_lr(0.1, swa_lr=0.02, anneal_epochs=5), momentum=0.9),
    ),
    "reduce_lr_on_plateau(sgd)": Scheduled(
        _with(
            lambda n: torch.optim.SGD(n.parameters(), 0.1, momentum=0.9),
            lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, cooldown=1),
        ),
        lambda: optim.chain(
            optim.trace(0.9),
            optim.reduce_lr_on_plateau(0.1, factor=0.5, patience=0, cooldown=1),
        ),
        on_plateau=True,
    ),
}


def _torch_scheduled(net, topt, sched, start, n):
    for t in range(start, start + n):
        torch_mse_steps(net, topt, 1)
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            sched.step(_PLATEAU_METRICS[t])
        else:
            sched.step()


def _our_scheduled(model, opt, ts, case, start, n):
    """``n`` steps from step ``start``, each with the values torch's scheduler set for
    it, and after them the values for the next (as torch's scheduler.step() leaves)."""
    step = fd.make_train_step(model, nn.functional.mse_loss, opt)
    for t in range(start, start + n):
        ts, _ = step(ts, INTEROP_BATCH)
        opt_state = ts.opt_state
        if case.set_before is not None:
            opt_state = optim.set_hyperparams(opt_state, **case.set_before(t + 1))
        if case.on_plateau:
            opt_state = optim.report_metric(opt_state, _PLATEAU_METRICS[t])
        ts = ts._replace(opt_state=opt_state)
    return ts


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_a_scheduled_torch_run_continues_here(name):
    case = SCHEDULED[name]
    net = interop_net()
    topt, sched = case.torch(net)
    _torch_scheduled(net, topt, sched, 0, _N)
    model, params, state = fd.Model.from_module(net)
    opt = case.ours()
    # SGD keeps no step: a scheduler's last_epoch gives it, a plateau's counts metrics.
    opt_state = checkpoint.import_optimizer_state(
        topt.state_dict(),
        opt.init(params),
        params,
        scheduler=sched.state_dict(),
        step=_N if case.on_plateau else None,
    )
    ts = fd.TrainState(params, state, opt_state, torch.tensor(_N), fd.prng.key(0))
    ts = _our_scheduled(model, opt, ts, case, _N, _M)
    _torch_scheduled(net, topt, sched, _N, _M)
    fd.assert_trees_close(ts.params, dict(net.named_parameters()), rtol=1e-10, atol=1e-12)
    assert float(optim.current_lr(ts.opt_state)) == pytest.approx(
        topt.param_groups[0]["lr"], rel=1e-12
    )


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_a_scheduled_run_here_continues_in_torch(name):
    case = SCHEDULED[name]
    net = interop_net()
    model, params, state = fd.Model.from_module(net)
    opt = case.ours()
    ts = fd.init_train_state(model, opt, params=params, state=state)
    if case.set_before is not None:
        ts = ts._replace(opt_state=optim.set_hyperparams(ts.opt_state, **case.set_before(0)))
    ts = _our_scheduled(model, opt, ts, case, 0, _N)
    net.load_state_dict(model.state_dict(ts.params, ts.state))
    topt, sched = case.torch(net)
    exported = checkpoint.export_optimizer_state(
        ts.opt_state, ts.params, topt.state_dict()["param_groups"]
    )
    topt.load_state_dict(exported)
    sched.load_state_dict(
        checkpoint.export_scheduler_state(
            ts.opt_state, sched.state_dict(), exported["param_groups"]
        )
    )
    _torch_scheduled(net, topt, sched, _N, _M)
    ts = _our_scheduled(model, opt, ts, case, _N, _M)
    fd.assert_trees_close(ts.params, dict(net.named_parameters()), rtol=1e-10, atol=1e-12)
    # and back: torch's optimiser and scheduler state give ours again
    again = checkpoint.import_optimizer_state(
        topt.state_dict(), opt.init(params), params, scheduler=sched.state_dict(), step=_N + _M
    )
    fd.assert_trees_close(again, ts.opt_state, rtol=1e-10, atol=1e-12)


def test_scheduler_and_hyperparameter_states_that_do_not_fit_are_refused():
    net = interop_net()
    _, params, _ = fd.Model.from_module(net)
    plateau = optim.chain(optim.trace(0.9), optim.reduce_lr_on_plateau(0.1, factor=0.5))
    opt_state = plateau.init(params)
    topt = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9)
    other = lr_scheduler.ReduceLROnPlateau(topt, factor=0.1).state_dict()
    groups = topt.state_dict()["param_groups"]
    with pytest.raises(CheckpointError, match=r"factor=0\.1 \(stage: 0\.5\)"):
        checkpoint.export_scheduler_state(opt_state, other, groups)
    with pytest.raises(CheckpointError, match=r"factor=0\.1 \(stage: 0\.5\)"):
        checkpoint.import_optimizer_state(
            topt.state_dict(), opt_state, params, scheduler=other, step=0
        )
    sequential = lr_scheduler.SequentialLR(
        topt,
        [lr_scheduler.ConstantLR(topt), lr_scheduler.ExponentialLR(topt, 0.9)],
        milestones=[2],
    )
    sgd_state = optim.sgd(0.1, momentum=0.9).init(params)
    with pytest.raises(CheckpointError, match="SequentialLR or ChainedScheduler"):
        checkpoint.export_scheduler_state(sgd_state, sequential.state_dict(), groups)
    chained = lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(topt), lr_scheduler.ExponentialLR(topt, 0.9)]
    )
    with pytest.raises(CheckpointError, match="no 'last_epoch' \\(a ChainedScheduler"):
        checkpoint.import_optimizer_state(
            topt.state_dict(), sgd_state, params, scheduler=chained.state_dict()
        )
    # Adam's injected betas have no place in SGD's param groups.
    adam_state = optim.inject_hyperparams(optim.adam)(lr=0.1).init(params)
    with pytest.raises(CheckpointError, match=r"param group 0 has no 'betas'"):
        checkpoint.export_optimizer_state(adam_state, params, groups)
