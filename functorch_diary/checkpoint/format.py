"""Checkpoints of any pytree: safe to load, atomic to write, loadable on any device.

The diaries save with ``torch.save`` (a pickle: loading a file from elsewhere can run
code) straight over the previous file (a crash mid-write loses both), and seed 004 meets
``Attempting to deserialize object on CUDA device 3 but torch.cuda.device_count() is 2``.
Here a checkpoint is a small file format of our own, with no pickle anywhere::

    magic (8 bytes) | header length (8 bytes, LE) | header (JSON) | data | SHA-256 (32 bytes)

- The header records the tree's *structure* (dicts, lists, tuples, NamedTuples by name,
  ``None``), each tensor's dtype, shape and byte range, and the plain Python leaves
  (ints, floats, bools, strings). NamedTuple types are never imported from the name in
  the file: they are looked up among the classes already defined (``like=``, types
  passed to :func:`register_type`, and the NamedTuples of ``functorch_diary`` itself).
- The SHA-256 of everything before it detects truncation and corruption: a damaged file
  is a :class:`CheckpointError`, never a silently wrong tensor.
- :func:`save` writes a temporary file next to the target, ``fsync`` s it and renames it
  over the target (``os.replace`` is atomic), then ``fsync`` s the directory: a crash at
  any moment leaves either the old checkpoint or the new one, both complete.
- Tensors are stored as bytes with no device: :func:`load` puts them on the CPU, on
  ``device``, or where the ``like=`` tree's leaves are.

:func:`export_optimizer_state` and :func:`import_optimizer_state` convert the states of
``optim.sgd``, ``adam``, ``adamw``, ``rmsprop`` and ``adagrad`` to and from
``torch.optim``'s ``state_dict`` format; ``Model.state_dict``/``Model.from_state_dict``
do the same for the weights.

Example:
    >>> import os, tempfile, torch
    >>> from functorch_diary import checkpoint
    >>> tree = {"w": torch.arange(3.0), "step": 7, "opt": (torch.zeros(2), None)}
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> checkpoint.save(path, tree)
    >>> back = checkpoint.load(path)
    >>> back["w"], back["step"], back["opt"][1]
    (tensor([0., 1., 2.]), 7, None)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..tree import PyTree

__all__ = [
    "CheckpointError",
    "export_optimizer_state",
    "import_optimizer_state",
    "load",
    "load_torch_file",
    "read_metadata",
    "register_type",
    "save",
]

_MAGIC = b"FDCKPT\x00\x01"
_FORMAT_VERSION = 1
_DIGEST_SIZE = 32
_ALIGN = 64  # tensor data starts on 64-byte boundaries, so views of the file are aligned
_PREFIX = struct.Struct("<8sQ")

# Every dtype a checkpoint may hold, by the name written in the header. A name outside
# this table is refused: the header never chooses what code runs.
_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}

_REGISTRY: dict[str, type] = {}


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read: what is wrong, which file, what to do."""


def register_type(cls: type) -> type:
    """Allow NamedTuple ``cls`` in checkpoints loaded without ``like=``; returns ``cls``.

    The NamedTuples of ``functorch_diary`` (``TrainState``, the optimiser states) need no
    registration. Usable as a class decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise TypeError(f"register_type expects a NamedTuple class, got {cls!r}")
    _REGISTRY[_type_name(cls)] = cls
    return cls


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _resolve_namedtuple(name: str, fields: list[str], path: str) -> type:
    """The NamedTuple class called ``name``, from the registry or an imported
    ``functorch_diary`` module. Nothing is imported: a name that is not already defined
    is an error, so a crafted file cannot make us load a module."""
    cls = _REGISTRY.get(name)
    module_name, _, qualname = name.rpartition(".")
    if cls is None and module_name.split(".")[0] == "functorch_diary":
        module = sys.modules.get(module_name)
        candidate = getattr(module, qualname, None) if module is not None else None
        if isinstance(candidate, type) and issubclass(candidate, tuple):
            cls = candidate
    if cls is None or list(getattr(cls, "_fields", ())) != fields:
        found = "not a known NamedTuple" if cls is None else f"has fields {list(cls._fields)}"
        raise CheckpointError(
            f"at {path or '<root>'}: the checkpoint holds a {name} with fields {fields}, which is "
            f"{found}; pass like=<a tree of the same structure> to load(), or call "
            "checkpoint.register_type(YourNamedTuple) before loading"
        )
    return cls


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(node: Any, path: str, tensors: list[Tensor]) -> dict[str, Any]:
    """The JSON description of ``node``; tensor leaves are appended to ``tensors``."""
    if isinstance(node, Tensor):
        if node.layout != torch.strided or node.is_quantized:
            raise CheckpointError(f"at {path}: only dense tensors can be saved, got {node.layout}")
        if str(node.dtype).removeprefix("torch.") not in _DTYPES:
            raise CheckpointError(f"at {path}: dtype {node.dtype} cannot be saved")
        tensors.append(node)
        return {"t": "tensor", "i": len(tensors) - 1, "device": str(node.device)}
    if node is None:
        return {"t": "none"}
    if isinstance(node, bool):
        return {"t": "bool", "v": node}
    if isinstance(node, int):
        return {"t": "int", "v": node}
    if isinstance(node, float):
        # JSON has no inf/nan: write them as strings float() understands.
        return {"t": "float", "v": node if math.isfinite(node) else repr(node)}
    if isinstance(node, str):
        return {"t": "str", "v": node}
    if _is_namedtuple(node):
        fields = list(type(node)._fields)
        return {
            "t": "namedtuple",
            "name": _type_name(type(node)),
            "fields": fields,
            "c": [_encode(v, _join(path, f), tensors) for f, v in zip(fields, node, strict=True)],
        }
    if isinstance(node, (list, tuple)):
        kind = "list" if isinstance(node, list) else "tuple"
        return {"t": kind, "c": [_encode(v, _join(path, i), tensors) for i, v in enumerate(node)]}
    if isinstance(node, Mapping):
        for key in node:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CheckpointError(
                    f"at {path or '<root>'}: dict keys must be str or int, got {key!r}"
                )
        kind = "odict" if isinstance(node, OrderedDict) else "dict"
        return {
            "t": kind,
            "k": list(node.keys()),
            "c": [_encode(v, _join(path, k), tensors) for k, v in node.items()],
        }
    raise CheckpointError(
        f"at {path or '<root>'}: cannot save a {type(node).__name__}; a checkpoint holds tensors, "
        "None, bool, int, float, str, and dicts, lists, tuples and NamedTuples of them"
    )


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def save(
    path: str | os.PathLike[str], tree: PyTree, *, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write ``tree`` to ``path`` atomically: after a crash, ``path`` is the old file or the new.

    Args:
        path: the checkpoint file; its directory must exist.
        tree: any pytree of tensors (any device), ``None``, bools, ints, floats and strings
            in dicts, lists, tuples and NamedTuples, e.g. a ``TrainState``.
        metadata: JSON-serialisable extra information (read back by :func:`read_metadata`).

    Raises:
        CheckpointError: the tree holds something that cannot be saved (the path says where).
    """
    tensors: list[Tensor] = []
    structure = _encode(tree, "", tensors)
    leaves, chunks, offset = [], [], 0
    for tensor in tensors:
        data = _tensor_bytes(tensor)
        pad = -offset % _ALIGN
        chunks += [b"\x00" * pad, data]
        offset += pad
        leaves.append(
            {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": len(data),
            }
        )
        offset += len(data)
    try:
        text = json.dumps(
            {
                "format_version": _FORMAT_VERSION,
                "byteorder": sys.byteorder,
                "tree": structure,
                "leaves": leaves,
                "data_nbytes": offset,
                "metadata": dict(metadata or {}),
            }
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"metadata must be JSON-serialisable: {exc}") from exc
    header = text.encode("utf-8")
    digest = hashlib.sha256()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            for part in (_PREFIX.pack(_MAGIC, len(header)), header, *chunks):
                digest.update(part)
                file.write(part)
            file.write(digest.digest())
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temporary behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_verified(path: str | os.PathLike[str]) -> tuple[dict[str, Any], memoryview]:
    """Header and data region of ``path`` after checking magic, sizes and digest."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)!r}: {exc}") from exc
    name = os.fspath(path)
    if len(raw) < _PREFIX.size + _DIGEST_SIZE or raw[:8] != _MAGIC:
        what = "pickle (torch.save)" if raw[:1] == b"\x80" or raw[:2] == b"PK" else "unknown"
        raise CheckpointError(
            f"{name!r} is not a functorch-diary checkpoint (bad magic; looks like a {what} file). "
            "For a torch.save file of plain tensors (a state_dict) use "
            "checkpoint.load_torch_file, which refuses anything that would run code"
        )
    body, stored = raw[:-_DIGEST_SIZE], raw[-_DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != stored:
        raise CheckpointError(
            f"{name!r} is truncated or corrupted (checksum mismatch, {len(raw)} bytes); "
            "load an earlier checkpoint"
        )
    _, header_len = _PREFIX.unpack_from(raw)
    start = _PREFIX.size + header_len
    if start > len(body):
        raise CheckpointError(f"{name!r}: header length {header_len} exceeds the file size")
    try:
        header = json.loads(raw[_PREFIX.size : start].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name!r}: unreadable header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format_version") != _FORMAT_VERSION:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise CheckpointError(
            f"{name!r}: format version {version!r}, this functorch-diary reads {_FORMAT_VERSION}"
        )
    if header.get("byteorder") != sys.byteorder:
        raise CheckpointError(
            f"{name!r} was written on a {header.get('byteorder')}-endian machine; this one is "
            f"{sys.byteorder}-endian"
        )
    data = memoryview(raw)[start : len(body)]
    if header.get("data_nbytes") != len(data):
        raise CheckpointError(
            f"{name!r}: data region is {len(data)} bytes, header says {header.get('data_nbytes')}"
        )
    return header, data


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` given to :func:`save` (the file is fully verified first)."""
    header, _ = _read_verified(path)
    return dict(header.get("metadata", {}))


def _leaf_tensor(spec: Any, data: memoryview, index: int, name: str) -> Tensor:
    try:
        dtype = _DTYPES[spec["dtype"]]
        shape = [int(s) for s in spec["shape"]]
        offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{name!r}: malformed description of tensor {index}: {spec!r}"
        ) from exc
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (
        min(shape, default=0) < 0
        or numel * itemsize != nbytes
        or offset < 0
        or offset + nbytes > len(data)
    ):
        raise CheckpointError(f"{name!r}: tensor {index} ({spec!r}) does not fit the data region")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # clone: the tensor owns aligned, writable memory instead of a view of the file bytes.
    return (
        torch.frombuffer(bytearray(data[offset : offset + nbytes]), dtype=dtype)
        .reshape(shape)
        .clone()
    )


def _decode(
    node: Any, path: str, tensors: list[Tensor], like: Any, has_like: bool, name: str
) -> Any:
    where = path or "<root>"
    if not isinstance(node, dict) or "t" not in node:
        raise CheckpointError(f"{name!r}: malformed tree description at {where}")
    kind = node["t"]
    if has_like:
        _check_like_kind(kind, node, like, where)
    if kind == "tensor":
        index = node.get("i")
        if not isinstance(index, int) or not 0 <= index < len(tensors):
            raise CheckpointError(f"{name!r}: bad tensor index at {where}")
        return tensors[index]
    if kind == "none":
        return None
    if kind in ("bool", "int", "str"):
        value = node.get("v")
        expected = {"bool": bool, "int": int, "str": str}[kind]
        if type(value) is not expected:
            raise CheckpointError(f"{name!r}: bad {kind} value at {where}")
        return value
    if kind == "float":
        return float(node.get("v"))
    children = node.get("c")
    if not isinstance(children, list):
        raise CheckpointError(f"{name!r}: malformed {kind} at {where}")
    if kind in ("list", "tuple"):
        items = [
            _decode(c, _join(path, i), tensors, like[i] if has_like else None, has_like, name)
            for i, c in enumerate(children)
        ]
        return items if kind == "list" else tuple(items)
    if kind == "namedtuple":
        fields = node.get("fields")
        if not isinstance(fields, list) or len(fields) != len(children):
            raise CheckpointError(f"{name!r}: malformed NamedTuple at {where}")
        cls = type(like) if has_like else _resolve_namedtuple(str(node.get("name")), fields, path)
        values = [
            _decode(c, _join(path, f), tensors, like[i] if has_like else None, has_like, name)
            for i, (f, c) in enumerate(zip(fields, children, strict=True))
        ]
        return cls(*values)
    if kind in ("dict", "odict"):
        keys = node.get("k")
        if not isinstance(keys, list) or len(keys) != len(children):
            raise CheckpointError(f"{name!r}: malformed dict at {where}")
        out = OrderedDict() if kind == "odict" else {}
        for key, child in zip(keys, children, strict=True):
            out[key] = _decode(
                child, _join(path, key), tensors, like[key] if has_like else None, has_like, name
            )
        return out
    raise CheckpointError(f"{name!r}: unknown node type {kind!r} at {where}")


def _check_like_kind(kind: str, node: dict[str, Any], like: Any, where: str) -> None:
    """Raise when the stored node and the template node differ in kind, keys or fields."""

    def fail(expected: str, got: str) -> None:
        raise CheckpointError(
            f"at {where}: the checkpoint holds {got} but like= has {expected}; "
            "is this checkpoint from another model or optimiser?"
        )

    if kind == "tensor" and not isinstance(like, Tensor):
        fail(type(like).__name__, "a tensor")
    elif kind == "none" and like is not None:
        fail(type(like).__name__, "None")
    elif kind in ("bool", "int", "float", "str") and type(like).__name__ != kind:
        fail(type(like).__name__, f"a {kind}")
    elif kind == "namedtuple":
        if not _is_namedtuple(like):
            fail(type(like).__name__, f"a NamedTuple {node.get('name')}")
        if list(type(like)._fields) != node.get("fields"):
            fail(f"fields {list(type(like)._fields)}", f"fields {node.get('fields')}")
    elif kind in ("list", "tuple"):
        if not isinstance(like, (list, tuple)) or _is_namedtuple(like):
            fail(type(like).__name__, f"a {kind}")
        if len(like) != len(node.get("c", ())):
            fail(f"{len(like)} items", f"{len(node.get('c', ()))} items")
    elif kind in ("dict", "odict"):
        if not isinstance(like, Mapping):
            fail(type(like).__name__, "a dict")
        stored, wanted = list(node.get("k", ())), list(like.keys())
        if set(stored) != set(wanted):
            missing = sorted(map(str, set(wanted) - set(stored)))
            extra = sorted(map(str, set(stored) - set(wanted)))
            raise CheckpointError(
                f"at {where}: keys differ from like=: missing from the checkpoint {missing}, "
                f"not in like= {extra}"
            )


def load(
    path: str | os.PathLike[str],
    *,
    like: PyTree | None = None,
    device: torch.device | str | None = None,
) -> PyTree:
    """Read a checkpoint written by :func:`save`; no code from the file ever runs.

    Args:
        path: the checkpoint file.
        like: optional template tree (e.g. a fresh ``TrainState``). The checkpoint must
            have its structure, shapes and dtypes (else a :class:`CheckpointError` names the
            path); its NamedTuple classes are used, and tensors go to its leaves' devices.
        device: where every tensor goes (``"cpu"``, ``"cuda:0"``...). Default: like's
            leaf's device, else the CPU. The device a tensor was saved from never matters,
            so a checkpoint written on ``cuda:3`` loads on any machine.

    Returns:
        The tree, with fresh tensors that share no memory with each other.

    Raises:
        CheckpointError: the file is missing, not a checkpoint (e.g. a pickle), truncated,
            corrupted, or does not match ``like``.
    """
    name = os.fspath(path)
    header, data = _read_verified(path)
    specs = header.get("leaves")
    if not isinstance(specs, list):
        raise CheckpointError(f"{name!r}: malformed header (no tensor list)")
    try:
        tensors = [_leaf_tensor(spec, data, i, name) for i, spec in enumerate(specs)]
        tree = _decode(header.get("tree"), "", tensors, like, like is not None, name)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        # A header that passed the checksum but describes nothing we wrote: forged or
        # from an incompatible writer. Say so rather than leak an internal error.
        raise CheckpointError(f"{name!r}: malformed header ({type(exc).__name__}: {exc})") from exc
    if like is not None:
        _check_leaves_like(tree, like)
    return _place(tree, like, device)


def _check_leaves_like(tree: PyTree, like: PyTree) -> None:
    from ..tree import tree_flatten_with_paths

    for (path, got), (_, want) in zip(
        tree_flatten_with_paths(tree), tree_flatten_with_paths(like), strict=True
    ):
        if isinstance(got, Tensor) and (got.shape != want.shape or got.dtype != want.dtype):
            raise CheckpointError(
                f"at {path}: the checkpoint holds shape {tuple(got.shape)}, dtype {got.dtype}; "
                f"like= has shape {tuple(want.shape)}, dtype {want.dtype}"
            )


def _place(tree: PyTree, like: PyTree | None, device: torch.device | str | None) -> PyTree:
    from ..tree import tree_map

    if device is not None:
        return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)
    if like is None:
        return tree
    return tree_map(lambda t, w: t.to(w.device) if isinstance(t, Tensor) else t, tree, like)


def load_torch_file(path: str | os.PathLike[str], map_location: torch.device | str = "cpu") -> Any:
    """Read a ``torch.save`` file (e.g. a torchvision ``state_dict``) without running its code.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; a file
    that asks for anything else (the ``__reduce__`` trick of a malicious pickle) is
    refused before any of it runs. Tensors go to ``map_location`` (default the CPU),
    whatever device they were saved from.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, or asks to run code.
    """
    name = os.fspath(path)
    try:
        return torch.load(name, map_location=map_location, weights_only=True)
    except Exception as exc:
        kind = type(exc).__name__
        if "Unsupported global" in str(exc) or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"refused to load {name!r}: it asks to rebuild objects other than tensors and "
                f"plain containers, which could run code ({kind}: {str(exc).splitlines()[0]}). "
                "Only load such a file if you trust its author, with torch.load(weights_only=False)"
            ) from exc
        raise CheckpointError(f"cannot read {name!r} as a torch.save file ({kind}: {exc})") from exc


# ---------------------------------------------------------------------------------------
# torch.optim state_dict interoperability (seed 000 item 12).

# Our state field -> torch.optim's per-parameter state key. Stages not listed here hold
# no per-parameter tensors (EmptyState) or only the step / learning rate.
_TORCH_KEYS: dict[tuple[str, str], str] = {
    ("TraceState", "trace"): "momentum_buffer",
    ("ScaleByAdamState", "mu"): "exp_avg",
    ("ScaleByAdamState", "nu"): "exp_avg_sq",
    ("ScaleByAdamState", "nu_max"): "max_exp_avg_sq",
    ("ScaleByRmsState", "square_avg"): "square_avg",
    ("ScaleByRmsState", "grad_avg"): "grad_avg",
    ("ScaleByRssState", "sum_of_squares"): "sum",
}
_STAGES = {
    "EmptyState",
    "TraceState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleByLearningRateState",
}
# Optimisers whose torch twin keeps a per-parameter "step" (SGD keeps none).
_STEPPED = {"ScaleByAdamState", "ScaleByRmsState", "ScaleByRssState"}


def _stages(opt_state: Any) -> tuple[Any, ...]:
    chained = isinstance(opt_state, tuple) and not _is_namedtuple(opt_state)
    stages = opt_state if chained else (opt_state,)
    for stage in stages:
        if type(stage).__name__ not in _STAGES:
            raise CheckpointError(
                f"optimiser state stage {type(stage).__name__} has no torch.optim equivalent; "
                "export/import supports the states of optim.sgd, adam, adamw, rmsprop and adagrad"
            )
    return stages


def _count_of(stage: Any) -> Tensor | None:
    # Not getattr: every NamedTuple has a .count method. RMS and RSS states count only
    # when they hold the learning rate.
    return stage.count if "count" in stage._fields else None


def _steps_taken(stages: Sequence[Any]) -> int:
    for stage in stages:
        if type(stage).__name__ == "ScaleByLearningRateState":
            return int(stage.count)
    counts = [int(_count_of(stage)) for stage in stages if _count_of(stage) is not None]
    return max(counts, default=0)


def export_optimizer_state(
    opt_state: Any, params: Mapping[str, Tensor], param_groups: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Our optimiser state as a ``torch.optim`` ``state_dict`` (``optimizer.load_state_dict`` it).

    Supports the states of ``optim.sgd``, ``adam``, ``adamw``, ``rmsprop`` and ``adagrad``.

    Args:
        opt_state: the optimiser state.
        params: the params dict; torch numbers parameters in this order (the order of
            ``named_parameters()``, which is what ``Model.init`` gives).
        param_groups: the ``param_groups`` of the torch optimiser that will load the state,
            i.e. ``torch_optimizer.state_dict()["param_groups"]`` (hyperparameters live there).

    Returns:
        ``{"state": {index: {...}}, "param_groups": [...]}`` with copied tensors.

    Raises:
        CheckpointError: the state has a stage torch has no equivalent for, or the
            parameter counts differ.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> params = {"w": torch.ones(2)}
        >>> opt = optim.adam(0.1)
        >>> _, opt_state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
        >>> torch_opt = torch.optim.Adam([torch.ones(2, requires_grad=True)], lr=0.1)
        >>> sd = export_optimizer_state(opt_state, params, torch_opt.state_dict()["param_groups"])
        >>> torch_opt.load_state_dict(sd)
        >>> torch_opt.state_dict()["state"][0]["step"]
        tensor(1.)
    """
    names = list(params)
    total = sum(len(group["params"]) for group in param_groups)
    if total != len(names):
        raise CheckpointError(
            f"param_groups hold {total} parameters but params has {len(names)}; build the torch "
            "optimiser on the same parameters"
        )
    stages = _stages(opt_state)
    step = _steps_taken(stages)
    state: dict[int, dict[str, Tensor]] = {}
    # torch creates its per-parameter state on the first step (Adagrad: at construction).
    if step > 0 or any(type(s).__name__ == "ScaleByRssState" for s in stages):
        for index, name in enumerate(names):
            entry = state.setdefault(index, {})
            for stage in stages:
                kind = type(stage).__name__
                if kind in _STEPPED:
                    # torch keeps the step as a float32 tensor per parameter.
                    entry["step"] = torch.tensor(float(step), dtype=torch.float32)
                for field, value in zip(stage._fields, stage, strict=True):
                    key = _TORCH_KEYS.get((kind, field))
                    if key is not None and value is not None:
                        entry[key] = value[name].detach().clone()
    return {"state": state, "param_groups": [dict(group) for group in param_groups]}


def import_optimizer_state(
    state_dict: Mapping[str, Any],
    opt_state_like: Any,
    params: Mapping[str, Tensor],
    *,
    step: int | None = None,
) -> Any:
    """A ``torch.optim`` ``state_dict`` (SGD, Adam, AdamW, RMSprop, Adagrad) as our state.

    Args:
        state_dict: ``torch_optimizer.state_dict()``.
        opt_state_like: ``optimizer.init(params)`` of the matching functorch-diary
            optimiser: it says which stages the state has.
        params: the params dict, in the order torch numbered the parameters.
        step: the number of steps taken, for optimisers whose torch state has no step
            (SGD). Default: torch's ``step``, else 1 if there are momentum buffers, else 0.

    Returns:
        The optimiser state, with tensors on each param's device and dtype. The learning
        rate stage takes the ``lr`` of torch's param group (what a scheduler set).

    Raises:
        CheckpointError: the state does not match the params or the optimiser.
    """
    names = list(params)
    torch_state = state_dict.get("state", {})
    unknown = [key for key in torch_state if not (isinstance(key, int) and 0 <= key < len(names))]
    if unknown:
        raise CheckpointError(
            f"state_dict has parameter indices {unknown} outside 0..{len(names) - 1}"
        )

    def per_param(key: str) -> dict[str, Tensor] | None:
        present = [i for i in range(len(names)) if torch_state.get(i, {}).get(key) is not None]
        if not present:
            return None
        if len(present) != len(names):
            missing = [names[i] for i in range(len(names)) if i not in present]
            raise CheckpointError(f"state_dict has {key!r} for some parameters but not {missing}")
        out = {}
        for index, name in enumerate(names):
            value, param = torch_state[index][key], params[name]
            if value.shape != param.shape:
                raise CheckpointError(
                    f"state_dict['state'][{index}][{key!r}] (param {name!r}): expected shape "
                    f"{tuple(param.shape)}, got {tuple(value.shape)}"
                )
            out[name] = value.detach().to(device=param.device, dtype=param.dtype).clone()
        return out

    torch_steps = {float(entry["step"]) for entry in torch_state.values() if "step" in entry}
    if len(torch_steps) > 1:
        raise CheckpointError(
            f"parameters are at different steps {sorted(torch_steps)}; "
            "functorch-diary keeps one step count"
        )
    # In table order, so the first error reported is always the same one.
    buffers = {key: per_param(key) for key in dict.fromkeys(_TORCH_KEYS.values())}
    if step is None:
        has_buffers = any(value is not None for value in buffers.values())
        step = int(torch_steps.pop()) if torch_steps else int(has_buffers)
    lrs = {group.get("lr") for group in state_dict.get("param_groups", [])} - {None}
    if len(lrs) > 1:
        raise CheckpointError(
            f"param groups have different learning rates {sorted(lrs)}; "
            "use one functorch-diary optimiser per group (optim.multi_transform)"
        )
    stages = []
    for stage in _stages(opt_state_like):
        kind = type(stage).__name__
        changes: dict[str, Any] = {}
        for field, value in zip(stage._fields, stage, strict=True):
            key = _TORCH_KEYS.get((kind, field))
            if key is not None and value is not None and buffers[key] is not None:
                changes[field] = buffers[key]
        if _count_of(stage) is not None:
            count = step
            if kind == "TraceState":
                # TraceState only asks whether count > 0, i.e. whether its buffer exists.
                count = max(step, 1) if "trace" in changes else 0
            changes["count"] = torch.full_like(stage.count, count)
        if kind == "ScaleByLearningRateState" and lrs:
            changes["lr"] = torch.full_like(stage.lr, lrs.pop())
        stages.append(stage._replace(**changes))
    chained = isinstance(opt_state_like, tuple) and not _is_namedtuple(opt_state_like)
    return tuple(stages) if chained else stages[0]
