"""Every model of the zoo against its ``nn.Module`` twin: init, outputs, gradients, buffers.

For each model the twin module is built by its own factory under ``torch.manual_seed``;
the functional model must give the same initial params, the same outputs in training and
eval mode, the same gradients of a loss, and the same updated BatchNorm buffers, in
float64 to 1e-10. The inputs are small (8-64 pixels) so the whole file runs in seconds.

ResNet-34/50 and DenseNet-121 run at full size on 32x32 inputs (the smallest their
strides allow); their layouts are also compared with torchvision's below, and their
logits on torchvision's own state_dicts are checked in ``test_models_torchvision.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import grad
from torchvision import models as tv

from functorch_diary import Model, extract
from functorch_diary import models as zoo
from functorch_diary.cli.recipes import vision
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone, tree_flatten_with_paths

# atol covers float64 round-off on gradients that are almost zero (3e-12 seen with
# weight standardisation, whose reductions the two paths order differently).
RTOL, ATOL = 1e-10, 1e-10
TINY_CFG = (Path(__file__).parents[1] / "fixtures" / "tiny_yolov3.cfg").read_text()


def assert_identical(actual, expected) -> None:
    """Bitwise equality: a fast ``torch.equal`` pass, the shared helper's message on failure."""
    got, want = tree_flatten_with_paths(actual), tree_flatten_with_paths(expected)
    same = [p for p, _ in got] == [p for p, _ in want] and all(
        a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True)
    )
    if not same:
        assert_trees_close(actual, expected)
        raise AssertionError("trees differ")  # e.g. -0.0 vs 0.0, which equal() tells apart


def check_parity(
    model: Model, make_module: Callable[[], nn.Module], x: torch.Tensor, seed: int = 0
) -> None:
    """Assert ``model`` and the module ``make_module()`` builds compute the same things."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make_module()
    module = module.to(x.dtype)
    params, state = model.init(seed, dtype=x.dtype)
    # init(seed) is the module's own initialisation, to the bit.
    assert_identical((params, state), extract(module))
    before = tree_clone((params, state))
    with torch.no_grad():
        shape = module.eval()(x).shape  # in eval mode: the BatchNorm buffers stay put
    weights = torch.randn(shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    module.train()
    out_m = module(x)
    (out_m * weights).sum().backward()
    grads_m = {name: p.grad for name, p in module.named_parameters()}
    buffers_m = {name: b.detach().clone() for name, b in module.named_buffers()}

    def loss(p):
        out, new_state = model.apply(p, state, x, train=True, rng=0)
        return (out * weights).sum(), (out, new_state)

    grads_f, (out_f, state_f) = grad(loss, has_aux=True)(params)
    assert_trees_close(out_f, out_m.detach(), rtol=RTOL, atol=ATOL)
    assert_trees_close(grads_f, grads_m, rtol=RTOL, atol=ATOL)
    assert_trees_close(state_f, buffers_m, rtol=RTOL, atol=ATOL)

    module.eval()
    with torch.no_grad():
        eval_m = module(x)
    eval_f, same_state = model.apply(params, state_f, x, train=False)
    assert_trees_close(eval_f, eval_m, rtol=RTOL, atol=ATOL)
    assert same_state is state_f
    # Pure: nothing the functional side was given has changed.
    assert_identical((params, state), before)


def image(n: int, size: int, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size * 10 + channels)
    return torch.randn(n, channels, size, size, dtype=torch.float64, generator=generator)


CASES = {
    "resnet18-cifar": (zoo.resnet18(10), partial(zoo.resnet_module, 18, 10, True), image(2, 16)),
    "resnet18-imagenet": (
        zoo.resnet18(7, cifar_stem=False),
        partial(zoo.resnet_module, 18, 7, False),
        image(2, 32),
    ),
    "resnet34-cifar": (zoo.resnet34(10), partial(zoo.resnet_module, 34, 10, True), image(2, 8)),
    "resnet50-imagenet": (
        zoo.resnet50(10, cifar_stem=False),
        partial(zoo.resnet_module, 50, 10, False),
        image(2, 32),
    ),
    "densenet121": (zoo.densenet121(10), partial(zoo.densenet121_module, 10), image(2, 32)),
    "vgg16": (
        zoo.vgg16(10, pool_size=1, hidden=16, dropout=0.0, width_divisor=16),
        partial(zoo.vgg_module, 16, 10, pool_size=1, hidden=16, dropout=0.0, width_divisor=16),
        image(2, 32),
    ),
    "vgg16-bn": (
        zoo.vgg16(10, batch_norm=True, pool_size=2, hidden=16, dropout=0.0, width_divisor=16),
        partial(
            zoo.vgg_module, 16, 10, True, pool_size=2, hidden=16, dropout=0.0, width_divisor=16
        ),
        image(2, 32),
    ),
    "densenet-bc": (
        zoo.densenet_bc(16, 6, 10), partial(zoo.densenet_bc_module, 16, 6, 10), image(2, 16)
    ),
    "unet": (zoo.unet(3, 4, base=4, depth=2), partial(zoo.UNet, 3, 4, 4, 2), image(2, 16)),
    "yolo_v1": (
        zoo.yolo_v1(3, image_size=64, width_divisor=16, hidden=16, dropout=0.0),
        partial(zoo.YoloV1, 3, 2, 64, 16, 16, 0.0),
        image(2, 64),
    ),
    "deeplabv3": (
        zoo.deeplabv3(4, (1, 1, 1, 1), aspp_channels=8),
        partial(zoo.DeepLabV3, layers=(1, 1, 1, 1), num_classes=4, aspp_channels=8),
        image(2, 32),
    ),
    "deeplabv3-basic-gn-ws-undilated": (
        zoo.deeplabv3(
            3, (1, 1, 1, 1), block="basic", dilate_last=False, aspp_channels=8, num_groups=4,
            weight_std=True,
        ),
        partial(
            zoo.DeepLabV3, zoo.deeplab.BasicBlock, (1, 1, 1, 1), 3, dilate_last=False,
            aspp_channels=8, num_groups=4, weight_std=True,
        ),
        image(2, 64),
    ),
    # The vision recipes' variants: DeepLabv3+ (decoder) and YOLO v1 with a 1x1-conv head.
    "deeplabv3plus-recipe": (
        Model(partial(vision.SmallDeepLab, 4, 4, True, aspp_channels=8, low_channels=8)),
        partial(vision.SmallDeepLab, 4, 4, True, aspp_channels=8, low_channels=8),
        image(2, 32),
    ),
    "yolo_v1-conv-head": (
        vision.conv_head_yolo(num_classes=3, image_size=64, width_divisor=16, hidden=16,
                              dropout=0.0, total_stride=32),
        partial(vision.ConvHeadYolo, 3, 2, 64, 16, 16, 0.0, 32),
        image(2, 64),
    ),
    "darknet-tiny": (zoo.darknet_from_cfg(TINY_CFG), partial(zoo.Darknet, TINY_CFG), image(2, 32)),
    "dcgan-g-28": (
        zoo.dcgan_generator(8, 1, 16, 28), partial(zoo.DCGANGenerator, 8, 1, 16, 28),
        torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)),
    ),
    "dcgan-g-32": (
        zoo.dcgan_generator(8, 3, 16, 32), partial(zoo.DCGANGenerator, 8, 3, 16, 32),
        torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6)),
    ),
    "dcgan-d-28": (
        zoo.dcgan_discriminator(1, 16, 28), partial(zoo.DCGANDiscriminator, 1, 16, 28),
        image(3, 28, channels=1),
    ),
    "dcgan-d-32": (
        zoo.dcgan_discriminator(3, 16, 32), partial(zoo.DCGANDiscriminator, 3, 16, 32),
        image(3, 32),
    ),
    "lenet": (zoo.lenet(10), zoo.LeNet, image(2, 28, channels=1)),
    "mlp": (zoo.mlp(12, (8,), 3), partial(zoo.MLP, 12, (8,), 3), image(3, 2)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_functional_model_matches_module(name):
    model, make_module, x = CASES[name]
    check_parity(model, make_module, x)


def test_weight_standardisation_is_active():
    """WSConv2d really standardises: its output equals a plain conv on the standardised weight."""
    conv = zoo.WSConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    w = conv.weight
    standard = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
        (w - w.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
    )
    expected = nn.functional.conv2d(x, standard, conv.bias, padding=1)
    assert_trees_close(conv(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(conv(x), nn.functional.conv2d(x, w, conv.bias, padding=1), atol=1e-3)


def test_groupnorm_option_has_no_running_stats():
    model = zoo.deeplabv3(4, (1, 1, 1, 1), aspp_channels=8, num_groups=4)
    assert model.state_specs == {}
    assert "bn1.weight" in model.param_specs and isinstance(model.template.bn1, nn.GroupNorm)


def test_deeplab_dilates_only_the_last_stage():
    dilated = zoo.deeplabv3(4, (2, 1, 1, 2), aspp_channels=8).template
    assert dilated.layer4[0].conv2.stride == (1, 1) and dilated.layer4[1].conv2.dilation == (2, 2)
    assert dilated.layer3[0].conv2.stride == (2, 2)
    plain = zoo.deeplabv3(4, (1, 1, 1, 1), aspp_channels=8, dilate_last=False).template
    assert plain.layer4[0].conv2.stride == (2, 2)


@pytest.mark.parametrize(
    ("model", "reference"),
    [
        (zoo.resnet34(10, cifar_stem=False), partial(tv.resnet34, num_classes=10)),
        (zoo.resnet50(10, cifar_stem=False), partial(tv.resnet50, num_classes=10)),
        (zoo.densenet121(1000), tv.densenet121),
        (zoo.vgg16(10), partial(tv.vgg16, num_classes=10)),
        (zoo.vgg16(10, batch_norm=True), partial(tv.vgg16_bn, num_classes=10)),
        (zoo.vgg19(1000), tv.vgg19),
    ],
    ids=["resnet34", "resnet50", "densenet121", "vgg16", "vgg16_bn", "vgg19"],
)
def test_default_layouts_are_torchvisions(model, reference):
    """Same keys, order, shapes and dtypes as torchvision's own factory (on the meta device)."""
    with torch.device("meta"):
        net = reference()
    expected = {name: (tuple(t.shape), t.dtype) for name, t in net.state_dict().items()}
    specs = {**model.param_specs, **model.state_specs}
    assert {name: (tuple(s.shape), s.dtype) for name, s in specs.items()} == expected

    # The same module classes in the same order; Model swaps torch's dropout for keyed
    # dropout (explicit rng), so dropout layers are compared by position only.
    def classes(module):
        return [type(m).__name__ if "Dropout" not in type(m).__name__ else "Dropout"
                for m in module.modules()]  # fmt: skip

    assert classes(model.template) == classes(net)


def test_cifar_stem_changes_only_the_first_convolution():
    cifar, imagenet = zoo.resnet50(10), zoo.resnet50(10, cifar_stem=False)
    assert cifar.param_specs.keys() == imagenet.param_specs.keys()
    changed = [k for k in cifar.param_specs if cifar.param_specs[k] != imagenet.param_specs[k]]
    assert changed == ["conv1.weight"]
    assert tuple(cifar.param_specs["conv1.weight"].shape) == (64, 3, 3, 3)
    assert isinstance(cifar.template.maxpool, nn.Identity)
