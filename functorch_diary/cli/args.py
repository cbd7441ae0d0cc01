"""Argument types with ranges for every command, and a parser whose errors are one line.

An option's value is checked where argparse reads it, so a bad one is refused before any
data is read or any step runs, with exit code 2 and the option's name in the message.
``0`` is a value like any other: "not given" is ``None`` (``default=None``), never a
falsy value, so ``--lr 0`` trains at lr 0 and ``--epochs 0`` is refused rather than
replaced by the recipe's default.

Example:
    >>> positive_int("3"), non_negative_float("0")
    (3, 0.0)
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be a positive integer (at least 1), got 0
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

__all__ = [
    "Parser",
    "device",
    "non_negative_float",
    "non_negative_int",
    "output_dir",
    "output_file",
    "positive_int",
    "prog_name",
]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reports a usage error on one line of stderr.

    argparse prints the whole usage block before the error; a script that greps stderr,
    and a user who reads only the last line, get the error and where to look instead.
    Sub-command parsers inherit this class (``add_subparsers`` uses the parent's type).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count that makes a run: epochs, batch size, steps (at least 1)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (at least 1), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A seed, or a count where 0 means none (0 or more)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A learning rate or a weight: finite and at least 0 (``torch.optim``'s rule for lr)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def device(text: str) -> str:
    """A torch device that exists here: ``cpu``, ``cuda``, ``cuda:1``, ``mps``..."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for, but torch sees no CUDA GPU here (torch {torch.__version__},"
                f" CUDA build {torch.version.cuda}); use --device cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for, but there are only {count} CUDA device(s): "
                f"use cuda:0..cuda:{count - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("'mps' asked for, but MPS is not available; use cpu")
    return text


def _creatable(path: Path, text: str) -> None:
    """Raise unless ``path`` is or can become a folder we may write in."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} cannot be created: {existing} is a file, not a folder; pick another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"{text} cannot be written: no write permission on {existing}"
        )


def output_dir(text: str) -> Path:
    """A folder to write into: it exists as a folder or can be created, and is writable.

    Checked when the arguments are read, so a typo or a path inside a regular file fails
    in the first second instead of after the whole run.
    """
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder; pick another path")
    _creatable(path, text)
    return path


def output_file(text: str) -> Path:
    """A file to write: not a folder, in a folder that exists or can be created."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it")
    _creatable(path.parent, text)
    return path


def prog_name(argv0: str | None = None) -> str:
    """The name the user typed: ``functorch-diary`` for the console script,
    ``python -m functorch_diary`` for the module."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "python -m functorch_diary" if name in ("__main__.py", "-c", "-", "", "-m") else name
