"""20 functional training steps equal 20 steps of the nn.Module + torch.optim loop.

The imperative side is the diaries' loop verbatim: ``zero_grad``, ``backward``, ``step``.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from functorch_diary import Model, init_train_state, make_train_step, models, optim
from functorch_diary.testing import assert_trees_close
from functorch_diary.training.step import apply_step, build_step
from tests.helpers import SmallBNNet

STEPS = 20

MODELS = {
    "lenet": (models.LeNet, (1, 28, 28)),
    "mlp": (lambda: models.MLP(64, (32,), 10), (1, 8, 8)),
    "bn_cnn": (SmallBNNet, (1, 8, 8)),
}
OPTIMIZERS = {
    "sgd_nesterov_wd": (
        lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "sgd_dampening": (
        lambda: optim.sgd(0.05, momentum=0.8, dampening=0.2),
        lambda p: torch.optim.SGD(p, 0.05, momentum=0.8, dampening=0.2),
    ),
    # The eager step runs torch's fused Adam kernel, so its twin is fused=True: the default
    # for-loop Adam rounds differently in the last bit, and float32 LeNet's max-pool ties
    # amplify that past the tolerance within 20 steps (1e-3 on a conv weight).
    "adam_wd": (
        lambda: optim.adam(1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3),
        lambda p: torch.optim.Adam(
            p, 1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3, fused=True
        ),
    ),
}
# float64 agrees to rounding; float32 drifts by accumulated rounding over 20 steps.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}


def _imperative_run(factory, make_torch_opt, batches, dtype, seed):
    torch.manual_seed(seed)
    module = factory().to(dtype).train()
    opt = make_torch_opt(module.parameters())
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return dict(module.named_parameters()), dict(module.named_buffers()), torch.stack(losses)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_training_matches_torch(model_name, opt_name, dtype):
    factory, shape = MODELS[model_name]
    make_opt, make_torch_opt = OPTIMIZERS[opt_name]
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(8, *shape, generator=generator, dtype=dtype),
            torch.randint(0, 10, (8,), generator=generator),
        )
        for _ in range(STEPS)
    ]
    model, optimizer = Model(factory), make_opt()
    ts = init_train_state(model, optimizer, seed=3, dtype=dtype)
    step = make_train_step(model, F.cross_entropy, optimizer, compile=False)
    losses = []
    for batch in batches:
        ts, metrics = step(ts, batch)
        losses.append(metrics["loss"])
    params, buffers, torch_losses = _imperative_run(factory, make_torch_opt, batches, dtype, seed=3)
    tolerance = TOLERANCES[dtype]
    assert_trees_close(ts.params, params, **tolerance)
    assert_trees_close(ts.state, buffers, **tolerance)
    assert_trees_close(torch.stack(losses), torch_losses, **tolerance)
    assert int(ts.step) == STEPS


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adam_is_bit_for_bit_torch_adam(dtype, foreach):
    """Not just close: the same roundings in the same order (torch's ``addcdiv``), so
    float32 runs stay identical even where max-pool ties amplify a last-bit difference."""
    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(40, 30, dtype=dtype, generator=generator)}
    torch_params = [nn.Parameter(params["w"].clone())]
    kwargs = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True)
    torch_opt = torch.optim.Adam(torch_params, 3e-3, foreach=foreach, **kwargs)
    opt = optim.adam(3e-3, **kwargs)
    opt_state = opt.init(params)
    for _ in range(30):
        grads = {"w": torch.randn(40, 30, dtype=dtype, generator=generator)}
        torch_params[0].grad = grads["w"].clone()
        torch_opt.step()
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
    assert_trees_close(params, {"w": torch_params[0].detach()})  # rtol = atol = 0


def test_a_loss_that_sees_the_params_and_a_dict_batch_matches_its_imperative_twin():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model, params, state = Model.from_module(net)

    def loss(params, outputs, batch):
        fit = F.cross_entropy(outputs, batch["label"])
        penalty = sum(p.square().sum() for p in params.values())
        return fit + 1e-2 * penalty, {"fit": fit, "penalty": penalty}

    opt = optim.adam(1e-2)
    ts = init_train_state(model, opt, params=params, state=state)
    step = make_train_step(
        model,
        loss,
        opt,
        compile=False,
        loss_sees="params, outputs, batch",
        has_aux=True,
        model_inputs=lambda batch: batch["image"],
    )
    torch_opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(5):
        batch = {"image": torch.randn(8, 5, dtype=torch.float64), "label": torch.arange(8) % 2}
        ts, metrics = step(ts, batch)
        torch_opt.zero_grad()
        expected, aux = loss(dict(net.named_parameters()), net(batch["image"]), batch)
        expected.backward()
        torch_opt.step()
        assert_trees_close(metrics, {"loss": expected, **aux}, rtol=1e-12, atol=1e-12), i
    assert_trees_close(ts.params, dict(net.named_parameters()), rtol=1e-10, atol=1e-12)


def test_an_unknown_loss_form_is_refused():
    with pytest.raises(ValueError, match="loss_sees must be one of"):
        make_train_step(
            Model(lambda: nn.Linear(1, 1)), F.mse_loss, optim.sgd(0.1), loss_sees="outputs"
        )


def test_build_step_hooks_wrap_the_differentiated_function_and_the_update():
    """The hooks the sharded step is made of, in one process: a wrapped objective whose
    loss is halved gives SGD half the gradient (lr 0.1 on g/2 is lr 0.05 on g, bit for
    bit), and ``apply`` receives the gradients and makes the next state."""
    model, gen = Model(lambda: nn.Linear(3, 1)), torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen))
    ts = init_train_state(model, optim.sgd(0.1), seed=0)

    def halve(objective):
        def halved(params, state, inputs, targets, key):
            loss, aux = objective(params, state, inputs, targets, key)
            return loss / 2, aux

        return halved

    seen = []

    def apply(ts, grads, new_state, optimizer, donate):
        seen.append(sorted(grads))
        return apply_step(ts, grads, new_state, optimizer, donate)

    step = build_step(model, F.mse_loss, optim.sgd(0.1), wrap_objective=halve, apply=apply)
    new, metrics = step(ts, batch)
    ref, ref_metrics = build_step(model, F.mse_loss, optim.sgd(0.05))(ts, batch)
    assert seen == [["bias", "weight"]]
    assert_trees_close(new, ref, rtol=0, atol=0)
    assert_trees_close(metrics["loss"], ref_metrics["loss"] / 2, rtol=0, atol=0)
