"""Hypothesis fuzzing: the checkpoint loader on random trees, damaged and forged files,
and ``Model.apply`` / ``load(like=)`` on malformed params. Every failure is a clear
exception naming the path; nothing crashes, nothing loads wrong, inputs stay as given."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import functorch_diary as fd
from functorch_diary import checkpoint
from functorch_diary.checkpoint.format import CheckpointError
from functorch_diary.model.checks import TreeMismatchError
from functorch_diary.tree import tree_clone

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
          torch.uint8, torch.bool, torch.complex64]  # fmt: skip


class Pair(NamedTuple):
    first: object
    second: object


checkpoint.register_type(Pair)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10
    return values.to(dtype)


scalars = (
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.text(max_size=8) | st.floats()
)
keys = st.text(min_size=1, max_size=6) | st.integers(-5, 5)
trees = st.recursive(
    tensors() | scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(keys, children, max_size=3)
        | st.tuples(children, children).map(lambda t: Pair(*t))
    ),
    max_leaves=8,
)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor


def _same(actual, expected) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        # Compare the bytes: NaNs and -0.0 must come back exactly as they were saved.
        assert torch.equal(_bytes(actual), _bytes(expected))
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            _same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _same(a, e)
    elif isinstance(expected, float) and expected != expected:
        assert actual != actual
    else:
        assert actual == expected


@SETTINGS
@given(tree=trees)
def test_any_tree_round_trips_bit_for_bit(tmp_path, tree):
    path = tmp_path / "t.ckpt"
    before = tree_clone(tree)
    checkpoint.save(path, tree)
    _same(tree, before)
    _same(checkpoint.load(path), tree)


def _valid_file(tmp_path) -> bytes:
    path = tmp_path / "base.ckpt"
    model = fd.Model(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    ts = fd.init_train_state(model, fd.optim.adam(1e-3), seed=0)
    checkpoint.save(path, ts)
    return path.read_bytes()


@SETTINGS
@given(data=st.data())
def test_damaged_files_always_raise_checkpoint_error(tmp_path, data):
    raw = bytearray(_valid_file(tmp_path))
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if kind == "flip":
        positions = st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4, unique=True)
        for position in data.draw(positions):
            raw[position] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        start = data.draw(st.integers(0, len(raw) - 1))
        raw[start : start + 8] = data.draw(st.binary(min_size=0, max_size=16))
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


def _nodes(value, trail=()):
    """Every (container, key) position in a JSON value."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield value, key
            yield from _nodes(child, (*trail, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield value, index
            yield from _nodes(child, (*trail, index))


@SETTINGS
@given(data=st.data())
def test_forged_headers_with_valid_checksums_raise_only_checkpoint_error(tmp_path, data):
    """An attacker can write any header and a matching SHA-256: still no crash, no code."""
    raw = _valid_file(tmp_path)
    size = struct.unpack_from("<Q", raw, 8)[0]
    header = json.loads(raw[16 : 16 + size])
    positions = list(_nodes(header))
    for _ in range(data.draw(st.integers(1, 3))):
        container, key = data.draw(st.sampled_from(positions))
        container[key] = data.draw(json_values)
    text = json.dumps(header).encode()
    body = raw[:8] + struct.pack("<Q", len(text)) + text + raw[16 + size : -32]
    path = tmp_path / "forged.ckpt"
    path.write_bytes(body + hashlib.sha256(body).digest())
    with contextlib.suppress(CheckpointError):  # loading may succeed: a harmless edit
        checkpoint.load(path)


def _model():
    return fd.Model(
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    )


MUTATIONS = ["missing", "extra", "shape", "dtype", "device", "not_a_tensor"]


def _mutate(tree: dict, kind: str, key: str, data) -> tuple[dict, str]:
    """A malformed copy of ``tree`` and the key its error must name."""
    bad = dict(tree)
    if kind == "missing":
        del bad[key]
    elif kind == "extra":
        key = key + data.draw(st.sampled_from([".extra", "_typo", "x"]))
        bad[key] = torch.zeros(1)
    elif kind == "shape":
        bad[key] = torch.zeros(*tree[key].shape, data.draw(st.integers(1, 3)))
    elif kind == "dtype":
        new = torch.int32 if tree[key].is_floating_point() else torch.float16
        bad[key] = tree[key].to(new)
    elif kind == "device":
        bad[key] = tree[key].to("meta")
    else:
        bad[key] = data.draw(st.sampled_from([None, 1.5, [1.0], "w"]))
    return bad, key


@SETTINGS
@given(data=st.data())
def test_apply_with_malformed_params_or_state_names_the_path(data):
    model = _model()
    params, state = model.init(seed=0)
    x = torch.randn(2, 2, 4, 4)
    which = data.draw(st.sampled_from(["params", "state"]))
    tree = params if which == "params" else state
    key = data.draw(st.sampled_from(sorted(tree)))
    kind = data.draw(st.sampled_from(MUTATIONS))
    bad, named = _mutate(tree, kind, key, data)
    if kind == "device" and len(tree) == 1:
        return  # a single leaf on another device is a consistent tree, checked against inputs
    before = tree_clone((params, state, x))
    args = (bad, state) if which == "params" else (params, bad)
    with pytest.raises(TreeMismatchError) as info:
        model.apply(*args, x, train=data.draw(st.booleans()))
    assert repr(named) in str(info.value), str(info.value)
    fd.assert_trees_close((params, state, x), before)


@SETTINGS
@given(data=st.data())
def test_load_like_a_malformed_template_names_the_path(tmp_path, data):
    model = _model()
    params, state = model.init(seed=0)
    path = tmp_path / "ps.ckpt"
    checkpoint.save(path, {"params": params, "state": state})
    key = data.draw(st.sampled_from(sorted(params)))
    kind = data.draw(st.sampled_from(["missing", "extra", "shape", "dtype", "not_a_tensor"]))
    bad, named = _mutate(params, kind, key, data)
    like = {"params": bad, "state": state}
    before = tree_clone(like)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, like=like)
    message = str(info.value)
    assert f"params.{named}" in message or (kind in ("missing", "extra") and named in message), (
        message
    )
    _same(like, before)
