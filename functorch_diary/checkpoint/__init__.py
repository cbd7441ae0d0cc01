"""Checkpoints: the safe single-file format (``format``: atomic, digest-checked, bounded,
no code on load), reading ``torch.save`` files (``torch_files``), and ``torch.optim``
state interop driven by the state types (``torch_optim``; schedulers: ``torch_schedulers``)."""

from typing import Any

from . import distributed as distributed  # sharded TrainStates, torch.distributed.checkpoint
from .format import CheckpointError, load, read_metadata, register_type, save
from .torch_files import load_torch_file

_INTEROP = (
    "export_optimizer_state",
    "export_scheduler_state",
    "import_optimizer_state",
    "register_torch_state",
    "register_torch_wrapper",
)

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
        from . import torch_optim, torch_schedulers

        module = torch_schedulers if name == "export_scheduler_state" else torch_optim
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
