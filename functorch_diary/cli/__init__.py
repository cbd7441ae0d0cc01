"""The command line: ``functorch-diary COMMAND ...`` (or ``python -m functorch_diary``).

Each command lives in its own module with a ``register(subparsers)`` function. Options
are checked by argparse (:mod:`.args`); a failure caused by the user's files or options
is one line on stderr and exit code 2 (:mod:`.errors`); ``--debug`` shows its traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import metadata

from . import evaluate, export, gan, style, train
from .args import Parser, prog_name
from .errors import REPORTED, report

COMMANDS = (train, evaluate, export, gan, style)


def _version() -> str:
    try:
        return metadata.version("functorch-diary")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The full parser, every command registered, named ``prog`` (default: as invoked)."""
    parser = Parser(
        prog=prog or prog_name(),
        description="Pure-functional PyTorch training through torch.func: train, evaluate "
        "and export classifiers, train GANs, run style transfer.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    debug = {"action": "store_true", "default": argparse.SUPPRESS,
             "help": "show the Python traceback of a failure"}  # fmt: skip
    parser.add_argument("--debug", **debug)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    for sub in subparsers.choices.values():
        sub.add_argument("--debug", **debug)  # accepted before or after the command
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for bad input, with a one-line error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except REPORTED as error:
        if getattr(args, "debug", False):
            raise
        return report(error, parser.prog)
