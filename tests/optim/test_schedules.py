"""Schedules against ``torch.optim.lr_scheduler``: the lr at each of 200 steps, the lr read
back from the optimiser state, and params after 50 steps of a real model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad
from torch.optim import lr_scheduler as sched

from functorch_diary import Model, optim
from functorch_diary.testing import assert_trees_close

BASE_LR = 0.1
F64 = {"rtol": 1e-10, "atol": 1e-12}

# (id, torch scheduler factory, functional schedule); each pair means the same thing.
CASES = [
    ("step", lambda o: sched.StepLR(o, step_size=7, gamma=0.5), optim.step_lr(BASE_LR, 7, 0.5)),
    (
        "multistep",  # seed 000's schedule; 80 twice decays twice, as in torch
        lambda o: sched.MultiStepLR(o, milestones=[30, 80, 80, 150], gamma=0.1),
        optim.multistep_lr(BASE_LR, milestones=[30, 80, 80, 150], gamma=0.1),
    ),
    (
        "lambda",
        lambda o: sched.LambdaLR(o, lr_lambda=lambda e: 1.0 / (1.0 + 0.05 * e)),
        optim.lambda_lr(BASE_LR, lambda e: 1.0 / (1.0 + 0.05 * e)),
    ),
    (
        "exponential",
        lambda o: sched.ExponentialLR(o, gamma=0.97),
        optim.exponential_lr(BASE_LR, 0.97),
    ),
    (
        "cosine",  # 200 steps run four half-periods: down, up, down, up
        lambda o: sched.CosineAnnealingLR(o, T_max=50, eta_min=1e-3),
        optim.cosine_annealing_lr(BASE_LR, T_max=50, eta_min=1e-3),
    ),
    (
        "linear_warmup",
        lambda o: sched.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=20),
        optim.linear_lr(BASE_LR, start_factor=0.1, end_factor=1.0, total_iters=20),
    ),
    (
        "poly",  # seed 004's PolyLr
        lambda o: sched.PolynomialLR(o, total_iters=150, power=0.9),
        optim.polynomial_lr(BASE_LR, total_iters=150, power=0.9),
    ),
    (
        "constant",
        lambda o: sched.ConstantLR(o, factor=0.5, total_iters=10),
        optim.constant_lr(BASE_LR, factor=0.5, total_iters=10),
    ),
    (
        "join_warmup_cosine",
        lambda o: sched.SequentialLR(
            o,
            [
                sched.LinearLR(o, start_factor=0.1, total_iters=10),
                sched.CosineAnnealingLR(o, T_max=190),
            ],
            milestones=[10],
        ),
        optim.join_schedules(
            [
                optim.linear_lr(BASE_LR, start_factor=0.1, total_iters=10),
                optim.cosine_annealing_lr(BASE_LR, 190),
            ],
            boundaries=[10],
        ),
    ),
]
IDS = [case[0] for case in CASES]


def _torch_lrs(make_scheduler, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.filterwarnings("ignore::UserWarning")  # SequentialLR's deprecation notes
@pytest.mark.parametrize(("name", "make_scheduler", "schedule"), CASES, ids=IDS)
def test_lr_at_each_of_200_steps_matches_lr_scheduler(name, make_scheduler, schedule):
    expected = torch.tensor(_torch_lrs(make_scheduler, 200), dtype=torch.float64)
    actual = torch.stack([schedule(torch.tensor(t)) for t in range(200)])
    assert_trees_close(actual, expected, **F64)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "make_scheduler", "schedule"), CASES, ids=IDS)
def test_current_lr_reads_like_param_groups_lr(name, make_scheduler, schedule):
    """Seed 003's ``optimizer.param_groups[0]['lr']``, read from the optimiser state."""
    expected = _torch_lrs(make_scheduler, 41)
    opt = optim.sgd(schedule, momentum=0.9)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    state = opt.init(params)
    for t in range(40):
        assert float(optim.current_lr(state)) == pytest.approx(expected[t], rel=1e-10, abs=1e-12)
        _, state = opt.update(params, state, params)
    assert float(optim.current_lr(state)) == pytest.approx(expected[40], rel=1e-10, abs=1e-12)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("path", ["update", "fused"])
@pytest.mark.parametrize(("name", "make_scheduler", "schedule"), CASES, ids=IDS)
def test_params_after_50_scheduled_steps_of_a_real_model(name, make_scheduler, schedule, path):
    """``path``: ``update`` + ``apply_updates``, or ``apply_gradients`` (what the train step
    calls: torch's fused SGD kernel, reading the scheduled lr of each step)."""
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(16, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=gen),
        )
        for _ in range(50)
    ]
    module = _mlp()
    model, params, _ = Model.from_module(module)
    torch_opt = torch.optim.SGD(module.parameters(), lr=BASE_LR, momentum=0.9, weight_decay=1e-3)
    scheduler = make_scheduler(torch_opt)
    for x, y in batches:
        torch_opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        torch_opt.step()
        scheduler.step()

    def loss(p, x, y):
        return nn.functional.cross_entropy(model.apply(p, {}, x)[0], y)

    opt = optim.sgd(schedule, momentum=0.9, weight_decay=1e-3)
    state = opt.init(params)
    for x, y in batches:
        grads = grad(loss)(params, x, y)
        if path == "fused":
            params, state = optim.apply_gradients(opt, grads, state, params)
        else:
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
    assert_trees_close(params, dict(module.named_parameters()), rtol=1e-10, atol=1e-10)
    assert float(optim.current_lr(state)) == pytest.approx(
        torch_opt.param_groups[0]["lr"], rel=1e-10
    )


def test_schedules_compile_as_one_graph_without_recompiling():
    """No Python branch on the step: one trace serves every step (fullgraph, no recompile)."""
    torch._dynamo.reset()
    schedules = [case[2] for case in CASES]

    def all_lrs(step):
        return torch.stack([schedule(step) for schedule in schedules])

    compiled = torch.compile(all_lrs, backend="eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in [0, 9, 10, 55, 150, 199]:
            step = torch.tensor(t)
            assert_trees_close(compiled(step), all_lrs(step))


def test_join_schedules_checks_its_boundaries():
    with pytest.raises(ValueError, match="one boundary fewer"):
        optim.join_schedules([optim.exponential_lr(0.1, 0.9)], boundaries=[3])
    with pytest.raises(ValueError, match="increase"):
        optim.join_schedules([optim.exponential_lr(0.1, 0.9)] * 3, boundaries=[5, 3])


def test_current_lr_without_a_learning_rate_is_a_clear_error():
    opt = optim.chain(optim.scale_by_adam())
    with pytest.raises(ValueError, match="no learning rate"):
        optim.current_lr(opt.init({"w": torch.zeros(1)}))


def test_current_lr_of_a_parameter_group():
    params = {"body.w": torch.zeros(1), "head.w": torch.zeros(1)}
    opt = optim.multi_transform(
        {"body": optim.sgd(optim.exponential_lr(0.01, 0.5)), "head": optim.sgd(0.1)},
        {"body": "body.*", "head": "head.*"},
    )
    state = opt.init(params)
    _, state = opt.update(params, state, params)
    assert float(optim.current_lr(state, group="body")) == 0.005
    assert float(optim.current_lr(state, group="head")) == 0.1
    with pytest.raises(ValueError, match="no parameter group 'tail'"):
        optim.current_lr(state, group="tail")


PYTHON_FLOAT_LAMBDAS = {
    "constant": lambda e: 0.3,
    "cosine": lambda e: 0.5 * (1 + math.cos(math.pi * e / 17)),
    "exp": lambda e: math.exp(-0.13 * e),
    "int_power": lambda e: 0.7 ** int(e),
    "int_inverse": lambda e: 1.0 / (1.0 + 0.05 * int(e)),
    "sqrt": lambda e: math.sqrt(1 + e) / 3,
}


@pytest.mark.parametrize("name", list(PYTHON_FLOAT_LAMBDAS))
def test_lambda_lr_keeps_python_float_precision_bit_for_bit(name):
    """LambdaLR computes ``base_lr * lr_lambda(epoch)`` in Python floats; a lambda of
    ``math.*``, ``int(e)`` and constants gives the same float64 here, to the bit."""
    lr_lambda = PYTHON_FLOAT_LAMBDAS[name]
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = sched.LambdaLR(torch_opt, lr_lambda)
    schedule = optim.lambda_lr(0.1, lr_lambda)
    for t in range(40):
        assert float(schedule(torch.tensor(t))) == torch_opt.param_groups[0]["lr"], t
        torch_opt.step()
        scheduler.step()
    assert float(optim.lambda_lr(0.1, lambda e: 0.3)(0)) == 0.1 * 0.3
