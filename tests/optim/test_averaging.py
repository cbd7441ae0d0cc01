"""Weight averaging against ``torch.optim.swa_utils``: ``AveragedModel`` (SWA and EMA, with and
without ``use_buffers``) update for update, ``SWALR`` step for step, ``update_bn`` on a BN net."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim import swa_utils

from functorch_diary import Model, extract, optim
from functorch_diary.optim import averaging
from functorch_diary.testing import assert_trees_close
from tests.helpers import SmallBNNet, dynamo_counts

# (id, torch AveragedModel keyword arguments, functional averaged_model keyword arguments)
CASES = [
    ("swa", {}, {}),
    (
        "swa-multi",
        {"multi_avg_fn": swa_utils.get_swa_multi_avg_fn()},
        {"multi_avg_fn": optim.swa_multi_avg_fn()},
    ),
    ("swa-avg-fn", {"avg_fn": swa_utils.get_swa_avg_fn()}, {"avg_fn": optim.swa_avg_fn()}),
    (
        "ema-multi",
        {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.9)},
        {"multi_avg_fn": optim.ema_multi_avg_fn(0.9)},
    ),
    ("ema-avg-fn", {"avg_fn": swa_utils.get_ema_avg_fn(0.8)}, {"avg_fn": optim.ema_avg_fn(0.8)}),
]


def _trained_copies(steps: int) -> tuple[nn.Module, list]:
    """``steps`` snapshots of a float64 BN net along an SGD run (params and BN stats move)."""
    torch.manual_seed(0)
    net = SmallBNNet().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    snapshots = []
    for _ in range(steps):
        x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        snapshots.append(extract(net))
    return net, snapshots


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# torch's swa multi_avg_fn raises on int buffers (use_buffers=True), and on CUDA the default
# mean is that function: tested on its own below.
PAIRS = [
    pytest.param(
        torch_kwargs,
        ours,
        use_buffers,
        device,
        id=f"{name}-{'buffers' if use_buffers else 'params'}-{device}",
        marks=[NEEDS_CUDA] if device == "cuda" else [],
    )
    for name, torch_kwargs, ours in CASES
    for use_buffers in (False, True)
    for device in ("cpu", "cuda")
    if not (use_buffers and (name == "swa-multi" or (name == "swa" and device == "cuda")))
]


@pytest.mark.parametrize(("torch_kwargs", "our_kwargs", "use_buffers", "device"), PAIRS)
def test_averaged_model_matches_torch_update_for_update(
    torch_kwargs, our_kwargs, use_buffers, device
):
    # On CUDA, the default mean is torch's foreach lerp by 1 / (n + 1), on the CPU
    # avg + (x - avg) / (n + 1): each side must take its device's path to agree.
    _, snapshots = _trained_copies(5)
    twin_net = SmallBNNet().double().to(device)
    twin = swa_utils.AveragedModel(twin_net, use_buffers=use_buffers, **torch_kwargs)
    averager = optim.averaged_model(use_buffers=use_buffers, **our_kwargs)
    average = averager.init(*extract(twin_net))
    for params, state in snapshots:
        params = {name: p.to(device) for name, p in params.items()}
        state = {name: b.to(device) for name, b in state.items()}
        twin_net.load_state_dict({**params, **state})
        twin.update_parameters(twin_net)
        average = averager.update(average, params, state)
        want_params, want_state = extract(twin.module)
        # Same kernels in the same order: bit for bit (float64).
        assert_trees_close(average.params, want_params)
        assert_trees_close(average.state, want_state)
        assert int(average.n_averaged) == int(twin.n_averaged)
    # The averages really moved away from the last model (the test could fail).
    last = snapshots[-1][0]["head.weight"].to(device)
    assert not torch.equal(average.params["head.weight"], last)


def test_swa_multi_on_int_buffers_is_the_truncated_mean_where_torch_raises():
    net = nn.BatchNorm1d(2).double()
    twin = swa_utils.AveragedModel(
        net, multi_avg_fn=swa_utils.get_swa_multi_avg_fn(), use_buffers=True
    )
    averager = optim.averaged_model(multi_avg_fn=optim.swa_multi_avg_fn(), use_buffers=True)
    average = averager.init(*extract(net))
    for tracked in (3, 6):
        net.num_batches_tracked.fill_(tracked)
        average = averager.update(average, *extract(net))
    assert int(average.state["num_batches_tracked"]) == 4  # 3 + (6 - 3) / 2, truncated
    twin.update_parameters(net)
    with pytest.raises(RuntimeError, match="Integer division with addcdiv"):
        twin.update_parameters(net)


def test_first_update_copies_and_inputs_are_untouched():
    averager = optim.averaged_model(multi_avg_fn=optim.ema_multi_avg_fn(0.5), use_buffers=True)
    params = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    state = {"n": torch.tensor(4)}
    average = averager.init({"w": torch.zeros(2)}, {"n": torch.tensor(0)})
    before = (average.params["w"].clone(), average.state["n"].clone())
    first = averager.update(average, params, state)
    assert torch.equal(first.params["w"], params["w"].detach()) and int(first.state["n"]) == 4
    second = averager.update(first, {"w": torch.tensor([3.0, 6.0])}, {"n": torch.tensor(7)})
    assert second.params["w"].tolist() == [2.0, 4.0]
    assert int(second.state["n"]) == 5  # int buffers: 4 * 0.5 + 7 * 0.5 truncated, as torch
    assert not second.params["w"].requires_grad and second.params["w"].grad_fn is None
    assert torch.equal(average.params["w"], before[0]) and torch.equal(
        average.state["n"], before[1]
    )
    assert first.params["w"].data_ptr() != params["w"].data_ptr()


def test_without_buffers_the_state_follows_the_model_as_a_copy():
    averager = optim.averaged_model()
    average = averager.init({"w": torch.zeros(1)}, {"b": torch.zeros(1)})
    state = {"b": torch.tensor([5.0])}
    for value in (1.0, 3.0):
        average = averager.update(average, {"w": torch.tensor([value])}, state)
    assert average.params["w"].tolist() == [2.0] and average.state["b"].tolist() == [5.0]
    assert average.state["b"].data_ptr() != state["b"].data_ptr()


def test_averaged_model_errors():
    with pytest.raises(ValueError, match="avg_fn or multi_avg_fn, not both"):
        optim.averaged_model(avg_fn=optim.swa_avg_fn(), multi_avg_fn=optim.swa_multi_avg_fn())
    averager = optim.averaged_model()
    average = averager.init({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"not in both.*params\.v"):
        averager.update(average, {"v": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"leaf 'params\.w' is \(2,\) torch.float32, the average's is \(1,\)"
    ):
        averager.update(average, {"w": torch.zeros(2)})


def test_private_torch_lists_are_pinned():
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    assert set(averaging.FOREACH_DEVICES) <= set(_get_foreach_kernels_supported_devices())
    assert {"cuda", "xpu"} <= set(averaging.FOREACH_DEVICES)
    batch_norm_base = torch.nn.modules.batchnorm._BatchNorm
    eager = [c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, batch_norm_base)]
    assert all(issubclass(c, averaging.BATCH_NORMS) or c.__name__.startswith("Lazy") for c in eager)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 5])
def test_swa_lr_matches_swalr_step_for_step(strategy, anneal_epochs):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.3)
    twin = swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    schedule = optim.swa_lr(0.3, swa_lr=0.05, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
    seen = []
    for step in range(9):
        got = float(schedule(torch.tensor(step)))
        assert got == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        seen.append(got)
        opt.step()
        twin.step()
    assert seen[-1] == pytest.approx(0.05, rel=1e-12)
    assert (seen[0] == 0.3) == (anneal_epochs > 0)


def test_swa_lr_errors():
    with pytest.raises(ValueError, match="anneal_strategy must be 'cos' or 'linear', got 'exp'"):
        optim.swa_lr(0.1, 0.01, anneal_strategy="exp")
    with pytest.raises(ValueError, match="anneal_epochs must be a non-negative integer, got -1"):
        optim.swa_lr(0.1, 0.01, anneal_epochs=-1)


def test_update_bn_matches_torch():
    net, _ = _trained_copies(2)
    model, params, state = Model.from_module(net)
    loader = [(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.zeros(4)) for _ in range(3)]
    before = {name: b.clone() for name, b in state.items()}
    new_state = optim.update_bn(model, params, state, loader)
    swa_utils.update_bn(loader, net)
    assert_trees_close(new_state, extract(net)[1], rtol=1e-12, atol=1e-14)
    assert int(new_state["features.1.num_batches_tracked"]) == 3
    assert_trees_close(state, before)  # the caller's state is untouched


def test_update_bn_without_batch_norm_returns_the_state():
    model = Model(lambda: nn.Linear(2, 1))
    params, state = model.init(0)
    assert optim.update_bn(model, params, state, [torch.ones(1, 2)]) is state


def test_update_compiles_to_one_graph_for_every_update():
    averager = optim.averaged_model(multi_avg_fn=optim.ema_multi_avg_fn(0.9), use_buffers=True)
    params, state = {"w": torch.randn(3, dtype=torch.float64)}, {"n": torch.tensor(2)}
    eager = compiled_average = averager.init(params, state)
    compiled = torch.compile(averager.update, fullgraph=True, backend="eager")
    with dynamo_counts() as seen:
        for i in range(4):  # n_averaged 0 (the copy), then averages: a tensor, no re-trace
            current = {"w": params["w"] * i}
            eager = averager.update(eager, current, state)
            compiled_average = compiled(compiled_average, current, state)
    assert seen == {"graphs": 1, "breaks": 0}
    assert_trees_close(compiled_average, eager)


@settings(max_examples=40, deadline=None)
@given(
    st.floats(1e-3, 1.0),
    st.floats(1e-4, 0.5),
    st.integers(0, 12),
    st.sampled_from(["cos", "linear"]),
)
def test_swa_lr_property_matches_swalr(lr, target, anneal_epochs, strategy):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    twin = swa_utils.SWALR(
        opt, swa_lr=target, anneal_epochs=anneal_epochs, anneal_strategy=strategy
    )
    schedule = optim.swa_lr(
        lr, swa_lr=target, anneal_epochs=anneal_epochs, anneal_strategy=strategy
    )
    for step in range(anneal_epochs + 3):
        assert float(schedule(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        twin.step()


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 0.999), st.booleans(), st.integers(1, 6), st.integers(0, 2**16))
def test_ema_property_matches_averaged_model(decay, multi, updates, seed):
    gen = torch.Generator().manual_seed(seed)
    net = nn.Linear(3, 2).double()
    if multi:
        kwargs = {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(decay)}
        ours = optim.averaged_model(multi_avg_fn=optim.ema_multi_avg_fn(decay))
    else:
        kwargs = {"avg_fn": swa_utils.get_ema_avg_fn(decay)}
        ours = optim.averaged_model(avg_fn=optim.ema_avg_fn(decay))
    twin = swa_utils.AveragedModel(net, **kwargs)
    average = ours.init(*extract(net))
    for _ in range(updates):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        twin.update_parameters(net)
        average = ours.update(average, *extract(net))
    assert_trees_close(average.params, extract(twin.module)[0])
