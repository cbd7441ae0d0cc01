"""state_dict round trips for every model, and torchvision's own weights giving its logits."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tv

from functorch_diary import models as zoo
from functorch_diary.model.checks import TreeMismatchError
from functorch_diary.model.pretrained import load_pretrained
from functorch_diary.testing import assert_trees_close

TINY_CFG = (Path(__file__).parents[1] / "fixtures" / "tiny_yolov3.cfg").read_text()

# (functional model, its imperative twin's factory), small where the size is a choice.
# ResNet-34/50 take the code path of ResNet-18 (Model.state_dict / from_state_dict over
# torchvision's module); their layouts are compared with torchvision's in
# test_models_parity.py.
MODELS = {
    "resnet18-cifar": (zoo.resnet18(10), partial(zoo.resnet_module, 18, 10, True)),
    "vgg16-bn": (
        zoo.vgg16(10, batch_norm=True, pool_size=1, hidden=16, width_divisor=8),
        partial(zoo.vgg_module, 16, 10, True, pool_size=1, hidden=16, width_divisor=8),
    ),
    "densenet-bc": (zoo.densenet_bc(), zoo.densenet_bc_module),
    "unet": (zoo.unet(3, 2, base=8), partial(zoo.UNet, 3, 2, 8)),
    "yolo_v1": (
        zoo.yolo_v1(5, image_size=128, width_divisor=8, hidden=32),
        partial(zoo.YoloV1, 5, 2, 128, 8, 32),
    ),
    "deeplabv3-gn-ws": (
        zoo.deeplabv3(4, (1, 1, 1, 1), num_groups=8, weight_std=True, aspp_channels=16),
        partial(
            zoo.DeepLabV3, layers=(1, 1, 1, 1), num_classes=4, num_groups=8, weight_std=True,
            aspp_channels=16,
        ),
    ),
    "darknet-tiny": (zoo.darknet_from_cfg(TINY_CFG), partial(zoo.Darknet, TINY_CFG)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip_is_identity(name):
    model, make_module = MODELS[name]
    params, state = model.init(seed=3)
    state = {k: v + 1 if v.is_floating_point() else v + 5 for k, v in state.items()}
    sd = model.state_dict(params, state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        module = make_module()
    # The same keys in the same order as the module's own state_dict: no renaming ...
    assert list(sd) == list(module.state_dict())
    # ... so the module loads it strictly, and hands back exactly the same tensors.
    module.load_state_dict(sd, strict=True)
    again = model.from_state_dict(module.state_dict())
    assert_trees_close(again, (params, state))
    assert_trees_close(model.state_dict(*again), sd)


def _perturbed(net: nn.Module) -> nn.Module:
    """Random BatchNorm statistics, so eval-mode logits depend on every buffer."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.num_batches_tracked.fill_(7)
    return net.eval()


def test_torchvision_resnet18_file_gives_torchvision_logits(tmp_path):
    torch.manual_seed(0)
    net = _perturbed(tv.resnet18(num_classes=1000))
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    model = zoo.resnet18(1000, cifar_stem=False)
    params, state = load_pretrained(model, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
    assert_trees_close(model.apply(params, state, x)[0], expected, rtol=1e-5, atol=1e-6)


def test_torchvision_densenet121_file_gives_torchvision_logits(tmp_path):
    torch.manual_seed(0)
    net = _perturbed(tv.densenet121())
    path = tmp_path / "densenet121.pth"
    torch.save(net.state_dict(), path)
    model = zoo.densenet121(1000)
    params, state = load_pretrained(model, path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
    assert_trees_close(model.apply(params, state, x)[0], expected, rtol=1e-5, atol=1e-6)


def test_torchvision_vgg16_state_dict_gives_torchvision_logits():
    torch.manual_seed(0)
    net = tv.vgg16(num_classes=10).eval()
    model = zoo.vgg16(10)
    params, state = load_pretrained(model, net.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
    assert_trees_close(model.apply(params, state, x)[0], expected, rtol=1e-5, atol=1e-6)


def test_load_pretrained_names_the_problem(tmp_path):
    model = zoo.resnet18(10)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained(model, tmp_path / "missing.pth")
    imagenet_sd = zoo.resnet18(1000, cifar_stem=False).state_dict(
        *zoo.resnet18(1000, cifar_stem=False).init(seed=0)
    )
    with pytest.raises(TreeMismatchError, match=r"conv1\.weight.*\(64, 3, 3, 3\).*\(64, 3, 7, 7\)"):
        load_pretrained(model, imagenet_sd)


def test_load_pretrained_moves_and_casts():
    model = zoo.unet(1, 2, base=4, depth=1)
    sd = model.state_dict(*model.init(seed=0))
    params, state = load_pretrained(model, sd, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in params.values())
    assert state["inc.double_conv.1.num_batches_tracked"].dtype == torch.int64
    assert_trees_close(params, {k: sd[k].double() for k in params})
