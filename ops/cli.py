"""``edgefleet``: the operator's command line.

Errors from edgefleet print as one ``edgefleet: error: ...`` line with what to
do, and exit 1; usage errors exit 2 (argparse), and so does bad input to the
fleet commands (``keys``, ``manifest``, ``deploy``, ``cmd``: see ``fleet``).
No traceback for any.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import metadata

from edgefleet.runtime import EdgefleetError
from edgefleet.runtime.cli import register as register_model_commands
from edgefleet.runtime.cli import report_error

from . import broker, fleet, watch


def build_parser() -> argparse.ArgumentParser:
    """The full ``edgefleet`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="edgefleet", description="Run TensorFlow Lite models on fleets of edge boards."
    )
    parser.add_argument("--version", action="version", version=metadata.version("edgefleet"))
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_model_commands(commands)
    broker.register(commands)
    watch.register(commands)
    fleet.register(commands)
    return parser


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
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
