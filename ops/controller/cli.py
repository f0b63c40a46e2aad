"""``edgefleet controller run|openapi|token``: the controller service's commands.

- ``run --config FILE`` starts the service (``service.py``), prints where it listens, and
  serves until SIGTERM or SIGINT, then stops in order and exits 0;
- ``openapi [--output FILE]`` prints (or writes) the API's OpenAPI document;
- ``schema [--markdown]`` prints the config file's JSON Schema, or its reference in Markdown
  (docs/controller-config-reference.md);
- ``token NAME --tokens-file FILE`` makes a bearer token, prints it once, and appends its
  sha256 and NAME to the tokens file (which never holds a token).

The service's modules (FastAPI, uvicorn) are imported when a command runs, so the CLI
starts on a machine without the [controller] extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from edgefleet.runtime import SettingError

_TOKEN_BYTES = 32


def register(subcommands: Any) -> None:
    """Add ``controller run|openapi|schema|token`` to the top-level command parser."""
    controller = subcommands.add_parser(
        "controller",
        help="the fleet controller service and its HTTP API",
        description="The fleet controller: registry, releases, rollouts and the HTTP API.",
    )
    commands = controller.add_subparsers(
        dest="controller_command", required=True, metavar="COMMAND"
    )
    run = commands.add_parser(
        "run",
        help="run the controller until SIGTERM",
        description="Open the database, follow the fleet through the broker, serve the HTTP "
        "API; SIGTERM or SIGINT stop it (exit 0).",
    )
    run.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="the controller's YAML config"
    )
    run.set_defaults(handler=_run)
    openapi = commands.add_parser(
        "openapi",
        help="print the HTTP API's OpenAPI document",
        description="Print the OpenAPI document of the controller's HTTP API (JSON).",
    )
    openapi.add_argument(
        "--output", type=Path, metavar="FILE", help="write it here (default: standard output)"
    )
    openapi.set_defaults(handler=_openapi)
    schema = commands.add_parser("schema", help="print the JSON Schema of the config file")
    schema.add_argument(
        "--markdown",
        action="store_true",
        help="print the reference of every field in Markdown "
        "(docs/controller-config-reference.md; default: the JSON Schema)",
    )
    schema.set_defaults(handler=_schema)
    token = commands.add_parser(
        "token",
        help="make a bearer token for the HTTP API",
        description="Make a random bearer token, print it once, and append its sha256 with "
        "NAME (the caller's identity in the audit log) to the tokens file.",
    )
    token.add_argument("name", metavar="NAME", help="who uses the token (letters, digits, _.@-)")
    token.add_argument(
        "--tokens-file", type=Path, required=True, metavar="FILE", help="http.tokens_file"
    )
    token.set_defaults(handler=_token)


def openapi_text() -> str:
    """The OpenAPI document as docs/openapi.json holds it."""
    from .api import openapi_document

    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def _openapi(args: argparse.Namespace) -> int:
    text = openapi_text()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


def schema_markdown() -> str:
    """The config file's reference as docs/controller-config-reference.md holds it."""
    from edgefleet.agent.schemadoc import reference_markdown

    from .service import ControllerConfig

    return reference_markdown(
        ControllerConfig.model_json_schema(),
        title="Controller configuration reference",
        intro="Every field of the controller's config file (`/etc/edgefleet/controller.yaml`), "
        "generated from its schema by `edgefleet controller schema --markdown`: do not edit "
        "by hand. What the settings do together: "
        "[configuration.md](configuration.md#controller).",
    )


def _schema(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(schema_markdown())
    else:
        from .service import ControllerConfig

        print(json.dumps(ControllerConfig.model_json_schema(), indent=2))
    return 0


def _token(args: argparse.Namespace) -> int:
    from .service import _TOKEN_LINE, hash_token, read_tokens

    token = secrets.token_urlsafe(_TOKEN_BYTES)
    line = f"{hash_token(token)} {args.name}"
    if not _TOKEN_LINE.match(line):
        raise SettingError(
            f"token name {args.name!r}: 1 to 64 letters, digits and _ . @ -",
            hint="pick another name",
        )
    if args.tokens_file.exists():
        read_tokens(args.tokens_file)  # refuse to append to a file that does not hold
    descriptor = os.open(args.tokens_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as file:
        file.write(line + "\n")
    print(token)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .service import ControllerService, load_config

    if not getattr(args, "verbose", False):
        # A service tells its story at INFO (the other commands warn only). On the root
        # logger, which the command line configured, not on a logger of ours for good.
        logging.getLogger().setLevel(logging.INFO)
    config = load_config(args.config)
    service = ControllerService(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        service.stop_event.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    service.run(on_started=lambda: print(service.describe(), flush=True))
    return 0
