"""Distributed checkpoints of sharded ``TrainState`` s, on ``torch.distributed.checkpoint``.

Each rank writes its own shards (DCP's ``.distcp`` files plus its ``.metadata``); a
checkpoint saved from N ranks loads on any number of ranks, resharded to the placements
of the ``like=`` state it is loaded into (DCP reads the pieces each rank's shards need).
Nothing is pickled that carries code: tensors are DCP's raw bytes, and the tree's
structure (TrainState, the optimiser's NamedTuple states) is a small file in the
project's own safe format (:func:`functorch_diary.checkpoint.save`) whose leaves are the
tensors' key strings. DCP's own ``.metadata`` is a pickle, which DCP loads with plain
``pickle.load``: :func:`load` and :func:`to_single_file` first read it with an allowlist
of the classes DCP writes, and refuse a file that names anything else.

Layout of a checkpoint directory::

    run/
      LATEST                the one complete version to load (JSON, replaced atomically)
      step-000000200/       DCP files of the save at step 200, plus structure.ckpt

A save writes into ``.step-000000200.partial/``, waits for every rank to finish, and
only then renames it and replaces ``LATEST`` (temp file, fsync, ``os.replace``): a save
interrupted by a crash or a dead rank leaves ``LATEST`` on the last good version, and
the next save clears the leftover. Older versions are removed once ``LATEST`` moved on.

:func:`to_single_file` and :func:`from_single_file` convert to and from the project's
single-file format (one process, no process group needed).

Example (one process, no process group; plain tensors are saved whole):
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from functorch_diary import Model, optim, init_train_state
    >>> from functorch_diary.checkpoint import distributed as dcheckpoint
    >>> model, opt = Model(lambda: nn.Linear(3, 2)), optim.adam(0.1)
    >>> ts = init_train_state(model, opt, seed=0)
    >>> run = os.path.join(tempfile.mkdtemp(), "run")
    >>> dcheckpoint.save(run, ts)
    >>> back = dcheckpoint.load(run, like=init_train_state(model, opt, seed=1))
    >>> torch.equal(back.params["weight"], ts.params["weight"])
    True
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..training.distributed import collective_failure
from ..tree import PyTree, tree_flatten_with_paths, tree_map, tree_unflatten_like
from .format import CheckpointError
from .format import load as load_file
from .format import save as save_file

__all__ = ["from_single_file", "latest_version", "load", "read_metadata", "save", "to_single_file"]

_LATEST = "LATEST"
_STRUCTURE = "structure.ckpt"


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _active() else 0


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as exc:  # gloo, NCCL and DCP wrap a lost peer in several types
        if not _active():
            raise
        raise collective_failure(what, exc, state="the last good checkpoint is unchanged") from exc


def _dcp(name: str, flat: dict[str, Tensor], checkpoint_id: str) -> Any:
    """``dcp.save`` / ``dcp.load`` over the process group, or in this process alone
    (without DCP's warning that it assumes so: here it is the documented use)."""
    # Imported here: torch.distributed.checkpoint (and DTensor behind it) would add ~1 s
    # to ``import functorch_diary`` for every user, sharded or not.
    import torch.distributed.checkpoint as dcp

    fn = getattr(dcp, name)
    if _active():
        return fn(flat, checkpoint_id=checkpoint_id)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        return fn(flat, checkpoint_id=checkpoint_id, no_dist=True)


def _barrier(what: str) -> None:
    if _active():
        _collective(what, dist.barrier)


def _flat(tree: PyTree) -> dict[str, Tensor]:
    flat = dict(tree_flatten_with_paths(tree))
    bad = [path for path, leaf in flat.items() if not isinstance(leaf, Tensor)]
    if bad:
        raise CheckpointError(
            f"a distributed checkpoint holds tensors only; leaf {bad[0]!r} is "
            f"{type(flat[bad[0]]).__name__}"
        )
    return flat


def _write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".latest-")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(
    directory: str | os.PathLike[str], tree: PyTree, *, metadata: dict[str, Any] | None = None
) -> None:
    """Save ``tree`` (a sharded ``TrainState``, or any tree of tensors and DTensors) as a
    new version of the checkpoint ``directory``; every rank calls it.

    Args:
        directory: the checkpoint directory (created on first save).
        tree: the tree; DTensor leaves are written shard by shard by their owners.
        metadata: JSON-serialisable notes stored in ``LATEST``.

    Raises:
        DistributedError: a rank died or timed out during the save (``LATEST`` still
            names the previous complete version).
        CheckpointError: a leaf is not a tensor.
    """
    directory = os.fspath(directory)
    flat = _flat(tree)
    step = tree.step if hasattr(tree, "step") else None
    name = f"step-{int(step):09d}" if isinstance(step, Tensor) else "version"
    partial = os.path.join(directory, f".{name}.partial")
    if _rank() == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # the leftover of an interrupted save
        os.makedirs(partial)
        skeleton = tree_unflatten_like(tree, list(flat))  # the structure, keys as leaves
        save_file(os.path.join(partial, _STRUCTURE), skeleton)
    _barrier("checkpoint save (preparing the directory)")
    _collective(
        "checkpoint save",
        lambda: _dcp("save", flat, partial),
    )
    _barrier("checkpoint save (waiting for every rank's shards)")
    if _rank() == 0:
        # Saving a step again gets a fresh name: the version LATEST names is never touched.
        final, count = name, 0
        while os.path.exists(os.path.join(directory, final)):
            count += 1
            final = f"{name}-{count}"
        name = final
        os.replace(partial, os.path.join(directory, name))
        size = dist.get_world_size() if _active() else 1
        _write_json_atomically(
            os.path.join(directory, _LATEST),
            {"version": name, "world_size": size, "metadata": metadata or {}},
        )
        for entry in os.listdir(directory):
            if entry.startswith("step-") and entry != name:
                shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    _barrier("checkpoint save (publishing LATEST)")


def latest_version(directory: str | os.PathLike[str]) -> str | None:
    """The name of the complete version ``LATEST`` points to, or ``None`` if none."""
    path = os.path.join(os.fspath(directory), _LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle).get("version")


def read_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What :func:`save` recorded in ``LATEST``: version, world size and metadata."""
    with open(os.path.join(os.fspath(directory), _LATEST)) as handle:
        return json.load(handle)


def _version_dir(directory: str | os.PathLike[str]) -> str:
    version = latest_version(directory)
    if version is None:
        raise CheckpointError(
            f"{os.fspath(directory)!r} holds no complete distributed checkpoint (no "
            f"{_LATEST} file naming a version); save one with checkpoint.distributed.save"
        )
    return os.path.join(os.fspath(directory), version)


# DCP's ``.metadata`` is a pickle that DCP loads with plain ``pickle.load``; these are the
# only globals a file DCP wrote refers to. Anything else is refused before DCP reads it.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "ChunkStorageMetadata",
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, handle: Any, path: str):
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise CheckpointError(
                f"{self.path!r} refers to {module}.{name}, which a checkpoint written by "
                "torch.distributed.checkpoint never does; refusing to load it (a pickle can "
                "run code)"
            )
        return super().find_class(module, name)


def _stored_keys(version_dir: str) -> dict[str, Any]:
    """The tensors DCP stored (key -> size and dtype), read with the allowlist above."""
    path = os.path.join(version_dir, ".metadata")
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle, path).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path!r} is not a readable DCP metadata file ({exc})") from exc
    return dict(metadata.state_dict_metadata)


def load(directory: str | os.PathLike[str], *, like: PyTree) -> PyTree:
    """The latest version of ``directory``, placed like ``like`` (every rank calls it).

    ``like`` gives the structure and each leaf's placement: a sharded ``TrainState`` from
    ``shard_train_state`` on this run's mesh (any number of ranks: DCP reshards), or a
    plain one in a single process. ``like`` itself is not modified.

    Raises:
        CheckpointError: no complete version, or the stored keys or shapes differ from
            ``like``'s (the message names them).
        DistributedError: a rank died or timed out during the load.
    """
    version_dir = _version_dir(directory)
    target = _flat(like)
    stored = _stored_keys(version_dir)
    missing, unexpected = sorted(set(target) - set(stored)), sorted(set(stored) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{version_dir!r} does not match like=: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; build like= from the same model and optimiser"
        )
    for key, leaf in target.items():
        size = tuple(getattr(stored[key], "size", ()))
        if size != tuple(leaf.shape):
            raise CheckpointError(
                f"leaf {key!r}: the checkpoint holds shape {size}, like= has {tuple(leaf.shape)}"
            )
    # Fresh tensors placed like ``like`` (DCP loads in place; ``like`` stays untouched).
    fresh = {key: torch.empty_like(leaf) for key, leaf in target.items()}
    _collective("checkpoint load", lambda: _dcp("load", fresh, version_dir))
    return tree_unflatten_like(like, [fresh[key] for key in target])


def to_single_file(directory: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Write the latest version of ``directory`` as one file in the project's format (the
    full tensors, whatever the number of ranks that saved it). One process, no group."""
    version_dir = _version_dir(directory)
    stored = _stored_keys(version_dir)
    skeleton = load_file(os.path.join(version_dir, _STRUCTURE))
    full = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in stored.items()
    }
    _dcp("load", full, version_dir)
    save_file(path, tree_map(lambda key: full[key], skeleton))


def from_single_file(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> None:
    """Save the single-file checkpoint ``path`` as a distributed checkpoint ``directory``,
    loadable on any number of ranks with :func:`load`. One process, no group."""
    save(directory, load_file(path))
