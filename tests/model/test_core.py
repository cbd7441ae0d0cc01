"""Model against its nn.Module twin: init, outputs, BatchNorm state, dropout, state_dicts."""

import torch
import torchvision
from torch import nn

from functorch_diary import Model, extract
from functorch_diary.testing import assert_trees_close
from tests.helpers import SmallBNNet


def test_init_is_torch_init_under_the_same_seed():
    params, state = Model(SmallBNNet).init(seed=7)
    torch.manual_seed(7)
    reference = SmallBNNet()
    assert_trees_close(params, dict(reference.named_parameters()))
    assert_trees_close(state, dict(reference.named_buffers()))


def test_init_leaves_global_rng_alone_and_is_device_and_dtype_aware():
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    params, state = Model(SmallBNNet).init(seed=0, dtype=torch.float64)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(p.dtype == torch.float64 for p in params.values())
    assert state["features.1.num_batches_tracked"].dtype == torch.int64


def test_train_and_eval_outputs_and_batchnorm_state_match_module():
    model = Model(SmallBNNet)
    params, state = model.init(seed=0, dtype=torch.float64)
    module = SmallBNNet().double()
    module.load_state_dict(model.state_dict(params, state))
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    for _ in range(3):  # running statistics accumulate over calls
        out, state = model.apply(params, state, x, train=True)
        assert_trees_close(out, module.train()(x), rtol=1e-12, atol=1e-12)
    assert_trees_close(state, dict(module.named_buffers()), rtol=1e-12, atol=1e-12)
    out, eval_state = model.apply(params, state, x, train=False)
    assert_trees_close(out, module.eval()(x), rtol=1e-12, atol=1e-12)
    assert eval_state is state


def test_gradients_match_module():
    model = Model(SmallBNNet)
    params, state = model.init(seed=0, dtype=torch.float64)
    module = SmallBNNet().double()
    module.load_state_dict(model.state_dict(params, state))
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))

    def loss(p):
        return nn.functional.cross_entropy(model.apply(p, state, x, train=True)[0], y)

    grads = torch.func.grad(loss)(params)
    nn.functional.cross_entropy(module.train()(x), y).backward()
    assert_trees_close(grads, {n: p.grad for n, p in module.named_parameters()}, rtol=1e-10)


def test_dropout_mask_is_a_function_of_rng():
    model = Model(lambda: nn.Sequential(nn.Linear(6, 64), nn.Dropout(0.5)))
    params, state = model.init(seed=0)
    x = torch.randn(8, 6)
    a, _ = model.apply(params, state, x, train=True, rng=1)
    b, _ = model.apply(params, state, x, train=True, rng=1)
    c, _ = model.apply(params, state, x, train=True, rng=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a != 0).float().mean().item()
    assert 0.35 < kept < 0.65  # p=0.5 over 512 units
    dense, _ = model.apply(params, state, x, train=True, rng=1)
    nonzero = dense != 0
    full, _ = model.apply(params, state, x, train=False)
    assert_trees_close(dense[nonzero], full[nonzero] * 2.0, rtol=1e-6)


def test_dropout_in_training_without_rng_is_an_error():
    model = Model(lambda: nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    params, state = model.init()
    try:
        model.apply(params, state, torch.randn(1, 2), train=True)
    except ValueError as error:
        assert "F.dropout" in str(error) and "layer '1'" in str(error) and "rng=" in str(error)
    else:
        raise AssertionError("expected a ValueError asking for rng")


def test_torchvision_models_work_unchanged():
    net = torchvision.models.resnet18(num_classes=10).eval()
    model, params, state = Model.from_module(net)
    x = torch.randn(2, 3, 32, 32)
    assert_trees_close(model.apply(params, state, x)[0], net(x), rtol=1e-5, atol=1e-6)
    assert all(p.device.type == "cpu" for p in net.parameters())  # the module is untouched
    assert_trees_close(model.state_dict(params, state), net.state_dict())


def test_state_dict_round_trip_is_identity():
    model = Model(SmallBNNet)
    params, state = model.init(seed=3)
    state_dict = model.state_dict(params, state)
    assert list(state_dict) == list(SmallBNNet().state_dict())
    again = model.from_state_dict(state_dict)
    assert_trees_close(again, (params, state))


def test_extract_copies():
    module = nn.Linear(2, 2)
    params, _ = extract(module)
    params["weight"].add_(1.0)
    assert not torch.equal(params["weight"], module.weight)


def test_paths_of_selects_by_module_type():
    model = Model(SmallBNNet)
    assert model.paths_of(nn.Conv2d, nn.Linear) == ["features.0.weight", "head.weight"]
    assert model.paths_of(nn.BatchNorm2d, leaf="bias") == ["features.1.bias"]


class _TiedAutoencoder(nn.Module):
    """Decoder weight is the encoder's (one tensor, two names), as in tied autoencoders."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(6, 3, bias=False)
        self.decode = nn.Linear(3, 6, bias=False)
        self.decode.weight = self.encode.weight  # the same Parameter, shape (3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(self.encode(x)), self.decode.weight.t())


def test_tied_weights_are_one_param_and_gradients_sum_over_both_uses():
    torch.manual_seed(0)
    module = _TiedAutoencoder()
    model, params, state = Model.from_module(module)
    assert list(params) == ["encode.weight"]  # named_parameters() lists a tied tensor once
    x = torch.randn(4, 6)
    out, _ = model.apply(params, state, x)
    assert_trees_close(out, module(x), rtol=0.0, atol=0.0)

    module.zero_grad()
    module(x).square().sum().backward()
    grads = torch.func.grad(lambda p: model.apply(p, state, x)[0].square().sum())(params)
    assert_trees_close(grads["encode.weight"], module.encode.weight.grad, rtol=1e-6, atol=1e-7)


def test_tied_weights_stay_tied_through_init_from_a_factory_or_a_module():
    x = torch.randn(4, 6)
    model = Model(_TiedAutoencoder)
    params, state = model.init(seed=1)
    torch.manual_seed(1)
    module = _TiedAutoencoder()
    assert_trees_close(params, dict(module.named_parameters()), rtol=0.0, atol=0.0)
    assert_trees_close(model.apply(params, state, x)[0], module(x), rtol=0.0, atol=0.0)

    # from_module's init re-runs reset_parameters (so other draws), still one tied tensor.
    model, _, _ = Model.from_module(_TiedAutoencoder())
    params, state = model.init(seed=1)
    assert list(params) == ["encode.weight"]
    state_dict = model.state_dict(params, state)  # both names, as torch writes them
    assert list(state_dict) == list(module.state_dict())
    module.load_state_dict(state_dict)
    assert_trees_close(model.apply(params, state, x)[0], module(x), rtol=0.0, atol=0.0)
    assert_trees_close(model.from_state_dict(module.state_dict()), (params, state))
