"""Partial loading reports exactly what was missing, unexpected and mismatched (seed 004 s7)."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from functorch_diary import models as zoo
from functorch_diary.checkpoint import CheckpointError
from functorch_diary.model.checks import TreeMismatchError
from functorch_diary.model.pretrained import Mismatch, load_partial, load_state_dict_file
from functorch_diary.testing import assert_trees_close
from functorch_diary.tree import tree_clone


def _small_resnet_checkpoint(tmp_path, block=Bottleneck, num_classes=1000):
    """A torchvision ResNet checkpoint file, like seed 004's resnet152, but tiny."""
    torch.manual_seed(1)
    net = ResNet(block, [1, 1, 1, 1], num_classes=num_classes)
    path = tmp_path / "resnet.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_deeplab_on_a_resnet_checkpoint_reports_aspp_missing_and_fc_unexpected(tmp_path):
    path, sd = _small_resnet_checkpoint(tmp_path)
    model = zoo.deeplabv3(4, (1, 1, 1, 1), aspp_channels=8)
    params, state = model.init(seed=0)
    before = tree_clone((params, state))
    report = load_partial(model, path, params, state)

    aspp = [k for k in model.state_dict(params, state) if k.startswith("aspp.")]
    # 5 branch convs, 6 BatchNorms of 5 entries, the fusing conv, the classifier's weight and bias
    assert report.missing == aspp and len(aspp) == 5 + 6 * 5 + 1 + 2
    assert report.unexpected == ["fc.weight", "fc.bias"]
    assert report.mismatched == [] and report.skipped == []
    assert report.loaded == [k for k in sd if not k.startswith("fc.")]
    assert_trees_close({k: report.params.get(k, report.state.get(k)) for k in report.loaded},
                       {k: sd[k] for k in report.loaded})  # fmt: skip
    # What was not in the checkpoint keeps the given values; the inputs are untouched.
    new_aspp = {k: report.params[k] for k in model.param_specs if k.startswith("aspp.")}
    assert_trees_close(new_aspp, {k: params[k] for k in new_aspp})
    assert_trees_close((params, state), before)


def test_groupnorm_model_reports_the_batchnorm_buffers_as_unexpected(tmp_path):
    path, _ = _small_resnet_checkpoint(tmp_path)
    model = zoo.deeplabv3(4, (1, 1, 1, 1), aspp_channels=8, num_groups=4)
    report = load_partial(model, path, *model.init(seed=0))
    buffers = [k for k in torch.load(path, weights_only=True) if k.rsplit(".", 1)[1] in
               ("running_mean", "running_var", "num_batches_tracked")]  # fmt: skip
    # In the checkpoint's own order: the BatchNorm buffers where they sit, fc last.
    assert report.unexpected == [k for k in torch.load(path, weights_only=True) if k in
                                 {*buffers, "fc.weight", "fc.bias"}]  # fmt: skip
    assert len(report.unexpected) == len(buffers) + 2
    assert "bn1.weight" in report.loaded and "layer4.0.bn3.bias" in report.loaded


def test_imagenet_resnet18_into_cifar_resnet18_reports_shape_mismatches(tmp_path):
    path, sd = _small_resnet_checkpoint(tmp_path, block=BasicBlock, num_classes=1000)
    model = zoo.resnet18(10)  # CIFAR stem: conv1 is 3x3; fc has 10 outputs
    params, state = model.init(seed=0)
    report = load_partial(model, path, params, state)
    assert report.mismatched == [
        Mismatch("conv1.weight", (64, 3, 3, 3), (64, 3, 7, 7)),
        Mismatch("fc.weight", (10, 512), (1000, 512)),
        Mismatch("fc.bias", (10,), (1000,)),
    ]
    # The [1, 1, 1, 1] checkpoint lacks every second block of ResNet-18's [2, 2, 2, 2].
    second = re.compile(r"layer\d\.1\.")
    assert report.missing == [k for k in model.state_dict(params, state) if second.match(k)]
    assert report.unexpected == []
    for name in ("conv1.weight", "fc.weight", "fc.bias"):
        assert report.params[name] is params[name]
    assert torch.equal(report.params["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])


def test_selector_limits_what_is_loaded(tmp_path):
    path, sd = _small_resnet_checkpoint(tmp_path)
    model = zoo.deeplabv3(4, (1, 1, 1, 1), aspp_channels=8)
    params, state = model.init(seed=0)
    report = load_partial(model, path, params, state, selector=["layer1.*", "layer2.*"])
    assert report.loaded and all(k.startswith(("layer1.", "layer2.")) for k in report.loaded)
    assert "conv1.weight" in report.skipped and "layer4.0.conv3.weight" in report.skipped
    assert set(report.loaded) | set(report.skipped) == {k for k in sd if not k.startswith("fc.")}
    assert report.params["conv1.weight"] is params["conv1.weight"]


def test_loaded_tensors_take_the_dtype_of_the_leaves_they_replace(tmp_path):
    path, sd = _small_resnet_checkpoint(tmp_path)
    model = zoo.deeplabv3(4, (1, 1, 1, 1), aspp_channels=8)
    report = load_partial(model, path, *model.init(seed=0, dtype=torch.float64))
    assert report.params["conv1.weight"].dtype == torch.float64
    assert report.state["bn1.num_batches_tracked"].dtype == torch.int64
    assert_trees_close(report.params["conv1.weight"], sd["conv1.weight"].double())


def test_wrong_trees_are_rejected_by_name():
    model = zoo.unet(1, 2, base=4, depth=1)
    params, state = model.init(seed=0)
    del params["outc.bias"]
    with pytest.raises(TreeMismatchError, match=r"outc\.bias"):
        load_partial(model, model.state_dict(*model.init(seed=0)), params, state)


def test_state_dict_file_unwraps_seed_000s_checkpoint_format(tmp_path):
    net = nn.Linear(2, 3)
    torch.save({"model": net.state_dict(), "itr": 5}, tmp_path / "model.pth")
    assert_trees_close(load_state_dict_file(tmp_path / "model.pth"), dict(net.state_dict()))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_state_dict_file(tmp_path / "list.pth")


class _Payload:
    """Unpickling this would run code (it writes a file); weights_only must refuse it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_loading_never_executes_code(tmp_path):
    target = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"w": _Payload(target)}, handle, protocol=2)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pth"):
        load_state_dict_file(tmp_path / "evil.pth")
    assert not target.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_checkpoint_loads_onto_cpu_params(tmp_path):
    model = zoo.unet(1, 2, base=4, depth=1)
    sd = {k: v.cuda() for k, v in model.state_dict(*model.init(seed=1)).items()}
    torch.save(sd, tmp_path / "cuda.pth")
    report = load_partial(model, tmp_path / "cuda.pth", *model.init(seed=0))
    assert all(t.device.type == "cpu" for t in report.params.values())
    assert_trees_close(report.params["outc.weight"], sd["outc.weight"].cpu())
