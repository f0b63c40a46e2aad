"""``edgefleet-agent``: run the daemon, check a config, print the config's JSON Schema.

Exit codes: 0 ok, 1 the agent failed to start or stopped on an error, 2 an
invalid config or command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .limits import is_out_of_memory, out_of_memory_line

try:  # the first thing to fail under a small memory limit: say so in one line
    from edgefleet.runtime import EdgefleetError

    from .app import AGENT_VERSION, Agent
    from .config import (
        ConfigError,
        StreamSettings,
        check_config,
        json_schema,
        key_file_problems,
        load_config,
    )
    from .logs import configure_logging
    from .schemadoc import reference_markdown
    from .sources import mask_credentials
except (MemoryError, ImportError, OSError) as _exc:
    if not is_out_of_memory(_exc):
        raise
    sys.exit(f"edgefleet-agent: cannot start: {out_of_memory_line()}")

log = logging.getLogger(__name__)

_SWITCH_INTERVAL_S = 0.001
REFERENCE_TITLE = "Agent configuration reference"
REFERENCE_INTRO = (
    "Every field of the agent's config file (`/etc/edgefleet/agent/agent.yaml`), generated "
    "from its schema by `edgefleet-agent schema --markdown`: do not edit by hand. What the "
    "settings do together, with examples: [configuration.md](configuration.md)."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``edgefleet-agent`` argument parser; ``-v`` goes before or after the command."""
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent", description="The edgefleet device daemon."
    )
    parser.add_argument("--version", action="version", version=AGENT_VERSION)
    _add_verbose(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent", description="Run the agent.")
    _add_config(run)
    check = commands.add_parser(
        "check-config",
        help="check a config file and what it names, then exit",
        description="Check a config file: every schema problem, and that each model loads "
        "(inspected, not run), each label file reads, each file or folder source and camera "
        "exists, each TLS file is there. Prints 'ok' or every problem at once (exit 2).",
    )
    _add_config(check)
    schema = commands.add_parser("schema", help="print the JSON Schema of the config file")
    schema.add_argument(
        "--markdown",
        action="store_true",
        help="print the reference of every field in Markdown (docs/agent-config-reference.md; "
        "default: the JSON Schema)",
    )
    for sub in (run, check, schema):
        _add_verbose(sub, default=argparse.SUPPRESS)  # after the command: same flag
        sub.set_defaults(command_parser=sub)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log at DEBUG level whatever logging.level says; check-config also lists what "
        "it checked (default: off)",
    )


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        metavar="FILE",
        help="the YAML config file (no default: required, here or as the argument)",
    )
    parser.add_argument(
        "config_file",
        nargs="?",
        type=Path,
        metavar="FILE",
        help="the config file, as with --config (kept for older scripts)",
    )


def _config_path(args: argparse.Namespace) -> Path:
    parser: argparse.ArgumentParser = args.command_parser
    given: list[Path] = [p for p in (args.config, args.config_file) if p is not None]
    if not given:
        parser.error("the config file is required: --config FILE")
    if len(given) == 2 and given[0] != given[1]:
        parser.error(f"two config files given ({given[0]} and {given[1]}): pass one")
    return given[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgefleet-agent`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "schema":
        if args.markdown:
            sys.stdout.write(
                reference_markdown(json_schema(), title=REFERENCE_TITLE, intro=REFERENCE_INTRO)
            )
        else:
            print(json.dumps(json_schema(), indent=2))
        return 0
    path = _config_path(args)
    if args.command == "check-config":
        return _check(path, verbose=args.verbose)
    return _run(path, verbose=args.verbose)


def _report(exc: ConfigError) -> int:
    print(f"{exc.message}\n  what to do: {exc.hint}", file=sys.stderr)
    return 2


def _check(path: Path, *, verbose: bool) -> int:
    try:
        config = check_config(path)
    except ConfigError as exc:
        return _report(exc)
    print(f"{path}: ok ({len(config.streams)} stream(s), device {config.device_id})")
    if verbose:
        for stream in config.streams:
            print(f"  stream {stream.name}: model {stream.model.path}, {_describe(stream)}")
    return 0


def _describe(stream: StreamSettings) -> str:
    source = stream.source
    where = getattr(source, "path", None) or getattr(source, "folder", None)
    where = where or getattr(source, "device", None) or getattr(source, "url", None)
    return f"{source.type} source" + (f" {mask_credentials(str(where))}" if where else "")


def _run(path: Path, *, verbose: bool) -> int:
    try:
        config = load_config(path)
        exposed = key_file_problems(config)
        if exposed:  # before anything reads the key: refuse a key others may have copied
            raise ConfigError(str(path), exposed)
    except ConfigError as exc:
        return _report(exc)
    level = "DEBUG" if verbose else config.logging.level
    configure_logging(level, journald=config.logging.journald)
    # The inference thread needs the GIL back right after each invoke; the default 5 ms
    # switch interval let the events and MQTT threads hold it longer (measured: the gap
    # between invokes fell from 0.96 to 0.78 ms per frame on the kite video at 1 ms).
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    try:
        agent = Agent(config, config_path=path)
        return agent.run()
    except ConfigError as exc:  # found at start (a certificate for another device id)
        log.critical("agent cannot start: %s", exc)
        return 2
    except EdgefleetError as exc:
        log.critical("agent cannot start: %s", exc)
        return 1
    except MemoryError:  # one line naming the limit; a traceback would only hide it
        log.critical("agent stopped: %s", out_of_memory_line())
        return 1
