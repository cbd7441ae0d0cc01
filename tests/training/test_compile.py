"""The compiled training step: the same numbers as the eager step and the nn.Module loop,
one graph, one compilation.

Compiling with Inductor costs 10-30 s per step function on 2 CPU cores, so only the three
model tests below use it (numerics need the real code generator). The others compile with
``aot_eager`` (Dynamo + AOTAutograd's decomposed graph, no code generation) or ``eager``
(Dynamo's graph as captured). Compilations and graph breaks are counted with torch's own
counters (``torch._dynamo.utils.counters``): ``unique_graphs`` grows by one per compiled
graph, recompilations included; ``graph_break`` by one per break.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import functorch_diary as fd
from functorch_diary import models, optim
from functorch_diary.model import reparam
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone
from functorch_diary.zoo.models.dcgan import DCGANDiscriminator, dcgan_discriminator
from tests.helpers import dynamo_counts

STEPS = 10
# The bar for float32 after 10 steps, for compiled vs eager and eager vs nn.Module
# alike (the optimiser parity tests check eager vs torch.optim in float64 to ~1e-10). atol
# for entries near zero: Adam divides by sqrt(v), so a reordered float32 sum in a tiny
# gradient moves its update by up to ~1e-5 over 10 steps.
COMPILED = {"rtol": 1e-4, "atol": 1e-5}


def _batches(shape: tuple[int, ...], target, steps: int = STEPS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen), target(gen)) for _ in range(steps)]


def _classes(n: int):
    return lambda gen: torch.randint(0, 10, (n,), generator=gen)


def _real_or_fake(n: int):
    return lambda gen: torch.randint(0, 2, (n,), generator=gen).float()


def _train_module(module: nn.Module, torch_opt, loss_fn, batches, scheduler=None, clip=None):
    """The diaries' loop: zero_grad, backward, (clip), step, (scheduler.step)."""
    module.train()
    for inputs, targets in batches:
        torch_opt.zero_grad()
        loss_fn(module(inputs), targets).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(module.parameters(), clip)
        torch_opt.step()
        if scheduler is not None:
            scheduler.step()
    return dict(module.named_parameters()), dict(module.named_buffers())


def _run(step, ts, batches):
    for batch in batches:
        ts, _ = step(ts, batch)
    return ts


# --- the three model families, with Inductor --------------------------------------------


def _lenet():
    model = models.lenet()
    return model, models.LeNet, (8, 1, 28, 28), _classes(8), F.cross_entropy


def _batchnorm_cnn():
    make = lambda: DCGANDiscriminator(channels=1, width=8, image_size=16, norm="batch")  # noqa: E731
    model = dcgan_discriminator(channels=1, width=8, image_size=16, norm="batch")
    return model, make, (8, 1, 16, 16), _real_or_fake(8), F.binary_cross_entropy_with_logits


def _spectral_norm_discriminator():
    make_plain = lambda: DCGANDiscriminator(channels=1, width=8, image_size=16, norm="none")  # noqa: E731
    model = reparam.spectral_norm(
        dcgan_discriminator(channels=1, width=8, image_size=16, norm="none"), "net.*.weight"
    )

    def make():
        module = make_plain()
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                parametrizations.spectral_norm(sub, "weight")
        return module

    return model, make, (8, 1, 16, 16), _real_or_fake(8), F.binary_cross_entropy_with_logits


MODEL_CASES = {
    # (model factory, functional optimiser, its torch.optim twin)
    "lenet-adam": (
        _lenet,
        lambda: optim.adam(1e-3),
        lambda p: torch.optim.Adam(p, 1e-3, foreach=True),
    ),
    "batchnorm_cnn-sgd_momentum": (
        _batchnorm_cnn,
        lambda: optim.sgd(0.05, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.SGD(p, 0.05, momentum=0.9, weight_decay=5e-4, foreach=True),
    ),
    "spectral_norm_discriminator-rmsprop": (
        _spectral_norm_discriminator,
        lambda: optim.rmsprop(1e-3),
        lambda p: torch.optim.RMSprop(p, 1e-3, foreach=True),
    ),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_inductor_step_matches_eager_step_and_module_loop(case):
    make_case, make_opt, make_torch_opt = MODEL_CASES[case]
    model, make_module, shape, target, loss_fn = make_case()
    opt = make_opt()
    batches = _batches(shape, target)
    ts0 = fd.init_train_state(model, opt, seed=0)

    module = make_module()
    module.load_state_dict(model.state_dict(ts0.params, ts0.state))
    want_params, want_state = _train_module(
        module, make_torch_opt(module.parameters()), loss_fn, batches
    )

    eager = _run(fd.make_train_step(model, loss_fn, opt, compile=False), ts0, batches)

    step = fd.make_train_step(model, loss_fn, opt, compile=True)  # Inductor
    before = tree_clone(ts0)
    with dynamo_counts() as seen:
        compiled = _run(step, ts0, batches)

    assert seen == {"graphs": 1, "breaks": 0}
    assert_trees_close(ts0, before)  # the compiled step is pure too
    assert_trees_close(eager.params, {k: v.detach() for k, v in want_params.items()}, **COMPILED)
    assert_trees_close(eager.state, want_state, **COMPILED)
    assert_trees_close(compiled.params, eager.params, **COMPILED)
    assert_trees_close(compiled.state, eager.state, **COMPILED)
    assert_trees_close(compiled.opt_state, eager.opt_state, **COMPILED)
    assert int(compiled.step) == STEPS


# --- every named optimiser, a schedule and clipping, traced once (aot_eager) -------------

OPTIMIZERS = {
    "sgd": (
        lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "adam": (
        lambda: optim.adam(1e-2, weight_decay=1e-3, amsgrad=True),
        lambda p: torch.optim.Adam(p, 1e-2, weight_decay=1e-3, amsgrad=True, foreach=True),
    ),
    "adamw": (
        lambda: optim.adamw(1e-2),
        lambda p: torch.optim.AdamW(p, 1e-2, foreach=True),
    ),
    "rmsprop": (
        lambda: optim.rmsprop(1e-2, momentum=0.9, centered=True),
        lambda p: torch.optim.RMSprop(p, 1e-2, momentum=0.9, centered=True, foreach=True),
    ),
    "adagrad": (
        lambda: optim.adagrad(1e-1, lr_decay=1e-2),
        lambda p: torch.optim.Adagrad(p, 1e-1, lr_decay=1e-2, foreach=True),
    ),
}


def test_every_named_optimizer_is_covered():
    assert set(optim.optimizers.__all__) == set(OPTIMIZERS)


def _mlp_case():
    model = models.mlp(in_features=6, hidden=(16,), num_classes=10)
    return model, _batches((12, 6), _classes(12))


def _check_traced_once(model, opt, batches, want_params):
    ts0 = fd.init_train_state(model, opt, seed=0)
    eager = _run(fd.make_train_step(model, F.cross_entropy, opt, compile=False), ts0, batches)
    step = fd.make_train_step(
        model, F.cross_entropy, opt, compile=True, compile_backend="aot_eager"
    )
    with dynamo_counts() as seen:
        compiled = _run(step, ts0, batches)
    assert seen == {"graphs": 1, "breaks": 0}
    assert_trees_close(eager.params, want_params, **COMPILED)
    assert_trees_close(compiled.params, eager.params, **COMPILED)
    assert_trees_close(compiled.opt_state, eager.opt_state, **COMPILED)


def _module_twin(model):
    params, state = model.init(seed=0)
    module = models.MLP(in_features=6, hidden=(16,), num_classes=10)
    module.load_state_dict(model.state_dict(params, state))
    return module


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_step_compiles_once_and_matches_torch_optim(name):
    make_opt, make_torch_opt = OPTIMIZERS[name]
    model, batches = _mlp_case()
    module = _module_twin(model)
    want, _ = _train_module(module, make_torch_opt(module.parameters()), F.cross_entropy, batches)
    _check_traced_once(model, make_opt(), batches, {k: v.detach() for k, v in want.items()})


def test_schedule_and_clipping_compile_once_and_match_torch():
    model, batches = _mlp_case()
    schedule = optim.multistep_lr(0.1, milestones=[3, 6], gamma=0.5)
    opt = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(schedule, momentum=0.9))
    module = _module_twin(model)
    torch_opt = torch.optim.SGD(module.parameters(), 0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(torch_opt, milestones=[3, 6], gamma=0.5)
    want, _ = _train_module(module, torch_opt, F.cross_entropy, batches, scheduler, clip=0.5)
    _check_traced_once(model, opt, batches, {k: v.detach() for k, v in want.items()})


# --- the eager step's gradient path ------------------------------------------------------


def test_eager_step_gradients_are_grad_and_value_s_bit_for_bit():
    # Eagerly the step takes plain autograd (faster than torch.func's create_graph=True).
    model, batches = _mlp_case()
    opt = optim.sgd(0.1, momentum=0.9)
    ts = fd.init_train_state(model, opt)
    inputs, targets = batches[0]

    def loss_fn(params):
        return F.cross_entropy(model.apply(params, ts.state, inputs, train=True)[0], targets)

    grads, loss = torch.func.grad_and_value(loss_fn)(ts.params)
    params, opt_state = optim.apply_gradients(opt, grads, ts.opt_state, ts.params)
    new_ts, metrics = fd.make_train_step(model, F.cross_entropy, opt)(ts, (inputs, targets))
    assert_trees_close(
        (new_ts.params, new_ts.opt_state, metrics["loss"]), (params, opt_state, loss)
    )
    assert not any(leaf.requires_grad for leaf in fd.tree.tree_leaves(new_ts))


def test_step_is_differentiable_inside_torch_func_grad():
    # Inside a torch.func transform (here: the gradient through one SGD step, as MAML takes
    # it) the step keeps grad_and_value, since autograd on detached copies would cut it.
    model, batches = _mlp_case()
    (x, y), (x2, y2) = batches[:2]
    lr, opt = 0.5, optim.sgd(0.5)
    step = fd.make_train_step(model, F.cross_entropy, opt)
    params, state = model.init(seed=0)

    def loss_at(p, inputs, targets):
        return F.cross_entropy(model.apply(p, state, inputs)[0], targets)

    def after_step(p):
        ts = fd.TrainState(p, state, opt.init(p), torch.zeros((), dtype=torch.int64), prng_key)
        return loss_at(step(ts, (x, y))[0].params, x2, y2)

    def by_hand(p):
        g = torch.func.grad(loss_at)(p, x, y)
        return loss_at({k: p[k] - lr * g[k] for k in p}, x2, y2)

    prng_key = fd.prng.key(0)
    got = torch.func.grad(after_step)(params)
    assert_trees_close(got, torch.func.grad(by_hand)(params), rtol=1e-5, atol=1e-7)
    assert any(bool(g.abs().max() > 0) for g in got.values())


# --- the policy: when to compile, how often, with which options --------------------------


def test_cpu_default_is_eager_and_compile_true_compiles_once():
    model = models.mlp(in_features=6, hidden=(8,), num_classes=10)
    opt = optim.sgd(0.1)
    ts = fd.init_train_state(model, opt)
    batch = _batches((4, 6), _classes(4), steps=1)[0]
    lazy = fd.make_train_step(model, F.cross_entropy, opt, compile_backend="eager")
    forced = fd.make_train_step(model, F.cross_entropy, opt, compile=True, compile_backend="eager")
    with dynamo_counts() as by_default:
        _run(lazy, ts, [batch] * 5)
    with dynamo_counts() as when_asked:
        _run(forced, ts, [batch] * 5)
    assert (by_default["graphs"], when_asked["graphs"]) == (0, 1)


def test_train_and_eval_steps_alternate_without_recompiling():
    model = models.lenet()
    opt = optim.sgd(0.1, momentum=0.9)
    ts = fd.init_train_state(model, opt)
    step = fd.make_train_step(model, F.cross_entropy, opt, compile=True, compile_backend="eager")
    evaluate = fd.make_eval_step(model, F.cross_entropy, compile=True, compile_backend="eager")
    eager_eval = fd.make_eval_step(model, F.cross_entropy, compile=False)
    batches = _batches((4, 1, 28, 28), _classes(4), steps=5)
    ts, _ = step(ts, batches[0])
    evaluate(ts, batches[0])  # one compilation each, and none below
    with dynamo_counts() as seen:
        for batch in batches[1:]:
            ts, _ = step(ts, batch)
            outputs, metrics = evaluate(ts, batch)
            assert_trees_close((outputs, metrics), eager_eval(ts, batch), **COMPILED)
    assert seen == {"graphs": 0, "breaks": 0}


def test_many_steps_in_one_process_each_compile_once():
    # Dynamo caches on the code object, and every step shares its code: without a private
    # copy the ninth step would hit the recompile limit (8) and fail under fullgraph=True.
    # (The suite as a whole builds many more compiled steps than that.)
    batch = _batches((4, 6), _classes(4), steps=1)[0]
    with dynamo_counts() as seen:
        for width in range(1, 10):
            model = models.mlp(in_features=6, hidden=(width,), num_classes=10)
            opt = optim.sgd(0.1)
            step = fd.make_train_step(
                model, F.cross_entropy, opt, compile=True, compile_backend="eager"
            )
            _run(step, fd.init_train_state(model, opt), [batch, batch])
    assert seen == {"graphs": 9, "breaks": 0}


def test_bf16_autocast_and_channels_last_compile_once_and_match_eager():
    model = dcgan_discriminator(channels=1, width=8, image_size=16, norm="batch")
    opt = optim.sgd(0.05, momentum=0.9)
    options = {"autocast_dtype": torch.bfloat16, "channels_last": True}
    batches = _batches((8, 1, 16, 16), _real_or_fake(8), steps=5)
    loss_fn = F.binary_cross_entropy_with_logits
    ts0 = fd.init_train_state(model, opt)
    step = fd.make_train_step(model, loss_fn, opt, compile=True, compile_backend="eager", **options)
    with dynamo_counts() as seen:
        compiled = _run(step, ts0, batches)
    eager = _run(fd.make_train_step(model, loss_fn, opt, compile=False, **options), ts0, batches)
    fp32 = _run(fd.make_train_step(model, loss_fn, opt, compile=False), ts0, batches)

    assert seen == {"graphs": 1, "breaks": 0}
    weight = compiled.params["net.0.weight"]
    assert weight.dtype == torch.float32
    assert weight.is_contiguous(memory_format=torch.channels_last)
    buffer = compiled.opt_state[1].trace["net.0.weight"]
    assert buffer.is_contiguous(memory_format=torch.channels_last)
    assert_trees_close(compiled.params, eager.params, **COMPILED)
    with pytest.raises(AssertionError):  # autocast did run in bf16
        assert_trees_close(compiled.params, fp32.params, rtol=1e-6)


def test_bad_options_are_errors_that_list_the_choices():
    model = models.lenet()
    with pytest.raises(ValueError, match="reduce-overhead"):
        fd.make_train_step(model, F.cross_entropy, optim.sgd(0.1), compile_mode="fast")
    with pytest.raises(ValueError, match="bfloat16"):
        fd.make_eval_step(model, autocast_dtype=torch.int8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_default_compiles_and_matches_cpu_eager(mode):
    model = models.resnet18(num_classes=10, cifar_stem=True)
    opt = optim.sgd(0.05, momentum=0.9, weight_decay=5e-4)
    batches = _batches((16, 3, 32, 32), _classes(16), steps=5)
    ts0 = fd.init_train_state(model, opt)
    want = _run(fd.make_train_step(model, F.cross_entropy, opt), ts0, batches)

    # compile=None: on by default because the params are on CUDA.
    step = fd.make_train_step(model, F.cross_entropy, opt, compile_mode=mode)
    ts = fd.init_train_state(model, opt, device="cuda")
    with dynamo_counts() as seen:
        ts = _run(step, ts, [(x.cuda(), y.cuda()) for x, y in batches])
    torch.cuda.synchronize()

    assert seen == {"graphs": 1, "breaks": 0}
    got = {k: v.cpu() for k, v in ts.params.items()}
    # cuDNN and Inductor reorder float32 sums; TF32 stays off (torch's default for matmul).
    assert_trees_close(got, want.params, rtol=1e-3, atol=1e-4)
