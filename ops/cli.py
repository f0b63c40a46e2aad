"""``edgefleet``: the operator's command line.

Errors print as one ``edgefleet: error: ...`` line and a ``what to do:`` line, never a
traceback. Exit codes, the same in every command (``edgefleet.ops.errors``): 0 done; 1 the
environment, the broker or a device failed; 2 bad input (an option, a missing file, a file
that is not a model, key or manifest; argparse's usage errors too); 3 refused: checked and
it would not work, nothing changed (``deploy`` without ``--force``, ``manifest verify``).

``-v`` (DEBUG logging) goes before or after the command: every command's parser takes it.
Every option's help states its default: ``HelpFormatter`` adds ``(default: ...)`` where
the text does not say it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from importlib import metadata

from edgefleet.runtime import EdgefleetError
from edgefleet.runtime.cli import register as register_model_commands
from edgefleet.runtime.cli import report_error

from . import (
    broker,
    commands,
    deploy,
    devices,
    enroll,
    fleet,
    keys,
    profile,
    provision,
    release,
    rollout,
    watch,
)
from .controller import cli as controller_cli
from .errors import exit_code

_INTERRUPTED = 130
_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool the signal ended


class HelpFormatter(argparse.HelpFormatter):
    """``(default: X)`` after an option's help that does not name it; text of several lines
    (a list of commands in an epilog) kept as written, one-line text wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (
            text is not None
            and action.option_strings
            and "default" not in text
            and action.default not in (None, False, [], argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The full ``edgefleet`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description="Run TensorFlow Lite models on fleets of edge boards.",
        epilog="'edgefleet COMMAND --help' describes each command.\n"
        "exit status, the same in every command: 0 done; 1 the environment, the broker or a\n"
        "device failed; 2 bad input (an option, a missing file, a file that is not a model,\n"
        "key or manifest); 3 refused: checked, it would not work, nothing changed\n"
        "(deploy without --force, manifest verify)",
    )
    parser.add_argument("--version", action="version", version=metadata.version("edgefleet"))
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG level (default: WARNING)"
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_model_commands(subcommands)
    broker.register(subcommands)
    watch.register(subcommands)
    keys.register(subcommands)
    fleet.register(subcommands)
    deploy.register(subcommands)
    commands.register(subcommands)
    profile.register(subcommands)
    enroll.register(subcommands)
    provision.register(subcommands)
    release.register(subcommands)
    rollout.register(subcommands)
    devices.register(subcommands)
    controller_cli.register(subcommands)
    for sub in _subparsers(parser):
        # SUPPRESS: given before the command, -v is not reset by the command's parser.
        sub.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log at DEBUG level (default: WARNING)",
        )
    for each in (parser, *_subparsers(parser)):
        each.formatter_class = HelpFormatter
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command's parser under ``parser``, at every depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield sub
                yield from _subparsers(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgefleet`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except EdgefleetError as exc:
        report_error(exc)
        return exit_code(exc)
    except KeyboardInterrupt:
        return _INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`edgefleet model run ... | head`): stop quietly, as a tool
        # killed by SIGPIPE would, and keep Python from complaining while it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
