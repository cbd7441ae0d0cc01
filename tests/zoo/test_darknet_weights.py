"""darknet .weights: a file written here from an nn.Module loads into an equal model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from functorch_diary.testing import assert_trees_close
from functorch_diary.zoo.darknet_weights import (
    DarknetHeader,
    load_darknet_weights,
    save_darknet_weights,
)
from functorch_diary.zoo.models import Darknet, darknet_from_cfg

TINY = (Path(__file__).parents[1] / "fixtures" / "tiny_yolov3.cfg").read_text()


def _trained_module(seed=0):
    """The tiny YOLOv3 module with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    module = Darknet(TINY)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


def _write_like_darknet(module, path, seen=12345):
    """darknet's save_weights, written out: header, then per conv [BN | bias], weights."""
    values = []
    for index, (block, layer) in enumerate(zip(module.blocks[1:], module.module_list, strict=True)):
        if block["type"] != "convolutional":
            continue
        conv = getattr(layer, f"conv_{index}")
        bn = getattr(layer, f"batch_norm_{index}", None)
        if bn is not None:
            values += [bn.bias, bn.weight, bn.running_mean, bn.running_var]
        else:
            values.append(conv.bias)
        values.append(conv.weight)
    flat = np.concatenate([v.detach().numpy().ravel() for v in values]).astype("<f4")
    path.write_bytes(
        np.array([0, 2, 5], "<i4").tobytes() + np.array([seen], "<i8").tobytes() + flat.tobytes()
    )


def test_round_trip_into_an_equal_model(tmp_path):
    module = _trained_module()
    _write_like_darknet(module, tmp_path / "tiny.weights")
    model = darknet_from_cfg(TINY)
    params, state, header = load_darknet_weights(model, tmp_path / "tiny.weights")
    assert header == DarknetHeader(0, 2, 5, 12345)
    init_params, init_state = model.init(seed=0)
    assert params.keys() == init_params.keys() and state.keys() == init_state.keys()
    assert_trees_close(params, dict(module.named_parameters()))
    assert_trees_close(state, {**dict(module.named_buffers()), **{
        k: torch.zeros((), dtype=torch.int64) for k in state if k.endswith("num_batches_tracked")
    }})  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_trees_close(model.apply(params, state, x)[0], module(x), rtol=1e-5, atol=1e-5)
    # Writing them back gives darknet's bytes exactly.
    save_darknet_weights(tmp_path / "again.weights", model, params, state, header)
    assert (tmp_path / "again.weights").read_bytes() == (tmp_path / "tiny.weights").read_bytes()


def test_old_header_with_int32_seen(tmp_path):
    model = darknet_from_cfg(TINY)
    params, state = model.init(seed=1)
    save_darknet_weights(tmp_path / "old.weights", model, params, state, DarknetHeader(0, 1, 0, 7))
    assert (tmp_path / "old.weights").read_bytes()[12:16] == (7).to_bytes(4, "little")
    loaded, _, header = load_darknet_weights(model, tmp_path / "old.weights")
    assert header.seen == 7 and header.size == 16
    assert_trees_close(loaded, params)


def test_errors_name_the_file_and_both_counts(tmp_path):
    model = darknet_from_cfg(TINY)
    _write_like_darknet(_trained_module(), tmp_path / "tiny.weights")
    data = (tmp_path / "tiny.weights").read_bytes()
    with pytest.raises(FileNotFoundError, match=r"missing\.weights not found"):
        load_darknet_weights(model, tmp_path / "missing.weights")
    (tmp_path / "cut.weights").write_bytes(data[:-400])
    with pytest.raises(ValueError, match=r"cut\.weights: .*need \d+ .*holds \d+: it ends inside "
                       r"module_list\.\d+\.conv_\d+\.weight \(a truncated file"):  # fmt: skip
        load_darknet_weights(model, tmp_path / "cut.weights")
    (tmp_path / "long.weights").write_bytes(data + bytes(12))
    with pytest.raises(ValueError, match=r"3 left over .*another cfg"):
        load_darknet_weights(model, tmp_path / "long.weights")
    (tmp_path / "odd.weights").write_bytes(data + bytes(2))
    with pytest.raises(ValueError, match="not whole float32 values"):
        load_darknet_weights(model, tmp_path / "odd.weights")
    (tmp_path / "head.weights").write_bytes(data[:14])
    with pytest.raises(ValueError, match="shorter than its 20-byte header"):
        load_darknet_weights(model, tmp_path / "head.weights")
    # The same file for a cfg whose first layer is wider: caught by the size.
    wider = darknet_from_cfg(TINY.replace("filters=8", "filters=12", 1))
    with pytest.raises(ValueError, match="another cfg"):
        load_darknet_weights(wider, tmp_path / "tiny.weights")


def test_writer_checks_the_tree(tmp_path):
    model = darknet_from_cfg(TINY)
    params, state = model.init(seed=0)
    with pytest.raises(KeyError, match=r"module_list\.0\.batch_norm_0\.running_mean"):
        save_darknet_weights(tmp_path / "w", model, params, {})
    bad = {**params, "module_list.0.conv_0.weight": torch.zeros(8, 3, 1, 1)}
    with pytest.raises(
        ValueError, match=r"conv_0\.weight: shape \(8, 3, 1, 1\), the cfg says \(8, 3, 3, 3\)"
    ):
        save_darknet_weights(tmp_path / "w", model, bad, state)
    with pytest.raises(TypeError, match="need a darknet_from_cfg model"):
        load_darknet_weights(type(model)(torch.nn.Identity), tmp_path / "w")
    assert not list(tmp_path.iterdir())  # nothing half-written
