"""Reading ``torch.save`` files (torchvision weights, seed checkpoints) without running code.

The one place the package calls ``torch.load``: always ``weights_only=True`` (only
tensors and plain containers are rebuilt; a pickle that asks for anything else, the
``__reduce__`` trick of a malicious file, is refused before any of it runs), and every
failure, whether a missing, truncated, garbage or malicious file, is one
:class:`~functorch_diary.checkpoint.format.CheckpointError` that names the file.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
    >>> torch.save({"weight": torch.ones(2)}, path)
    >>> load_torch_file(path)
    {'weight': tensor([1., 1.])}
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import torch

from .format import CheckpointError

__all__ = ["load_torch_file"]


def load_torch_file(
    path: str | os.PathLike[str],
    map_location: torch.device | str = "cpu",
    *,
    mmap: bool = False,
) -> Any:
    """Read a ``torch.save`` file (e.g. a torchvision ``state_dict``) without running its code.

    Args:
        path: the file.
        map_location: where tensors go (default the CPU), whatever device they were
            saved from.
        mmap: memory-map the file so only the tensors used are read; ignored for files in
            torch's legacy (pre-1.6, non-zip) format, which cannot be mapped.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, not a ``torch.save``
            file, or asks to run code; the message names the file.
    """
    name = os.fspath(path)
    try:
        mapped = mmap and zipfile.is_zipfile(name)
        return torch.load(name, map_location=map_location, weights_only=True, mmap=mapped)
    except Exception as exc:
        kind = type(exc).__name__
        first_line = (str(exc).splitlines() or [""])[0]
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot read {name!r}: {exc}") from exc
        if "Unsupported global" in str(exc) or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"refused to load {name!r}: it asks to rebuild objects other than tensors and "
                f"plain containers, which could run code ({kind}: {first_line}). "
                "Only load such a file if you trust its author, with torch.load(weights_only=False)"
            ) from exc
        raise CheckpointError(
            f"cannot read {name!r} as a torch.save file: it is truncated, corrupted or another "
            f"kind of file ({kind}: {first_line})"
        ) from exc
