"""The operator profile: which broker the operator commands talk to, and as whom.

One YAML file holds what every broker command would otherwise repeat (``deploy``,
``cmd``, ``watch``, ``transfer``)::

    # ~/.config/edgefleet/operator.yaml ($XDG_CONFIG_HOME/edgefleet/operator.yaml)
    host: broker.lan
    port: 8883
    topic_root: edgefleet/v1
    cafile: ca/ca.crt                       # relative paths: against this file's folder
    certfile: operators/controller.crt
    keyfile: operators/controller.key

``edgefleet provision init DIR`` writes one as ``DIR/operator.yaml`` (absolute paths).
Each field resolves on its own, first found wins: a flag (``--host``, ``--port``,
``--topic-root``, ``--cafile``, ``--cert``, ``--key``, ``--insecure``), then an
environment variable (:data:`ENV_VARIABLES`), then the profile file (``--profile FILE``,
else ``$EDGEFLEET_PROFILE``, else the default place when a file is there), then the
defaults of :class:`OperatorProfile`. ``edgefleet profile show`` prints the result and
where each value came from.

Without a CA, a certificate and a key the commands refuse to connect (exit 2) unless
``insecure`` is set: the plain, unauthenticated connection of a lab broker, warned about
on every run (``edgefleet.ops.connection``).

Errors::

    SettingError (bad input, exit 2)
    └── ProfileError     a profile file, variable or flag that does not hold, or no TLS

Pure except for reading the profile file; no threads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.agent.protocol import TOPIC_ROOT
from edgefleet.runtime import SettingError

DEFAULT_HOST = "localhost"
TLS_PORT = 8883
PLAIN_PORT = 1883
PROFILE_ENV = "EDGEFLEET_PROFILE"
PROFILE_NAME = "edgefleet/operator.yaml"
ENV_VARIABLES: Mapping[str, str] = {
    "host": "EDGEFLEET_HOST",
    "port": "EDGEFLEET_PORT",
    "topic_root": "EDGEFLEET_TOPIC_ROOT",
    "cafile": "EDGEFLEET_CAFILE",
    "certfile": "EDGEFLEET_CERTFILE",
    "keyfile": "EDGEFLEET_KEYFILE",
    "insecure": "EDGEFLEET_INSECURE",
    "controller": "EDGEFLEET_CONTROLLER",
    "controller_cafile": "EDGEFLEET_CONTROLLER_CAFILE",
    "token_file": "EDGEFLEET_TOKEN_FILE",
}
"""The variable that sets each field, between the flags and the profile file."""
FLAGS: Mapping[str, str] = {
    "host": "--host",
    "port": "--port",
    "topic_root": "--topic-root",
    "cafile": "--cafile",
    "certfile": "--cert",
    "keyfile": "--key",
    "insecure": "--insecure",
    "controller": "--controller",
    "controller_cafile": "--controller-cafile",
    "token_file": "--token-file",
}
"""The flag that sets each field (the argparse ``dest`` is the field's name)."""
DEFAULT = "default"
_TLS_FIELDS = ("cafile", "certfile", "keyfile")
_PATH_FIELDS = (*_TLS_FIELDS, "controller_cafile", "token_file")
GET_A_PROFILE = (
    "'edgefleet provision init DIR' writes DIR/operator.yaml: copy it to "
    "~/.config/edgefleet/operator.yaml or pass --profile DIR/operator.yaml (or give --cafile, "
    "--cert and --key); for a lab broker without TLS pass --insecure"
)


class ProfileError(SettingError):
    """The operator profile does not hold: a file, variable or flag, or no TLS at all."""


class OperatorProfile(BaseModel):
    """How the operator commands reach the broker: address, topic root, TLS identity."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        DEFAULT_HOST,
        min_length=1,
        description="Broker host name or address; with TLS, a name in the broker's certificate.",
    )
    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=f"Broker port (default {TLS_PORT}, the TLS listener; {PLAIN_PORT} when "
        "insecure).",
    )
    topic_root: str = Field(
        TOPIC_ROOT, min_length=1, description="Topic root the fleet's devices use."
    )
    cafile: Path | None = Field(
        None, description="CA certificate the broker's certificate must chain to (PEM)."
    )
    certfile: Path | None = Field(
        None, description="The operator's client certificate (PEM), e.g. the controller's."
    )
    keyfile: Path | None = Field(None, description="The private key of certfile (PEM, 0600).")
    insecure: bool = Field(
        False,
        description="Plain MQTT without TLS or a client certificate (a lab broker only).",
    )
    controller: str | None = Field(
        None,
        pattern=r"^https?://[^/\s]+/?$",
        description="The controller's API, e.g. https://controller.lan:8443 (the devices, "
        "audit, rollout and fleet-wide cmd commands).",
    )
    controller_cafile: Path | None = Field(
        None,
        description="CA certificate the controller's HTTPS certificate chains to (default: "
        "cafile). The client certificate, if any, is certfile and keyfile.",
    )
    token_file: Path | None = Field(
        None,
        description="A file holding a bearer token for the controller's API (instead of the "
        "client certificate; $EDGEFLEET_TOKEN gives the token itself).",
    )

    @field_validator("topic_root")
    @classmethod
    def _no_wildcards(cls, value: str) -> str:
        if set(value) & {"+", "#"} or value.startswith("/") or value.endswith("/"):
            raise ValueError("a topic root has no wildcards (+, #) and no leading or trailing /")
        return value

    @property
    def broker_port(self) -> int:
        """The port to connect to: the one given, else the default of the transport."""
        if self.port is not None:
            return self.port
        return PLAIN_PORT if self.insecure else TLS_PORT

    @property
    def address(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.broker_port}"


@dataclass(frozen=True)
class ResolvedProfile:
    """An operator profile and where each of its values came from."""

    profile: OperatorProfile
    sources: dict[str, str] = field(default_factory=dict)  # field -> flag, variable, file
    file: Path | None = None  # the profile file read, if any

    def source(self, name: str) -> str:
        """Where field ``name`` came from: a flag, a variable, a file, or ``default``."""
        return self.sources.get(name, DEFAULT)

    def named(self, name: str) -> str:
        """Field ``name`` with its source, for a message: ``cafile (from --cafile)``."""
        return f"{name} (from {self.source(name)})"

    def check_transport(self) -> None:
        """Raise :class:`ProfileError` unless TLS has every file or ``insecure`` is set."""
        p = self.profile
        if p.insecure:
            return
        missing = [name for name in _TLS_FIELDS if getattr(p, name) is None]
        if len(missing) == len(_TLS_FIELDS):
            where = f" (profile {self.file})" if self.file else " (no profile file)"
            raise ProfileError(
                f"no TLS certificates to connect to the broker with{where}: the operator "
                "commands connect with TLS and a client certificate",
                hint=GET_A_PROFILE,
            )
        if missing:
            given = ", ".join(self.named(n) for n in _TLS_FIELDS if n not in missing)
            raise ProfileError(
                f"TLS needs cafile, certfile and keyfile; {', '.join(missing)} missing "
                f"(given: {given})",
                hint="give the missing ones (--cafile, --cert, --key, or the profile), or "
                "--insecure for a lab broker without TLS",
            )


def default_profile_path(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/edgefleet/operator.yaml``, else ``~/.config/edgefleet/operator.yaml``."""
    config_home = environ.get("XDG_CONFIG_HOME", "")
    if not config_home or not Path(config_home).is_absolute():  # the XDG spec ignores relative
        config_home = str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(config_home) / PROFILE_NAME


def resolve_profile(
    flags: Mapping[str, Any],
    *,
    profile_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedProfile:
    """The profile from ``flags`` (field -> value, None when not given), the environment,
    the profile file and the defaults, in that order of precedence, field by field."""
    environ = os.environ if environ is None else environ
    path = _profile_path(profile_file, environ)
    given_flags = {name: value for name, value in flags.items() if value is not None}
    flag_values = _checked(given_flags, FLAGS, hint="fix the option")
    layers = [(FLAGS[name], {name: value}) for name, value in flag_values.items()]
    for name, value in _environment(environ).items():
        layers.append((ENV_VARIABLES[name], {name: value}))
    file_values = _read_profile(path) if path is not None else None
    if file_values is not None and path is not None:
        layers += [(str(path), {name: value}) for name, value in file_values.items()]
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, values in layers:
        for name, value in values.items():
            if name not in merged:
                merged[name], sources[name] = value, source
    profile = OperatorProfile.model_validate(merged)  # each layer was validated on its own
    return ResolvedProfile(profile, sources, path if file_values is not None else None)


def _profile_path(profile_file: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The profile file to read: one asked for (it must exist), else the default if there."""
    if profile_file is not None:
        return profile_file
    if environ.get(PROFILE_ENV):
        return Path(environ[PROFILE_ENV])
    default = default_profile_path(environ)
    return default if default.exists() else None


def _environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields the ``EDGEFLEET_*`` variables set, validated; empty ones are unset."""
    given = {name: environ[var] for name, var in ENV_VARIABLES.items() if environ.get(var)}
    return _checked(given, ENV_VARIABLES, where="environment: ", hint="fix or unset the variable")


def _checked(
    given: dict[str, Any], names: Mapping[str, str], *, where: str = "", hint: str = ""
) -> dict[str, Any]:
    """``given`` validated as profile fields; a problem names the flag or variable."""
    try:
        checked = OperatorProfile.model_validate(given)
    except ValidationError as exc:
        raise ProfileError(f"{where}{_problems(exc, names=names)}", hint=hint) from None
    return {name: getattr(checked, name) for name in given}


def _read_profile(path: Path) -> dict[str, Any]:
    """The fields the profile file at ``path`` sets, relative paths made absolute."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file", hint=GET_A_PROFILE) from None
    except OSError as exc:
        raise ProfileError(
            f"cannot read the profile {path}: {exc.strerror or exc}",
            hint="check the file's permissions",
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(
            f"{path}: not valid YAML ({str(exc).splitlines()[0]})",
            hint=f"fix the file; its fields: {', '.join(OperatorProfile.model_fields)}",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(
            f"{path}: a profile is a mapping of fields (host, port, ...), not a "
            f"{type(data).__name__}",
            hint="write it as 'host: broker.lan' lines",
        )
    try:
        checked = OperatorProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(
            f"{path}: {_problems(exc)}",
            hint=f"the fields: {', '.join(OperatorProfile.model_fields)}",
        ) from None
    base = path.resolve().parent
    values = {name: getattr(checked, name) for name in data}
    for name in _PATH_FIELDS:
        value = values.get(name)
        if isinstance(value, Path) and not value.expanduser().is_absolute():
            values[name] = base / value
        elif isinstance(value, Path):
            values[name] = value.expanduser()
    return values


def _problems(exc: ValidationError, *, names: Mapping[str, str] | None = None) -> str:
    """Each problem as ``field: reason`` (``names`` renames the field)."""
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if names and loc and loc[0] in names:
            loc[0] = names[loc[0]]
        reason = error["msg"]
        if error["type"] == "extra_forbidden":
            reason = "unknown field (check the spelling)"
        parts.append(f"{'.'.join(loc) or '(top level)'}: {reason}")
    return "; ".join(parts)


# -- the broker options of every command that connects ----------------------------------


def add_certificate_options(group: Any) -> None:
    """``--cert`` and ``--key``: the operator's client certificate (broker and controller)."""
    group.add_argument(
        "--cert",
        dest="certfile",
        type=Path,
        metavar="FILE",
        help="the operator's client certificate (default: from the profile)",
    )
    group.add_argument(
        "--key",
        dest="keyfile",
        type=Path,
        metavar="FILE",
        help="the client certificate's private key (default: from the profile)",
    )


def add_profile_option(group: Any) -> None:
    """``--profile FILE``, the same in every command that reads the operator profile."""
    group.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help=f"operator profile (default: ${PROFILE_ENV}, else "
        f"$XDG_CONFIG_HOME/{PROFILE_NAME} if there)",
    )


def add_broker_options(parser: argparse.ArgumentParser) -> None:
    """``--profile`` and the fields' flags, the same in every broker command.

    Every default is None (not given): :func:`broker_profile` fills in the rest.
    """
    group = parser.add_argument_group(
        "broker connection",
        "flags beat the EDGEFLEET_* variables, which beat the profile file "
        "('edgefleet profile show' prints what applies)",
    )
    add_profile_option(group)
    group.add_argument(
        "--host",
        help=f"broker host name or address (default: from the profile, else {DEFAULT_HOST})",
    )
    group.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help=f"broker port (default: from the profile, else {TLS_PORT}; {PLAIN_PORT} with "
        "--insecure)",
    )
    group.add_argument(
        "--topic-root",
        metavar="ROOT",
        help=f"topic root (default: from the profile, else {TOPIC_ROOT})",
    )
    group.add_argument(
        "--cafile",
        type=Path,
        metavar="FILE",
        help="CA certificate the broker's certificate chains to (default: from the profile)",
    )
    add_certificate_options(group)
    group.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plain MQTT without TLS or a client certificate, for a lab broker "
        "(default: TLS; warns on every run)",
    )


def broker_profile(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ResolvedProfile:
    """The profile the options in ``args`` (from :func:`add_broker_options`) resolve to."""
    flags = {name: getattr(args, name, None) for name in FLAGS}
    return resolve_profile(flags, profile_file=args.profile, environ=environ)


def broker_options(args: argparse.Namespace) -> str:
    """The broker options given in ``args``, as typed on a command line, for a next step to
    print: the rest comes from the same environment and profile file."""
    options = []
    for name, flag in FLAGS.items():
        value = getattr(args, name, None)
        if value is True:
            options.append(flag)
        elif value is not None:
            options.append(f"{flag} {shlex.quote(str(value))}")
    if args.profile is not None:
        options.append(f"--profile {shlex.quote(str(args.profile))}")
    return " ".join(options)


# -- edgefleet profile show -------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``profile show`` to the top-level command parser."""
    profile = subcommands.add_parser(
        "profile",
        help="the operator profile: which broker, with which certificate",
        description="The operator profile the broker commands connect with.",
    )
    commands = profile.add_subparsers(dest="profile_command", required=True, metavar="COMMAND")
    show = commands.add_parser(
        "show",
        help="print the resolved profile and where each value came from",
        description="Print the profile the broker commands would use (flags, then "
        f"{', '.join(ENV_VARIABLES.values())}, then the profile file, then defaults) and "
        "where each value came from.",
    )
    add_broker_options(show)
    from .apiclient import add_controller_fields

    add_controller_fields(show.add_argument_group("controller connection"))
    show.set_defaults(handler=_show)


def describe(resolved: ResolvedProfile, environ: Mapping[str, str] | None = None) -> list[str]:
    """The lines ``profile show`` prints. Pure."""
    environ = os.environ if environ is None else environ
    p = resolved.profile
    if resolved.file is not None:
        lines = [f"{'profile':<17} {resolved.file}"]
    else:
        lines = [f"{'profile':<17} none ({default_profile_path(environ)} is not there)"]
    for name in OperatorProfile.model_fields:
        value = p.broker_port if name == "port" else getattr(p, name)
        shown = "-" if value is None else str(value).lower() if isinstance(value, bool) else value
        lines.append(f"{name:<17} {shown!s:<40} {resolved.source(name)}")
    try:
        resolved.check_transport()
    except ProfileError as exc:
        lines.append(f"{'connects':<17} not at all: {exc.message}")
    else:
        how = "plain MQTT, no TLS (insecure)" if p.insecure else "mutual TLS"
        lines.append(f"{'connects':<17} {how} to {p.address}")
    return lines


def _show(args: argparse.Namespace) -> int:
    for line in describe(broker_profile(args)):
        print(line)
    sys.stdout.flush()
    return 0
