"""Checkpoints: the safe single-file format (``format``: atomic, digest-checked, bounded,
no code on load), reading ``torch.save`` files (``torch_files``), and ``torch.optim``
state interop driven by the state types (``torch_optim``; schedulers: ``torch_schedulers``)."""

import importlib
from typing import Any

from . import distributed as distributed  # sharded TrainStates, torch.distributed.checkpoint
from .format import CheckpointError, load, read_metadata, register_type, save
from .torch_files import load_torch_file

#: The interop names, each with the module that defines it (loaded on first use).
_INTEROP = {
    "export_optimizer_state": "torch_optim",
    "export_scheduler_state": "torch_schedulers",
    "import_optimizer_state": "torch_optim",
    "register_torch_state": "torch_optim",
    "register_torch_wrapper": "torch_optim",
}

__all__ = [
    "CheckpointError",
    "load",
    "load_torch_file",
    "read_metadata",
    "register_type",
    "save",
    *_INTEROP,
]


def __getattr__(name: str) -> Any:
    # torch_optim registers optim's state types, and optim's import chain reaches
    # model.pretrained, which reads weights through this package: load it on first use.
    if name in _INTEROP:
        return getattr(importlib.import_module(f".{_INTEROP[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
