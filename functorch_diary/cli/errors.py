"""How a command fails: one line on stderr naming the file or option, exit code 2.

A command wraps each step that reads the user's files or devices in :func:`failure`,
which turns the errors that step can meet (a truncated file, a pickle that names a
forbidden global, a state_dict for another model...) into a :class:`CliError` saying
what was being read and what to do. ``main`` prints a ``CliError`` (and a missing file,
and a :class:`~functorch_diary.checkpoint.CheckpointError`, which name their file
already) as ``error: ...`` with no traceback; ``--debug`` re-raises it to show one.
Anything else is a bug and keeps its traceback.

Example:
    >>> try:
    ...     with failure("reading --weights w.pth", "pass a torchvision vgg19 state_dict",
    ...                  ValueError):
    ...         raise ValueError("not a zip file")
    ... except CliError as error:
    ...     print(error)
    reading --weights w.pth: not a zip file; pass a torchvision vgg19 state_dict
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import zlib
from collections.abc import Iterator

from ..checkpoint import CheckpointError
from ..model.checks import TreeMismatchError

__all__ = ["FILE_ERRORS", "REPORTED", "CliError", "failure", "one_line", "report"]


class CliError(Exception):
    """A failure caused by the user's input: reported in one line, exit code 2."""


#: What reading a damaged or hostile file can raise, beyond the loaders' own ValueErrors:
#: the pickle machinery (any of these on garbage bytes), gzip/zlib, and the OS.
FILE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes CheckpointError, TreeMismatchError, UnicodeDecodeError
    pickle.UnpicklingError,
    EOFError,
    OSError,  # includes gzip.BadGzipFile, PIL.UnidentifiedImageError, PermissionError
    zlib.error,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    RuntimeError,  # torch.load on a damaged zip
    MemoryError,  # a header that claims an absurd size
    OverflowError,
    RecursionError,
)

#: The errors ``main`` reports in one line: they come from the user's files or options.
REPORTED: tuple[type[BaseException], ...] = (
    CliError,
    FileNotFoundError,
    CheckpointError,
    TreeMismatchError,
)


def one_line(text: str) -> str:
    """``text`` with its line breaks turned into spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@contextlib.contextmanager
def failure(what: str, hint: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` (default :data:`FILE_ERRORS`) raised inside into a :class:`CliError`
    ``"{what}: {error}; {hint}"``. A ``FileNotFoundError`` passes through unchanged: its
    message already names the file and how to get it."""
    caught = errors or FILE_ERRORS
    try:
        yield
    except (FileNotFoundError, CliError):
        raise
    except caught as error:
        detail = one_line(str(error)) or type(error).__name__
        raise CliError(f"{what}: {detail}; {hint}") from error


def report(error: BaseException, prog: str) -> int:
    """Print ``error`` as one line on stderr and return the exit code, 2."""
    print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr)
    return 2
