"""The command line: ``python -m functorch_diary COMMAND ...``.

Each command lives in its own module with a ``register(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import gan, style, train

COMMANDS = (train, gan, style)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m functorch_diary",
        description="Pure-functional PyTorch training of the diaries' models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FileNotFoundError as error:
        # Missing data or weights: the message says which files and where; no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
