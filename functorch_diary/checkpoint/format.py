"""The checkpoint file format: any pytree, safe to load, atomic to write, any device.

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
- The SHA-256 of everything before it detects truncation and corruption. A digest proves
  nothing about intent (a forger recomputes it), so the header is then checked field by
  field against the limits below: reading is bounded by the file, whatever it says.
- :func:`save` writes a temporary file next to the target, ``fsync`` s it and renames it
  over the target (``os.replace`` is atomic), then ``fsync`` s the directory: a crash at
  any moment leaves either the old checkpoint or the new one, both complete. Temporary
  files that killed saves left behind are removed by the next save in that directory.
- Tensors are stored as bytes with no device: :func:`load` puts them on the CPU, on
  ``device``, or where the ``like=`` tree's leaves are.

What a reader refuses (each a :class:`CheckpointError` naming the file and the problem):
a header over :data:`MAX_HEADER_BYTES`, JSON nested deeper than :data:`MAX_JSON_DEPTH`
or a tree deeper than :data:`MAX_TREE_DEPTH`, an integer of more than
:data:`MAX_INT_DIGITS` digits, a header field of the wrong type or an unknown one, a
shape entry that is not a non-negative ``int``, a shape whose element count or byte size
overflows 63 bits, a byte range outside the data region or overlapping another, and a
tensor entry the tree uses twice (aliasing) or never.

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
import itertools
import json
import math
import os
import re
import secrets
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..tree import PyTree, tree_flatten_with_paths, tree_map

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "MAX_TREE_DEPTH",
    "STALE_TEMP_SECONDS",
    "CheckpointError",
    "is_namedtuple",
    "load",
    "read_metadata",
    "register_type",
    "remove_stale_temporaries",
    "save",
    "type_name",
]

_MAGIC = b"FDCKPT\x00\x01"
_FORMAT_VERSION = 1
_DIGEST_SIZE = 32
_ALIGN = 64  # tensor data starts on 64-byte boundaries, so views of the file are aligned
_PREFIX = struct.Struct("<8sQ")

#: The largest header a reader parses: about 60 000 tensors' descriptions. Parsing JSON
#: costs up to ~20x its size in Python objects, so this caps the header's memory.
MAX_HEADER_BYTES = 8 << 20
#: How deep the header's JSON may nest (a tree level is two JSON levels: node, children).
MAX_JSON_DEPTH = 160
#: How deep a saved tree may nest (a TrainState of wrapped optimisers is about 10 deep).
MAX_TREE_DEPTH = 64
#: Digits an integer in the header may have (2**128 has 39): Python refuses to parse
#: more than 4300 and the cost of parsing grows with the square of the length.
MAX_INT_DIGITS = 40
_MAX_NDIM = 64
_INT63 = 2**63  # element counts, byte sizes and strides must fit torch's int64

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
_HEADER_FIELDS = {
    "format_version": int,
    "byteorder": str,
    "tree": dict,
    "leaves": list,
    "data_nbytes": int,
    "metadata": dict,
}
_LEAF_FIELDS = {"dtype": str, "shape": list, "offset": int, "nbytes": int}
_FLOAT_WORDS = ("inf", "-inf", "nan")  # JSON has no inf/nan: they are written as strings

# Temporary files of save(): ".<target>.<pid>.<8 hex>.tmp". The pid tells a later save
# whether the writer is gone; nothing else in a directory is ever removed.
_TEMP_PATTERN = re.compile(r"\.(?P<target>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")
#: A temporary file this old is stale even if a process with its pid is alive (the pid
#: was reused, or the file came from another machine through a shared directory).
STALE_TEMP_SECONDS = 3600.0

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
    _REGISTRY[type_name(cls)] = cls
    return cls


def type_name(cls: type) -> str:
    """The name a checkpoint records for class ``cls``: ``module.qualname``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_namedtuple(value: Any) -> bool:
    """Whether ``value`` is a NamedTuple instance (a tuple whose type has ``_fields``)."""
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _resolve_namedtuple(name: str, fields: list[str], where: str, file: str) -> type:
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
            f"{file!r} at {where}: the checkpoint holds a {name} with fields {fields}, which is "
            f"{found}; pass like=<a tree of the same structure> to load(), or call "
            "checkpoint.register_type(YourNamedTuple) before loading"
        )
    return cls


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(node: Any, path: str, tensors: list[Tensor], depth: int = 0) -> dict[str, Any]:
    """The JSON description of ``node``; tensor leaves are appended to ``tensors`` (a
    tensor met twice is stored twice, so loaded leaves never share memory)."""
    where = path or "<root>"
    if depth > MAX_TREE_DEPTH:
        raise CheckpointError(f"at {where}: the tree nests deeper than {MAX_TREE_DEPTH} levels")
    if isinstance(node, Tensor):
        if node.layout != torch.strided or node.is_quantized:
            raise CheckpointError(f"at {where}: only dense tensors can be saved, got {node.layout}")
        if str(node.dtype).removeprefix("torch.") not in _DTYPES:
            raise CheckpointError(f"at {where}: dtype {node.dtype} cannot be saved")
        tensors.append(node)
        return {"t": "tensor", "i": len(tensors) - 1, "device": str(node.device)}
    if node is None:
        return {"t": "none"}
    if isinstance(node, bool):
        return {"t": "bool", "v": node}
    if isinstance(node, int):
        if len(str(abs(node))) > MAX_INT_DIGITS:
            raise CheckpointError(
                f"at {where}: an int of more than {MAX_INT_DIGITS} digits cannot be saved; "
                "store it as a string"
            )
        return {"t": "int", "v": int(node)}
    if isinstance(node, float):
        return {"t": "float", "v": node if math.isfinite(node) else repr(float(node))}
    if isinstance(node, str):
        return {"t": "str", "v": str(node)}
    if is_namedtuple(node):
        fields = list(type(node)._fields)
        return {
            "t": "namedtuple",
            "name": type_name(type(node)),
            "fields": fields,
            "c": [
                _encode(v, _join(path, f), tensors, depth + 1)
                for f, v in zip(fields, node, strict=True)
            ],
        }
    if isinstance(node, (list, tuple)):
        kind = "list" if isinstance(node, list) else "tuple"
        return {
            "t": kind,
            "c": [_encode(v, _join(path, i), tensors, depth + 1) for i, v in enumerate(node)],
        }
    if isinstance(node, Mapping):
        for key in node:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CheckpointError(f"at {where}: dict keys must be str or int, got {key!r}")
        kind = "odict" if isinstance(node, OrderedDict) else "dict"
        return {
            "t": kind,
            "k": list(node.keys()),
            "c": [_encode(v, _join(path, k), tensors, depth + 1) for k, v in node.items()],
        }
    raise CheckpointError(
        f"at {where}: cannot save a {type(node).__name__}; a checkpoint holds tensors, "
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

    The file's permissions follow the umask, as ``torch.save``'s do. Temporary files
    left in the directory by saves that were killed are removed first (only files named
    like this function's own temporaries whose writer is gone).

    Args:
        path: the checkpoint file; its directory must exist.
        tree: any pytree of tensors (any device), ``None``, bools, ints, floats and strings
            in dicts, lists, tuples and NamedTuples, e.g. a ``TrainState``.
        metadata: JSON-serialisable extra information (read back by :func:`read_metadata`).

    Raises:
        CheckpointError: the tree holds something that cannot be saved (the path says
            where), or it or the metadata exceeds a limit the reader enforces.
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
    except (TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"metadata must be JSON-serialisable: {exc}") from exc
    header = text.encode("utf-8")
    # What the reader would refuse is never written: parse the header as it will.
    _parse_header(header, os.fspath(path))
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(directory)
    fd, tmp = _create_temporary(directory, os.path.basename(path))
    digest = hashlib.sha256()
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


def _create_temporary(directory: str, target: str) -> tuple[int, str]:
    """A new file ``.<target>.<pid>.<random>.tmp`` opened for writing. Mode ``0o666``
    before the umask, as ``open()`` (and so ``torch.save``) creates files; ``O_EXCL``
    never reuses an existing name."""
    while True:
        tmp = os.path.join(directory, f".{target}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[str]:
    """Delete the temporary files that killed :func:`save` calls left in ``directory``.

    Only regular files named like :func:`save`'s temporaries and owned by this user are
    considered, and of those only the stale ones: their writer's pid is not running on
    this machine, or they are older than :data:`STALE_TEMP_SECONDS`. A save in progress
    in another process is never touched. Returns the names removed.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> open(os.path.join(folder, ".run.ckpt.999999999.0123abcd.tmp"), "w").close()
        >>> remove_stale_temporaries(folder)
        ['.run.ckpt.999999999.0123abcd.tmp']
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_PATTERN.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or info.st_uid != os.getuid():
                continue
            if _process_alive(int(match["pid"])) and now - info.st_mtime < STALE_TEMP_SECONDS:
                continue
            os.unlink(entry.path)
        except OSError:
            continue  # gone already (another save cleaned it) or not ours to delete
        removed.append(entry.name)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's process
    except (ProcessLookupError, OverflowError):
        return False  # no such process (or a number no pid can be)
    return True


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise CheckpointError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _json_depth_within(value: Any, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` containers deep (iterative: any depth)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return False
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return True


def _parse_header(raw: bytes | memoryview, name: str) -> dict[str, Any]:
    """The header's JSON with every top-level field of the right type; CheckpointError
    for anything else."""
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{name!r}: header of {len(raw)} bytes exceeds the limit of {MAX_HEADER_BYTES}"
        )
    try:
        header = json.loads(bytes(raw).decode("utf-8"), parse_int=_parse_int)
    except CheckpointError as exc:
        raise CheckpointError(f"{name!r}: malformed header: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{name!r}: header nests deeper than Python can parse") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{name!r}: unreadable header ({exc})") from exc
    if not _json_depth_within(header, MAX_JSON_DEPTH):
        raise CheckpointError(f"{name!r}: header nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(header, dict):
        raise CheckpointError(f"{name!r}: header is a {type(header).__name__}, not an object")
    if header.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{name!r}: format version {header.get('format_version')!r}, this functorch-diary "
            f"reads {_FORMAT_VERSION}"
        )
    _check_fields(header, _HEADER_FIELDS, f"{name!r}: header")
    if header["byteorder"] != sys.byteorder:
        raise CheckpointError(
            f"{name!r} was written on a {header['byteorder']!r}-endian machine; this one is "
            f"{sys.byteorder}-endian"
        )
    return header


def _check_fields(record: dict[str, Any], fields: dict[str, type], what: str) -> None:
    """``record`` has exactly ``fields``, each of its type (``bool`` is no ``int``)."""
    if set(record) != set(fields):
        missing, extra = sorted(set(fields) - set(record)), sorted(set(record) - set(fields))
        raise CheckpointError(f"{what} has missing fields {missing} and unknown fields {extra}")
    for field, kind in fields.items():
        value = record[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{what} field {field!r} must be a {kind.__name__}, got {type(value).__name__}"
            )


def _read_verified(path: str | os.PathLike[str]) -> tuple[dict[str, Any], memoryview]:
    """Header and data region of ``path`` after checking magic, sizes, digest, the header's
    fields and every tensor's byte range. Memory: the file once (the digest and the header
    are read through views of it)."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:8] != _MAGIC:
                pickle = prefix[:1] == b"\x80" or prefix[:2] == b"PK"
                what = "pickle (torch.save)" if pickle else "unknown"
                raise CheckpointError(
                    f"{name!r} is not a functorch-diary checkpoint (bad magic; looks like a "
                    f"{what} file). For a torch.save file of plain tensors (a state_dict) use "
                    "checkpoint.load_torch_file, which refuses anything that would run code"
                )
            raw = bytearray(size)
            raw[: _PREFIX.size] = prefix
            got = _PREFIX.size + file.readinto(memoryview(raw)[_PREFIX.size :])
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {name!r}: {exc}") from exc
    except MemoryError:
        raise CheckpointError(f"{name!r}: {size} bytes do not fit in memory") from None
    view = memoryview(raw)
    body_end = len(raw) - _DIGEST_SIZE
    if (
        got != size
        or body_end < _PREFIX.size
        or (hashlib.sha256(view[:body_end]).digest() != view[body_end:])
    ):
        raise CheckpointError(
            f"{name!r} is truncated or corrupted (checksum mismatch, {size} bytes); "
            "load an earlier checkpoint"
        )
    _, header_len = _PREFIX.unpack_from(raw)
    start = _PREFIX.size + header_len
    if start > body_end:
        raise CheckpointError(f"{name!r}: header length {header_len} exceeds the file size")
    header = _parse_header(view[_PREFIX.size : start], name)
    data = view[start:body_end]
    if header["data_nbytes"] != len(data):
        raise CheckpointError(
            f"{name!r}: data region is {len(data)} bytes, header says {header['data_nbytes']}"
        )
    _check_leaf_specs(header["leaves"], len(data), name)
    _check_tensor_references(header["tree"], len(header["leaves"]), name)
    return header, data


def _check_leaf_specs(specs: list[Any], data_nbytes: int, name: str) -> None:
    """Every tensor description well typed, its shape's size within int64, and its bytes
    inside the data region without overlapping another's."""
    ranges = []
    for index, spec in enumerate(specs):
        what = f"{name!r}: tensor {index}"
        if not isinstance(spec, dict):
            raise CheckpointError(f"{what} is described by a {type(spec).__name__}, not an object")
        _check_fields(spec, _LEAF_FIELDS, what)
        dtype = _DTYPES.get(spec["dtype"])
        if dtype is None:
            raise CheckpointError(f"{what}: dtype {spec['dtype']!r} is not one of {list(_DTYPES)}")
        shape = spec["shape"]
        if len(shape) > _MAX_NDIM or not all(type(s) is int and s >= 0 for s in shape):
            raise CheckpointError(
                f"{what}: shape {shape!r} must be at most {_MAX_NDIM} non-negative ints"
            )
        itemsize = dtype.itemsize
        # The largest stride (zeros ignored) bounds what torch computes for the shape.
        extent = math.prod(max(s, 1) for s in shape) * itemsize
        nbytes = math.prod(shape) * itemsize
        if extent >= _INT63:
            raise CheckpointError(f"{what}: shape {shape} overflows 63-bit sizes")
        offset = spec["offset"]
        if nbytes != spec["nbytes"] or not 0 <= offset <= offset + nbytes <= data_nbytes:
            raise CheckpointError(
                f"{what}: {spec['nbytes']} bytes at offset {offset} for shape {shape} "
                f"({nbytes} bytes) do not fit the data region of {data_nbytes} bytes"
            )
        if nbytes:
            ranges.append((offset, offset + nbytes, index))
    ranges.sort()
    for (_, end, first), (begin, _, second) in itertools.pairwise(ranges):
        if begin < end:
            raise CheckpointError(
                f"{name!r}: tensors {first} and {second} overlap in the data region; every "
                "tensor owns its own bytes"
            )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` given to :func:`save` (the file is fully verified first)."""
    header, _ = _read_verified(path)
    return dict(header["metadata"])


def _leaf_tensor(spec: dict[str, Any], data: memoryview) -> Tensor:
    """Tensor ``spec`` (already checked) in fresh memory: one copy of its bytes."""
    dtype = _DTYPES[spec["dtype"]]
    if spec["nbytes"] == 0:
        return torch.empty(spec["shape"], dtype=dtype)
    view = torch.frombuffer(data, dtype=torch.uint8, count=spec["nbytes"], offset=spec["offset"])
    return view.clone().view(dtype).reshape(spec["shape"])


_CONTAINERS = ("list", "tuple", "namedtuple", "dict", "odict")


def _check_tensor_references(tree: Any, count: int, name: str) -> None:
    """The tree nests at most :data:`MAX_TREE_DEPTH` deep and uses every one of the
    ``count`` tensor entries exactly once: a second use would be aliasing (two leaves
    sharing memory, or one megabyte described a thousand times), an unused one is bytes
    the tree does not explain. Checked before any tensor is built."""
    used = [False] * count
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict):
            continue  # the decoder names the malformed node and its path
        if depth > MAX_TREE_DEPTH:
            raise CheckpointError(f"{name!r}: the tree nests deeper than {MAX_TREE_DEPTH} levels")
        if node.get("t") == "tensor":
            index = node.get("i")
            if type(index) is not int or not 0 <= index < count:
                raise CheckpointError(
                    f"{name!r}: tensor index {index!r} outside 0..{count - 1} in the tree"
                )
            if used[index]:
                raise CheckpointError(
                    f"{name!r}: tensor {index} appears twice in the tree (aliasing is refused: "
                    "loaded leaves never share memory)"
                )
            used[index] = True
        elif node.get("t") in _CONTAINERS and isinstance(node.get("c"), list):
            stack.extend((child, depth + 1) for child in node["c"])
    unused = [i for i, seen in enumerate(used) if not seen]
    if unused:
        raise CheckpointError(f"{name!r}: tensors {unused[:10]} are described but not in the tree")


class _Decoder:
    """Rebuilds a tree from its description (whose tensor references are checked)."""

    def __init__(
        self, specs: list[dict[str, Any]], data: memoryview, has_like: bool, name: str
    ) -> None:
        self.specs, self.data, self.has_like, self.name = specs, data, has_like, name

    def fail(self, where: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.name!r}: {what} at {where}")

    def decode(self, node: Any, path: str, like: Any) -> Any:
        where = path or "<root>"
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise self.fail(where, "a malformed tree description")
        kind = node["t"]
        if self.has_like:
            _check_like_kind(kind, node, like, where, self.name)
        if kind == "tensor":
            if not isinstance(node.get("device", ""), str):
                raise self.fail(where, "a device that is not a string")
            return _leaf_tensor(self.specs[node["i"]], self.data)
        if kind == "none":
            return None
        if kind in ("bool", "int", "str"):
            value = node.get("v")
            if type(value) is not {"bool": bool, "int": int, "str": str}[kind]:
                raise self.fail(where, f"a bad {kind} value {value!r}")
            return value
        if kind == "float":
            value = node.get("v")
            if type(value) is not float and value not in _FLOAT_WORDS:
                raise self.fail(where, f"a bad float value {value!r}")
            return float(value)
        children = node.get("c")
        if not isinstance(children, list):
            raise self.fail(where, f"a malformed {kind}")

        def child(key: Any, index: Any, description: Any) -> Any:
            sub = like[index] if self.has_like else None
            return self.decode(description, _join(path, key), sub)

        if kind in ("list", "tuple"):
            items = [child(i, i, c) for i, c in enumerate(children)]
            return items if kind == "list" else tuple(items)
        if kind == "namedtuple":
            fields, type_ = node.get("fields"), node.get("name")
            if (
                not isinstance(type_, str)
                or not isinstance(fields, list)
                or len(fields) != len(children)
                or not all(isinstance(f, str) for f in fields)
            ):
                raise self.fail(where, "a malformed NamedTuple")
            cls = (
                type(like)
                if self.has_like
                else _resolve_namedtuple(type_, fields, where, self.name)
            )
            return cls(
                *[child(f, i, c) for i, (f, c) in enumerate(zip(fields, children, strict=True))]
            )
        if kind in ("dict", "odict"):
            keys = node.get("k")
            if (
                not isinstance(keys, list)
                or len(keys) != len(children)
                or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys)
                or len(set(keys)) != len(keys)
            ):
                raise self.fail(where, "a malformed dict (keys must be unique strs or ints)")
            out = OrderedDict() if kind == "odict" else {}
            for key, description in zip(keys, children, strict=True):
                out[key] = child(key, key, description)
            return out
        raise self.fail(where, f"unknown node type {kind!r}")


def _check_like_kind(kind: str, node: dict[str, Any], like: Any, where: str, file: str) -> None:
    """Raise when the stored node and the template node differ in kind, keys or fields."""

    def fail(expected: str, got: str) -> None:
        raise CheckpointError(
            f"{file!r} at {where}: the checkpoint holds {got} but like= has {expected}; "
            "is this checkpoint from another model or optimiser?"
        )

    if kind == "tensor" and not isinstance(like, Tensor):
        fail(type(like).__name__, "a tensor")
    elif kind == "none" and like is not None:
        fail(type(like).__name__, "None")
    elif kind in ("bool", "int", "float", "str") and type(like).__name__ != kind:
        fail(type(like).__name__, f"a {kind}")
    elif kind == "namedtuple":
        if not is_namedtuple(like):
            fail(type(like).__name__, f"a NamedTuple {node.get('name')}")
        if list(type(like)._fields) != node.get("fields"):
            fail(f"fields {list(type(like)._fields)}", f"fields {node.get('fields')}")
    elif kind in ("list", "tuple"):
        if not isinstance(like, (list, tuple)) or is_namedtuple(like):
            fail(type(like).__name__, f"a {kind}")
        if len(like) != len(node.get("c", ())):
            fail(f"{len(like)} items", f"{len(node.get('c', ()))} items")
    elif kind in ("dict", "odict"):
        if not isinstance(like, Mapping):
            fail(type(like).__name__, "a dict")
        keys = node.get("k")
        stored = list(keys) if isinstance(keys, list) else []
        wanted = list(like.keys())
        try:
            differ = set(stored) != set(wanted)
        except TypeError:  # an unhashable key: the decoder names it
            return
        if differ:
            missing = sorted(map(str, set(wanted) - set(stored)))
            extra = sorted(map(str, set(stored) - set(wanted)))
            raise CheckpointError(
                f"{file!r} at {where}: keys differ from like=: missing from the checkpoint "
                f"{missing}, not in like= {extra}"
            )


def load(
    path: str | os.PathLike[str],
    *,
    like: PyTree | None = None,
    device: torch.device | str | None = None,
) -> PyTree:
    """Read a checkpoint written by :func:`save`; no code from the file ever runs.

    Reading is bounded by the file: at most about twice its size in memory (the file,
    then each tensor in its own memory) plus the parsed header, whatever the header says.

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
            corrupted, malformed (forged or from an incompatible writer: the message says
            which field), or does not match ``like``.
    """
    name = os.fspath(path)
    header, data = _read_verified(path)
    tree = _Decoder(header["leaves"], data, like is not None, name).decode(header["tree"], "", like)
    if like is not None:
        _check_leaves_like(tree, like, name)
    return _place(tree, like, device)


def _check_leaves_like(tree: PyTree, like: PyTree, file: str) -> None:
    for (path, got), (_, want) in zip(
        tree_flatten_with_paths(tree), tree_flatten_with_paths(like), strict=True
    ):
        if isinstance(got, Tensor) and (got.shape != want.shape or got.dtype != want.dtype):
            raise CheckpointError(
                f"{file!r} at {path}: the checkpoint holds shape {tuple(got.shape)}, dtype "
                f"{got.dtype}; like= has shape {tuple(want.shape)}, dtype {want.dtype}"
            )


def _place(tree: PyTree, like: PyTree | None, device: torch.device | str | None) -> PyTree:
    if device is not None:
        return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)
    if like is None:
        return tree
    return tree_map(lambda t, w: t.to(w.device) if isinstance(t, Tensor) else t, tree, like)
