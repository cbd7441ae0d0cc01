"""Hypothesis fuzzing: the checkpoint loader on random trees, damaged and forged files,
and ``Model.apply`` / ``load(like=)`` on malformed params. Every failure is a clear
exception naming the path; nothing crashes, nothing loads wrong, inputs stay as given."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
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

REPO = Path(__file__).resolve().parents[2]
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


# ---------------------------------------------------------------------------------------
# Structure-aware forgeries (issue 15): a forger writes any header with a matching digest.
# Each attack below is refused as a CheckpointError naming the file, quickly.


def _split(raw: bytes) -> tuple[dict, bytes]:
    size = struct.unpack_from("<Q", raw, 8)[0]
    return json.loads(raw[16 : 16 + size]), raw[16 + size : -32]


def _forge(path, header_text: str, data: bytes) -> None:
    text = header_text.encode()
    body = b"FDCKPT\x00\x01" + struct.pack("<Q", len(text)) + text + data
    path.write_bytes(body + hashlib.sha256(body).digest())


def _base_file(tmp_path) -> bytes:
    """Four float32 tensors of 16 elements (64 bytes each, contiguous) and metadata."""
    tree = {"a": torch.ones(16), "b": [torch.zeros(16), torch.full((4, 4), 2.0)], "n": 3}
    path = tmp_path / "base4.ckpt"
    checkpoint.save(path, {**tree, "c": torch.arange(16.0)}, metadata={"epoch": 1})
    return path.read_bytes()


def _tensor_nodes(node):
    if node.get("t") == "tensor":
        yield node
    for child in node.get("c", []):
        yield from _tensor_nodes(child)


WRONG_VALUES = [None, True, 1.5, "text", [1], {"k": 1}, 7]
ATTACKS = ["alias", "overlap", "reuse", "unused", "depth", "huge_int", "overflowing_shape",
           "bad_shape_entry", "field_type", "missing_or_extra_field", "out_of_bounds"]  # fmt: skip


def _attack(kind: str, header: dict, data) -> str:
    """Apply attack ``kind`` to ``header`` and return the new header's JSON text."""
    leaves = header["leaves"]
    nodes = list(_tensor_nodes(header["tree"]))
    j, k = data.draw(st.lists(st.integers(0, len(leaves) - 1), min_size=2, max_size=2, unique=True))
    if kind == "alias":  # k describes exactly j's bytes (the 1 MiB x 1024 bomb)
        leaves[k] = dict(leaves[j])
    elif kind == "overlap":
        leaves[k]["offset"] = leaves[j]["offset"] + data.draw(st.integers(0, 63))
    elif kind == "reuse":  # one tensor entry reached twice from the tree
        nodes[k]["i"] = nodes[j]["i"]
    elif kind == "unused":
        leaves.append({"dtype": "float32", "shape": [0], "offset": 0, "nbytes": 0})
    elif kind == "depth":
        levels = data.draw(st.integers(65, 300))
        wrapped = json.dumps(header["tree"])
        header["tree"] = "@TREE@"
        text = json.dumps(header)
        return text.replace('"@TREE@"', '{"t": "list", "c": [' * levels + wrapped + "]}" * levels)
    elif kind == "huge_int":
        digits = data.draw(st.integers(41, 6000))
        where = data.draw(st.sampled_from(["metadata", "offset", "int_leaf", "data_nbytes"]))
        text = json.dumps(header)
        number = "9" * digits
        if where == "metadata":
            return text.replace('"epoch": 1', f'"epoch": {number}')
        if where == "offset":
            return text.replace(f'"offset": {leaves[k]["offset"]}', f'"offset": {number}', 1)
        if where == "int_leaf":
            return text.replace('"v": 3', f'"v": {number}')
        return text.replace(f'"data_nbytes": {header["data_nbytes"]}', f'"data_nbytes": {number}')
    elif kind == "overflowing_shape":
        shape = data.draw(st.sampled_from([[0, 2**62, 2**62], [2**40, 2**40], [2**63], [2**61, 8]]))
        leaves[k]["shape"] = shape
        leaves[k]["nbytes"] = data.draw(st.sampled_from([0, 64, math.prod(shape) * 4]))
    elif kind == "bad_shape_entry":
        bad = data.draw(st.sampled_from([16.0, True, -16, "16", None, [16]]))
        leaves[k]["shape"] = [bad] if bad != -16 else [-16, -1]
    elif kind == "field_type":
        expected = {"format_version": int, "byteorder": str, "tree": dict, "leaves": list,
                    "data_nbytes": int, "metadata": dict}  # fmt: skip
        if data.draw(st.booleans()):
            field = data.draw(st.sampled_from(sorted(expected)))
            record, kind_ = header, expected[field]
        else:
            field = data.draw(st.sampled_from(["dtype", "shape", "offset", "nbytes"]))
            record, kind_ = leaves[k], {"dtype": str, "shape": list}.get(field, int)
        wrong = [v for v in WRONG_VALUES if not isinstance(v, kind_) or isinstance(v, bool)]
        record[field] = data.draw(st.sampled_from(wrong))
    elif kind == "missing_or_extra_field":
        record = data.draw(st.sampled_from([header, leaves[k]]))
        if data.draw(st.booleans()):
            del record[data.draw(st.sampled_from(sorted(record)))]
        else:
            record["unexpected"] = 1
    else:  # out_of_bounds
        leaves[k]["offset"] = header["data_nbytes"] - data.draw(st.integers(0, 63))
    return json.dumps(header)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_structured_forgeries_are_refused_quickly_naming_the_file(tmp_path, data):
    raw = _base_file(tmp_path)
    header, region = _split(raw)
    kind = data.draw(st.sampled_from(ATTACKS))
    path = tmp_path / "forged.ckpt"
    _forge(path, _attack(kind, header, data), region)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert time.perf_counter() - start < 1.0
    assert repr(str(path)) in str(info.value), (kind, str(info.value))
    # Each of these is refused before the tree is decoded, so read_metadata (which
    # promises a fully verified file) refuses it too.
    with pytest.raises(CheckpointError):
        checkpoint.read_metadata(path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("alias", r"tensors \d and \d overlap"),
        ("reuse", r"tensor \d appears twice in the tree \(aliasing is refused"),
        ("unused", r"tensors \[4\] are described but not in the tree"),
        ("depth", r"nests deeper than"),
        ("huge_int", r"an integer of \d+ digits \(at most 40\)"),
        ("overflowing_shape", r"overflows 63-bit sizes|do not fit the data region"),
        ("bad_shape_entry", r"must be at most 64 non-negative ints"),
        ("field_type", r"must be a|format version"),
        ("missing_or_extra_field", r"missing fields|format version"),
        ("out_of_bounds", r"do not fit the data region"),
    ],
)
def test_each_forgery_gets_the_message_that_names_its_problem(tmp_path, kind, message):
    @settings(max_examples=3, deadline=None, database=None)
    @given(data=st.data())
    def check(data):
        header, region = _split(_base_file(tmp_path))
        path = tmp_path / f"{kind}.ckpt"
        _forge(path, _attack(kind, header, data), region)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(path)

    check()


_MEASURE = """
import resource, sys, time
from functorch_diary import checkpoint
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        checkpoint.load(path)
        outcome = "loaded"
    except checkpoint.CheckpointError as exc:
        outcome = "refused: " + str(exc).replace(chr(10), " ")
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    print(grown * 1024, seconds, outcome)
"""


def _peak_growths(*paths) -> list[tuple[int, float, str]]:
    """For each file, loaded in turn by one fresh process (one import of torch, for
    speed): the bytes its peak RSS grew by, the seconds it took, and the outcome. The
    peak is a high-water mark, so give the files in increasing order of expected peak."""
    lines = subprocess.run(
        [sys.executable, "-c", _MEASURE, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    ).stdout.splitlines()
    return [(int(g), float(t), outcome) for g, t, outcome in (x.split(maxsplit=2) for x in lines)]


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_loading_memory_and_time_are_bounded_by_the_file(tmp_path):
    """The issue's bomb: 1024 entries over the same 1 MiB (+1028 MiB peak before). And a
    genuine 24 MiB checkpoint: peak growth within 2x the file plus 32 MiB."""
    one_mib = torch.zeros(1 << 18)  # float32: 1 MiB
    checkpoint.save(tmp_path / "one.ckpt", {"w": one_mib})
    header, region = _split((tmp_path / "one.ckpt").read_bytes())
    header["leaves"] = header["leaves"] * 1024
    header["tree"] = {"t": "list", "c": [{"t": "tensor", "i": i} for i in range(1024)]}
    bomb = tmp_path / "bomb.ckpt"
    _forge(bomb, json.dumps(header), region)
    genuine = tmp_path / "genuine.ckpt"
    checkpoint.save(genuine, {f"t{i}": torch.randn(1 << 21) for i in range(3)})
    slack = 32 << 20
    results = _peak_growths(bomb, genuine)
    for path, expected, (grown, seconds, outcome) in zip(
        (bomb, genuine), ("refused: ", "loaded"), results, strict=True
    ):
        size = path.stat().st_size
        assert outcome.startswith(expected), outcome
        assert grown <= 2 * size + slack, (path.name, grown, size)
        assert seconds < 5.0, (path.name, seconds)
