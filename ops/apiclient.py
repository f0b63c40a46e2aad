"""The operator commands' client of the controller's HTTP API (``devices``, ``audit``,
``rollout``, fleet-wide ``cmd``).

Where the controller is and who the operator is come from the operator profile
(``edgefleet.ops.profile``), field by field as for the broker: ``--controller URL``
(``$EDGEFLEET_CONTROLLER``, the profile's ``controller``); the caller is either a bearer
token (``$EDGEFLEET_TOKEN``, else the first line of ``--token-file``) or, without one, the
profile's client certificate (``certfile``/``keyfile``, mTLS). An ``https://`` controller's
certificate must chain to ``controller_cafile`` (default: the profile's ``cafile``).

Answers: a 2xx body is returned parsed. Every error body is ``{"code", "message"}``
(``edgefleet.ops.controller.api``) and becomes one of the CLI's errors, with its exit code::

    SettingError (exit 2)
    ├── ApiRejected     400, 404, 422: the request does not hold (an unknown device, ...)
    └── ApiUnauthorized 401, 403: no token or certificate, or one the controller refuses
    Refused (exit 3)
    └── ApiRefused      409: checked, it would not work (a rollout that overlaps, ...)
    EnvironmentProblem (exit 1)
    └── ControllerError unreachable, too slow, 5xx, or an answer that is not the API's

httpx is imported when a client is made, so the CLI starts without the [controller] extra.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from edgefleet.agent.protocol import describe_errors
from edgefleet.runtime import EnvironmentProblem, SettingError

from .errors import Refused
from .profile import (
    ProfileError,
    ResolvedProfile,
    add_certificate_options,
    add_profile_option,
    broker_profile,
)

if TYPE_CHECKING:
    import httpx

TOKEN_ENV = "EDGEFLEET_TOKEN"
DEFAULT_TIMEOUT_S = 30.0
_NO_CONTROLLER = (
    "give --controller https://HOST:8443, or set EDGEFLEET_CONTROLLER, or write "
    "'controller: https://HOST:8443' in the operator profile"
)


class ApiRejected(SettingError):
    """The controller answered 400, 404 or 422: the request does not hold."""


class ApiUnauthorized(SettingError):
    """The controller answered 401 or 403: no credentials, or ones it refuses."""


class ApiRefused(Refused):
    """The controller answered 409: checked, it would not work; nothing changed."""


class ControllerError(EnvironmentProblem):
    """The controller is unreachable, too slow, failed (5xx), or answered off the API."""


def add_controller_options(parser: argparse.ArgumentParser) -> None:
    """``--profile``, the controller's flags, and the client certificate's.

    Every default is None (not given): :func:`controller_client` fills in the rest from
    the environment and the profile file.
    """
    group = parser.add_argument_group(
        "controller connection",
        "flags beat the EDGEFLEET_* variables, which beat the profile file "
        "('edgefleet profile show' prints what applies)",
    )
    add_profile_option(group)
    add_controller_fields(group)
    add_certificate_options(group)


def add_controller_fields(group: Any) -> None:
    """``--controller``, ``--token-file`` and ``--controller-cafile`` (``profile show`` too)."""
    group.add_argument(
        "--controller",
        metavar="URL",
        help="the controller's API, e.g. https://HOST:8443 (default: $EDGEFLEET_CONTROLLER, "
        "else the profile's controller)",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"a bearer token's file (default: ${TOKEN_ENV}, else the client certificate)",
    )
    group.add_argument(
        "--controller-cafile",
        type=Path,
        metavar="FILE",
        help="CA the controller's certificate chains to (default: the profile's cafile)",
    )


class ControllerClient:
    """Calls to one controller's API; each returns the answer's JSON or raises."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            verify=ssl_context if ssl_context is not None else True,
            timeout=timeout_s,
        )

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET ``path`` with query ``params`` (a list value repeats the parameter)."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, *, timeout_s: float | None = None) -> Any:
        """POST ``body`` as JSON to ``path``."""
        return self.request("POST", path, body=body, timeout_s=timeout_s)

    def put(self, path: str, body: Any = None) -> Any:
        """PUT ``body`` as JSON to ``path``."""
        return self.request("PUT", path, body=body)

    def delete(self, path: str) -> Any:
        """DELETE ``path``."""
        return self.request("DELETE", path)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One call; the parsed JSON of a 2xx answer, else the error it maps to."""
        import httpx

        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            answer = self._http.request(
                method, path, params=params, json=body if body is not None else None, **extra
            )
        except httpx.TimeoutException as exc:
            raise ControllerError(
                f"the controller at {self.url} did not answer {method} {path} in time",
                hint="check that 'edgefleet controller run' is up and not overloaded",
            ) from exc
        except httpx.HTTPError as exc:
            raise ControllerError(
                f"cannot reach the controller at {self.url}: {exc}",
                hint="check the URL, that the controller runs, and its certificate",
            ) from exc
        return _answer(answer, method, path)


def _answer(answer: httpx.Response, method: str, path: str) -> Any:
    code, message = _error_body(answer)
    status = answer.status_code
    if status < 300:
        try:
            return answer.json() if answer.content else None
        except ValueError as exc:
            raise ControllerError(
                f"{method} {path}: the answer is not JSON", hint="is the URL the controller's?"
            ) from exc
    what = f"{method} {path}: {message} ({code}, HTTP {status})"
    if status in (401, 403):
        raise ApiUnauthorized(
            what,
            hint=f"set {TOKEN_ENV} or --token-file ('edgefleet controller token NAME' makes "
            "one), or give the operator's client certificate with an https controller",
        )
    if status == 409:
        raise ApiRefused(what)
    if status in (400, 404, 422):
        raise ApiRejected(what)
    raise ControllerError(what, hint="the controller's log says more")


def _error_body(answer: httpx.Response) -> tuple[str, str]:
    if answer.status_code < 300:
        return "", ""
    try:
        body = answer.json()
        return str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        return "not_the_api", answer.text[:200] or answer.reason_phrase


def parse_answer(kind: Any, answer: Any, what: str) -> Any:
    """``answer`` validated as ``kind`` (a model, or ``list[Model]``), else a
    :class:`ControllerError` naming ``what`` did not parse."""
    try:
        return TypeAdapter(kind).validate_python(answer)
    except ValidationError as exc:
        raise ControllerError(
            f"the controller's {what} does not parse ({describe_errors(exc)})",
            hint="is the URL the controller's, and of the same edgefleet version?",
        ) from exc


def controller_client(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ControllerClient:
    """The client the options in ``args`` (:func:`add_controller_options`) resolve to."""
    environ = os.environ if environ is None else environ
    resolved = broker_profile(args, environ)
    return client_for(resolved, environ)


def client_for(resolved: ResolvedProfile, environ: Mapping[str, str]) -> ControllerClient:
    """The client for a resolved profile (its controller, token or certificate)."""
    p = resolved.profile
    if p.controller is None:
        raise ProfileError("no controller is set", hint=_NO_CONTROLLER)
    token = environ.get(TOKEN_ENV) or (_read_token(p.token_file) if p.token_file else None)
    context = None
    if p.controller.startswith("https://"):
        context = _tls_context(resolved, with_certificate=token is None)
    elif token is None:
        raise ProfileError(
            f"controller {p.controller} is plain HTTP, so there is no client certificate: "
            "a bearer token is needed",
            hint=f"set {TOKEN_ENV} or --token-file, or use the controller's https:// URL",
        )
    return ControllerClient(p.controller, token=token, ssl_context=context)


def _read_token(path: Path) -> str:
    try:
        lines = path.read_text().split()
    except OSError as exc:
        raise ProfileError(
            f"cannot read the token file {path}: {exc.strerror or exc}",
            hint="'edgefleet controller token NAME' prints a token: save it in the file",
        ) from exc
    if not lines:
        raise ProfileError(f"the token file {path} is empty", hint="write the token in it")
    return lines[0]


def _tls_context(resolved: ResolvedProfile, *, with_certificate: bool) -> ssl.SSLContext:
    p = resolved.profile
    cafile = p.controller_cafile or p.cafile
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        if with_certificate:
            if p.certfile is None or p.keyfile is None:
                raise ProfileError(
                    "no bearer token and no client certificate for the controller",
                    hint=f"set {TOKEN_ENV} or --token-file, or give --cert and --key",
                )
            context.load_cert_chain(str(p.certfile), str(p.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ProfileError(
            f"cannot load the controller's TLS files ({exc})",
            hint="check controller_cafile/cafile, certfile and keyfile in 'edgefleet profile show'",
        ) from exc
    return context
