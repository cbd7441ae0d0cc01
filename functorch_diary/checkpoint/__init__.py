"""Checkpoints: the safe single-file format (atomic, digest-checked, no code on load),
reading ``torch.save`` files, and ``torch.optim`` state interop."""

from . import distributed as distributed  # sharded TrainStates, torch.distributed.checkpoint
from .format import (
    CheckpointError,
    export_optimizer_state,
    import_optimizer_state,
    load,
    load_torch_file,
    read_metadata,
    register_type,
    save,
)

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
