"""The controller's HTTP API (FastAPI): devices, groups, releases, artifacts, audit.

Routes (``docs/openapi.json`` is the generated document, checked fresh by a test)::

    GET    /devices                     ?state=&selector= (several selectors unite)
    GET    /devices/{id}
    PUT    /devices/{id}/tags/{key}     body {"value": ...}
    DELETE /devices/{id}/tags/{key}
    GET    /groups
    PUT    /groups/{name}/devices/{id}  (makes the group when new)
    DELETE /groups/{name}/devices/{id}
    GET    /releases                    ?model_id=
    GET    /releases/{id}               MODEL_ID@VERSION
    GET    /audit                       ?limit=
    GET    /artifacts/{sha256}          (artifacts.py; no authentication: see below)
    ...    /rollouts                    (rollouts_api.py)
    POST   /commands                    (fanout.py)

The rollouts and commands routers live in their own modules and get the same
authentication and error bodies: their handlers take :data:`CallerDep`
(the caller, or 401), :data:`SessionDep` (a session in the request's transaction) or
:data:`ContextDep`, record writes with :func:`audited`, and raise the controller's own
errors, answered as :func:`error_answer` says (an ``Unknown*`` 404, ``Refused`` 409, ...).

Authentication (:class:`Authenticator`), one of:

- the client certificate, under mTLS: uvicorn verifies it against the operator CA
  (``ssl_cert_reqs=CERT_REQUIRED``) and :class:`TlsScopeProtocol` puts its subject in the
  request scope as the ASGI TLS extension (``scope["extensions"]["tls"]
  ["client_cert_name"]``); the caller is ``cert:<common name>``;
- a bearer token whose sha256 is in the tokens file; the caller is ``token:<name>``.

Anything else is 401. Artifacts need neither: they are content-addressed and devices
verify each against its signed manifest, and the agent's downloader presents no
credentials.

Errors: every error is JSON ``{"code": ..., "message": ...}`` (:class:`ErrorBody`), ours
and the framework's (an unknown path, a wrong method, a query that does not validate), so
no ``{"detail": ...}`` body leaks. Each write records an audit entry with the caller's
identity in the same transaction as the change.

Threads: the handlers are plain functions that FastAPI runs on its worker threads, each
with its own database session (``Database.session()``); the app holds no state of its own.
"""

from __future__ import annotations

import asyncio
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgefleet.agent.protocol import SignedManifest
from edgefleet.ops.errors import Refused
from edgefleet.ops.profile import ResolvedProfile
from edgefleet.runtime import EdgefleetError, EnvironmentProblem, SettingError

from . import registry
from .artifacts import ErrorBody, artifacts_router
from .db import AuditEntry, Database
from .registry import DeviceState, DeviceView
from .releases import ARTIFACTS_PATH, Release, ReleaseStore

log = logging.getLogger(__name__)

__all__ = [
    "ApiContext",
    "ApiError",
    "AuditView",
    "Authenticator",
    "Caller",
    "CallerDep",
    "ContextDep",
    "ErrorBody",
    "ErrorCode",
    "GroupView",
    "ReleaseView",
    "SessionDep",
    "TagValue",
    "TlsScopeProtocol",
    "audited",
    "context",
    "create_app",
    "error_answer",
    "openapi_document",
]

API_TITLE = "edgefleet controller"
API_VERSION = "1"
AUDIT_LIMIT_MAX = 1_000


# -- errors ---------------------------------------------------------------------------------


class ErrorCode(str, Enum):
    """The API's own codes; an error of the controller's modules answers with its class's
    name (:func:`error_answer`), as these do for the registry's and the release store's."""

    UNAUTHENTICATED = "unauthenticated"
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_GROUP = "unknown_group"
    UNKNOWN_RELEASE = "unknown_release"
    UNKNOWN_TAG = "unknown_tag"
    BAD_SELECTOR = "bad_selector"
    BAD_NAME = "bad_name"
    BAD_INPUT = "bad_input"
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal_error"


class ApiError(Exception):
    """An answer other than success: status, code and message."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


def _body(status: int, code: ErrorCode, message: str, headers: Any = None) -> JSONResponse:
    body = ErrorBody(code=code.value, message=message).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def error_answer(exc: EdgefleetError) -> tuple[int, str]:
    """The status and code an error of the controller's modules is answered with.

    The code is the class's name in snake case (``UnknownDevice``: ``unknown_device``), so
    the rollouts' errors need no table here; the base classes answer ``bad_input``,
    ``refused`` and ``unavailable``. Status: an ``Unknown*`` bad input is 404, other bad
    input 400, :class:`~edgefleet.ops.errors.Refused` 409, the environment 503.
    """
    kind = type(exc)
    generic = kind in (EdgefleetError, SettingError, Refused, EnvironmentProblem)
    code = _BASE_CODES.get(kind, "bad_input") if generic else _snake(kind.__name__)
    if isinstance(exc, Refused):
        return 409, code
    if isinstance(exc, EnvironmentProblem):
        return 503, code
    if isinstance(exc, SettingError) and kind.__name__.startswith("Unknown"):
        return 404, code
    return 400, code


_BASE_CODES: dict[type[EdgefleetError], str] = {
    SettingError: ErrorCode.BAD_INPUT.value,
    Refused: ErrorCode.REFUSED.value,
    EnvironmentProblem: ErrorCode.UNAVAILABLE.value,
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _edgefleet_error(exc: EdgefleetError) -> JSONResponse:
    status, code = error_answer(exc)
    if status >= 500:
        log.error("API request failed: %s", exc.message)
    body = ErrorBody(code=code, message=exc.message).model_dump()
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request does not validate"


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _body(exc.status, exc.code, exc.message, exc.headers)

    async def edgefleet_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EdgefleetError)
        return _edgefleet_error(exc)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such resource: {request.method} {request.url.path}"
        return _body(exc.status_code, code, message, exc.headers)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _body(422, ErrorCode.INVALID_REQUEST, _validation_message(exc))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("API request %s %s failed", request.method, request.url.path)
        return _body(500, ErrorCode.INTERNAL, "the controller failed; its log says why")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EdgefleetError, edgefleet_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route (every one an :class:`ErrorBody`)."""
    described = {
        400: "Bad input (a selector, name or value that does not hold).",
        409: "Refused: checked, and it would not work; nothing changed.",
        401: "No valid client certificate or bearer token.",
        404: "No such device, group, tag or release.",
        422: "The request's parameters or body do not validate.",
        503: "The database or the release store cannot be reached.",
    }
    return {s: {"model": ErrorBody, "description": described[s]} for s in (401, 422, *statuses)}


# -- authentication ----------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who made a request, as the audit log records them (``cert:CN`` or ``token:NAME``)."""

    identity: str


@dataclass(frozen=True)
class Authenticator:
    """Which callers the API lets in: bearer tokens by sha256, and/or client certificates."""

    tokens: dict[str, str] = field(default_factory=dict)  # sha256 hex -> name
    client_certificates: bool = False

    def caller(self, scope: Scope, bearer: str | None) -> Caller | None:
        """The caller of a request, or None when it proves no identity."""
        if self.client_certificates:
            name = client_common_name(scope)
            if name is not None:
                return Caller(f"cert:{name}")
        if bearer is not None:
            from .service import hash_token

            name = self.tokens.get(hash_token(bearer))
            if name is not None:
                return Caller(f"token:{name}")
        return None


def client_common_name(scope: Scope) -> str | None:
    """The common name of the verified client certificate of the connection, if any."""
    tls = scope.get("extensions", {}).get("tls") or {}
    subject = tls.get("client_cert_name")
    if not subject or tls.get("client_cert_error"):
        return None
    try:
        names = x509.Name.from_rfc4514_string(subject).get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    return str(names[0].value) if names else None


class TlsScopeProtocol(H11Protocol):
    """uvicorn's h11 protocol, adding the ASGI TLS extension to each request's scope.

    uvicorn verifies the client certificate (``ssl_cert_reqs``) but puts nothing of it in
    the scope; this reads the verified peer certificate once per connection.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Record the connection's TLS facts for every request on it."""
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None
        tls: dict[str, Any] = {
            "server_cert": None,
            "client_cert_chain": [],
            "client_cert_name": subject,
            "client_cert_error": None,
            "tls_version": None,
            "cipher_suite": None,
        }
        self.app = _WithTls(self.app, tls)


class _WithTls:
    """An ASGI app seeing ``tls`` in each HTTP scope's extensions."""

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self.app, self.tls = app, tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = {**scope.get("extensions", {}), "tls": self.tls}
        await self.app({**scope, "extensions": extensions}, receive, send)


_bearer = HTTPBearer(auto_error=False, description="A token whose sha256 is in tokens_file.")


@dataclass(frozen=True)
class ApiContext:
    """What the handlers work on: the database, the release store, who may call."""

    database: Database
    store: ReleaseStore
    authenticator: Authenticator
    broker: ResolvedProfile | None = None
    """How the controller reaches the broker (fleet-wide commands); None: it does not."""


def context(request: Request) -> ApiContext:
    """The app's :class:`ApiContext` (a FastAPI dependency)."""
    found: ApiContext = request.app.state.context
    return found


ContextDep = Annotated[ApiContext, Depends(context)]


def caller(
    request: Request,
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The authenticated caller, or a 401 (a FastAPI dependency)."""
    bearer = credentials.credentials if credentials is not None else None
    found = context.authenticator.caller(request.scope, bearer)
    if found is None:
        raise ApiError(
            401,
            ErrorCode.UNAUTHENTICATED,
            "present the operator's client certificate or a bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return found


CallerDep = Annotated[Caller, Depends(caller)]


def session(context: ContextDep) -> Iterator[Session]:
    """A database session in one transaction for the request (a FastAPI dependency)."""
    with context.database.session() as opened:
        yield opened


# "function": committed before the answer is sent, so a caller that got 200 reads its
# write back, and a commit that fails is the answer (the default ends it after sending).
SessionDep = Annotated[Session, Depends(session, scope="function")]


def audited(
    session: Session,
    who: Caller,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Record a write by ``who`` in ``session``'s transaction (the audit log)."""
    registry.record_audit(
        session, actor=who.identity, action=action, target=target, details=details
    )
    log.info("%s by %s: %s", action, who.identity, target)


# -- response and request models -----------------------------------------------------------


class TagValue(BaseModel):
    """The body of ``PUT /devices/{id}/tags/{key}``."""

    model_config = ConfigDict(extra="forbid")

    value: str = Field(
        pattern=registry.TAG_VALUE_PATTERN,
        description="The tag's value: 1 to 128 of letters, digits and _ . : / @ + -.",
    )


class GroupView(BaseModel):
    """A group and its devices."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Group name.")
    devices: list[str] = Field(description="Ids of its devices, sorted.")


class ReleaseView(BaseModel):
    """A release in the store."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str = Field(description="MODEL_ID@VERSION.")
    model_id: str = Field(description="The model line.")
    version: int = Field(description="Release number within the model line.")
    sha256: str = Field(description="sha256 of the model's bytes.")
    size: int = Field(description="Size of the model in bytes.")
    notes: str = Field(description="The operator's release notes.")
    created_at: float = Field(description="Unix seconds when the release was created.")
    key_id: str = Field(description="The release key that signed the manifest.")
    sequence: int = Field(description="The manifest's sequence in its model line.")
    expires_at: float = Field(description="Unix seconds after which devices refuse it.")
    artifact: str = Field(description="Path of the model's bytes on this server.")
    manifest: SignedManifest = Field(description="The signed manifest devices are given.")

    @classmethod
    def of(cls, release: Release) -> ReleaseView:
        """The view of a stored release."""
        fields = release.model_dump(exclude={"schema_version", "manifest"})
        artifact = f"{ARTIFACTS_PATH}/{release.sha256}"
        return cls(id=release.id, artifact=artifact, manifest=release.manifest, **fields)


class AuditView(BaseModel):
    """One audit entry: who did what to which target, why, when."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(description="Entry number, increasing.")
    at: float = Field(description="Unix seconds.")
    actor: str = Field(description="Who: cert:<common name>, token:<name> or the controller.")
    action: str = Field(description="What, e.g. tag, group.add, rollout.start.")
    target: str = Field(description="On what, e.g. device:cam1, group:shops.")
    reason: str | None = Field(description="Why, when given.")
    details: dict[str, Any] | None = Field(description="The request's particulars.")


def _audit_view(entry: AuditEntry) -> AuditView:
    fields = {name: getattr(entry, name) for name in AuditView.model_fields}
    return AuditView.model_validate(fields)


# -- routes ------------------------------------------------------------------------------


_ID = PathParam(description="Device id.", max_length=64)
_GROUP = PathParam(description="Group name.", max_length=64)
_KEY = PathParam(description="Tag key.", max_length=64)


def _devices_router() -> APIRouter:
    router = APIRouter(tags=["devices"])

    @router.get("/devices", responses=_errors(400, 404))
    def list_devices(
        session: SessionDep,
        who: CallerDep,
        state: Annotated[
            DeviceState | None, Query(description="Only devices in this state.")
        ] = None,
        selector: Annotated[
            list[str] | None,
            Query(
                max_length=32,
                description="device:ID, group:NAME, tag:K=V or all; a comma intersects, "
                "several selectors unite.",
            ),
        ] = None,
    ) -> list[DeviceView]:
        """Devices in the registry, by id."""
        selectors = [registry.parse_selector(text) for text in selector or ()]
        return registry.list_devices(session, state=state, selectors=selectors)

    @router.get("/devices/{device_id}", responses=_errors(404))
    def show_device(
        session: SessionDep, who: CallerDep, device_id: Annotated[str, _ID]
    ) -> DeviceView:
        """One device."""
        return registry.show_device(session, device_id)

    @router.put("/devices/{device_id}/tags/{key}", responses=_errors(400, 404))
    def tag_device(
        session: SessionDep,
        who: CallerDep,
        device_id: Annotated[str, _ID],
        key: Annotated[str, _KEY],
        body: TagValue,
    ) -> DeviceView:
        """Set a device's tag (one value per key)."""
        registry.tag(session, device_id, key, body.value)
        audited(session, who, "tag", f"device:{device_id}", {"key": key, "value": body.value})
        return registry.show_device(session, device_id)

    @router.delete("/devices/{device_id}/tags/{key}", responses=_errors(404))
    def untag_device(
        session: SessionDep,
        who: CallerDep,
        device_id: Annotated[str, _ID],
        key: Annotated[str, _KEY],
    ) -> DeviceView:
        """Remove a device's tag."""
        if not registry.untag(session, device_id, key):
            raise ApiError(404, ErrorCode.UNKNOWN_TAG, f"device {device_id!r} has no tag {key!r}")
        audited(session, who, "untag", f"device:{device_id}", {"key": key})
        return registry.show_device(session, device_id)

    return router


def _groups_router() -> APIRouter:
    router = APIRouter(tags=["groups"])

    @router.get("/groups", responses=_errors())
    def list_groups(session: SessionDep, who: CallerDep) -> list[GroupView]:
        """Every group with its devices, by name."""
        return [GroupView(name=n, devices=d) for n, d in registry.groups(session).items()]

    @router.put("/groups/{name}/devices/{device_id}", responses=_errors(400, 404))
    def add_to_group(
        session: SessionDep,
        who: CallerDep,
        name: Annotated[str, _GROUP],
        device_id: Annotated[str, _ID],
    ) -> GroupView:
        """Put a device in a group (made when new)."""
        registry.add_to_group(session, name, [device_id])
        audited(session, who, "group.add", f"group:{name}", {"device": device_id})
        return GroupView(name=name, devices=registry.groups(session)[name])

    @router.delete("/groups/{name}/devices/{device_id}", responses=_errors(404))
    def remove_from_group(
        session: SessionDep,
        who: CallerDep,
        name: Annotated[str, _GROUP],
        device_id: Annotated[str, _ID],
    ) -> GroupView:
        """Take a device out of a group (the group stays, even empty)."""
        registry.remove_from_group(session, name, [device_id])
        audited(session, who, "group.remove", f"group:{name}", {"device": device_id})
        return GroupView(name=name, devices=registry.groups(session)[name])

    return router


def _releases_router() -> APIRouter:
    router = APIRouter(tags=["releases"])

    @router.get("/releases", responses=_errors(400, 503))
    def list_releases(
        context: ContextDep,
        who: CallerDep,
        model_id: Annotated[
            str | None, Query(max_length=64, description="Only this model line.")
        ] = None,
    ) -> list[ReleaseView]:
        """Releases in the store, by model id then version."""
        return [ReleaseView.of(r) for r in context.store.releases(model_id)]

    @router.get("/releases/{release_id}", responses=_errors(404, 503))
    def show_release(
        context: ContextDep,
        who: CallerDep,
        release_id: Annotated[str, PathParam(description="MODEL_ID@VERSION.", max_length=80)],
    ) -> ReleaseView:
        """One release."""
        return ReleaseView.of(context.store.get(release_id))

    return router


def _audit_router() -> APIRouter:
    router = APIRouter(tags=["audit"])

    @router.get("/audit", responses=_errors())
    def audit_log(
        session: SessionDep,
        who: CallerDep,
        limit: Annotated[
            int, Query(ge=1, le=AUDIT_LIMIT_MAX, description="Most entries, newest first.")
        ] = 100,
    ) -> list[AuditView]:
        """The newest audit entries, newest first."""
        return [_audit_view(e) for e in registry.audit_entries(session, limit=limit)]

    return router


# -- the app ---------------------------------------------------------------------------------


def create_app(context: ApiContext | None) -> FastAPI:
    """The controller's API over ``context`` (None: only to describe it, no request served)."""
    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description="The fleet controller's API. Every error is an ErrorBody.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.context = context
    _install_error_handlers(app)
    from .fanout import commands_router  # they build on this module's dependencies
    from .rollouts_api import rollouts_router

    for router in (_devices_router(), _groups_router(), _releases_router(), _audit_router()):
        app.include_router(router)
    for router in (rollouts_router(), commands_router()):
        app.include_router(router, responses=_errors())
    store = context.store if context is not None else ReleaseStore(Path("/nonexistent"))
    invalid: dict[int | str, dict[str, Any]] = {
        422: {"model": ErrorBody, "description": "The sha256 does not validate."}
    }
    app.include_router(artifacts_router(store), responses=invalid)  # public: see the docstring
    _finish_document(app)
    return app


def _finish_document(app: FastAPI) -> None:
    """Name mTLS beside the bearer scheme FastAPI derives; one operation id per method."""
    describe = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # GET and HEAD of one route share an id: fixed below
                warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
                document = describe()
            _unique_operation_ids(document)
            schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["mutualTLS"] = {
                "type": "mutualTLS",
                "description": "The operator's client certificate (its common name is the "
                "caller), when the API listens with http.tls.client_cafile.",
            }
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    security = operation.get("security")
                    if security:
                        operation["security"] = [*security, {"mutualTLS": []}]
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _unique_operation_ids(document: dict[str, Any]) -> None:
    seen: set[str] = set()
    paths = document.get("paths", {})
    for path in sorted(paths):  # FastAPI's methods come from a set: decide in a fixed order
        for method, operation in sorted(paths[path].items()):
            operation_id = operation.get("operationId")
            if operation_id in seen:
                operation["operationId"] = f"{operation_id}_{method}"
            seen.add(operation.get("operationId"))


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document (``edgefleet controller openapi``, docs/openapi.json)."""
    return create_app(None).openapi()
