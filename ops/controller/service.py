"""The controller as a service (``edgefleet controller run --config FILE``): its config file,
and the parts it starts and stops.

The config file (YAML, :class:`ControllerConfig`; ``docs/configuration.md``)::

    database: /var/lib/edgefleet-controller/controller.sqlite3   # or postgresql+psycopg://...
    broker: /etc/edgefleet/operator.yaml     # an operator profile file, or inline fields:
    #   {host: broker.lan, port: 8883, cafile: ..., certfile: ..., keyfile: ...}
    releases_dir: /var/lib/edgefleet-controller/releases
    http:
      host: 0.0.0.0
      port: 8443
      tls: {certfile: api.crt, keyfile: api.key, client_cafile: operator-ca.crt}
      tokens_file: tokens.txt                # "<sha256 of the token> <name>" lines
    ingest: {batch_max_messages: 500}

Relative paths resolve against the config file's folder.

:meth:`ControllerService.start` is a flat list of steps, :meth:`~ControllerService.stop`
undoes them in reverse::

    open the database (migrated) -> start ingest (MQTT, the registry-writer thread)
      -> start the rollout engine ("controller-rollouts" thread)
      -> start the HTTP API (uvicorn on the "controller-http" thread)

The rollout engine (:class:`RolloutLoop`) steps every active rollout each
``rollout_interval_s`` (``reconcile.RolloutRunner.step_all``); a step that fails (the
broker down, the database busy) is logged and tried again next time: what was decided is
in the database, so a restarted controller goes on where it stopped.

Threads: the owner's thread (``controller run``: the main thread) calls ``start``, ``stop``
and :meth:`~ControllerService.run`, which waits on the one stop event (set by SIGTERM or
SIGINT), logs a summary every ``summary_interval_s`` and restarts the registry writer when
it died (:meth:`~ControllerService.supervise`: ``RegistryWriter`` owns its thread and turns
an unexpected error into ``writer_problem``, so the agent's ``Supervisor``, which restarts
functions that raise, does not fit it). The rollout engine runs on its own thread, so a
slow broker does not hold the supervisor up. uvicorn runs its event loop on ``controller-http``
(its request handlers on its worker threads); paho runs ingest's network thread.

Errors::

    SettingError (bad input, exit 2)
    └── ControllerConfigError   the config file, or a file it names, does not hold
    EnvironmentProblem (exit 1)
    └── ServiceError            a part cannot start: the port is taken, the server failed
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.ops.profile import OperatorProfile, ProfileError, ResolvedProfile, resolve_profile
from edgefleet.runtime import EdgefleetError, EnvironmentProblem, SettingError

from .db import Database, open_database
from .ingest import Ingest, IngestSettings, IngestStats
from .reconcile import BrokerPublisher, RolloutRunner
from .releases import ReleaseStore

if TYPE_CHECKING:
    from .api import Authenticator

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/edgefleet-controller")
DEFAULT_DATABASE = str(DEFAULT_STATE_DIR / "controller.sqlite3")
DEFAULT_RELEASES_DIR = DEFAULT_STATE_DIR / "releases"
DEFAULT_HTTP_PORT = 8443
_TOKEN_LINE = re.compile(r"^(?P<hash>[0-9a-f]{64})\s+(?P<name>[A-Za-z0-9][A-Za-z0-9_.@-]{0,63})$")


class ControllerConfigError(SettingError):
    """The controller's config file, or a file it names, does not hold."""


class ServiceError(EnvironmentProblem):
    """A part of the controller cannot start: the HTTP port is taken, the server failed."""


# -- the config file ----------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpTls(_Section):
    """TLS for the HTTP API; a ``client_cafile`` makes it mutual (the caller's certificate)."""

    certfile: Path = Field(description="The API's server certificate (PEM).")
    keyfile: Path = Field(description="Its private key (PEM).")
    client_cafile: Path | None = Field(
        None,
        description="CA that operators' client certificates chain to (the operator CA); the "
        "certificate's common name is the caller's identity. None: no client certificates.",
    )
    client_certificates: Literal["required", "optional"] = Field(
        "required",
        description="With client_cafile: 'required' refuses a TLS connection without a valid "
        "client certificate; 'optional' lets one in (it may then only fetch /artifacts, or "
        "use a bearer token), for devices downloading artifacts from the same listener.",
    )


class HttpSettings(_Section):
    """Where the HTTP API listens and how callers authenticate."""

    host: str = Field("127.0.0.1", min_length=1, description="Address to bind.")
    port: int = Field(
        DEFAULT_HTTP_PORT, ge=0, le=65535, description="Port to bind (0: one the OS picks)."
    )
    tls: HttpTls | None = Field(None, description="TLS (and mTLS); plain HTTP when absent.")
    tokens_file: Path | None = Field(
        None,
        description="File of bearer tokens, one '<sha256 hex of the token> <name>' a line "
        "(# comments); the name is the caller's identity. Hashes only, never tokens.",
    )
    start_timeout_s: float = Field(10.0, gt=0, description="How long start() waits to listen.")
    stop_timeout_s: float = Field(
        5.0, gt=0, description="How long stop() lets requests in flight finish."
    )


class ControllerConfig(_Section):
    """The controller's config file (``edgefleet controller run --config FILE``)."""

    database: str = Field(
        DEFAULT_DATABASE,
        min_length=1,
        description="The registry's database: a SQLite file path, or a URL "
        "(sqlite:///PATH, postgresql+psycopg://USER@HOST:PORT/DB).",
    )
    broker: Path | OperatorProfile = Field(
        description="The broker ingest reads the fleet from: an operator profile file "
        "(edgefleet provision init writes one), or its fields inline (host, port, "
        "topic_root, cafile, certfile, keyfile, insecure).",
    )
    releases_dir: Path = Field(
        DEFAULT_RELEASES_DIR, description="The release store whose artifacts /artifacts serves."
    )
    http: HttpSettings = Field(
        default_factory=HttpSettings, description="The HTTP API's listener and authentication."
    )
    ingest: IngestSettings = Field(
        default_factory=IngestSettings, description="How MQTT messages reach the registry."
    )
    summary_interval_s: float = Field(
        60.0, gt=0, description="How often the service logs one line of what it did."
    )
    supervise_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often the service checks its registry writer."
    )
    writer_restart_backoff_s: float = Field(
        1.0, gt=0, description="First wait before restarting a registry writer that died."
    )
    writer_restart_backoff_max_s: float = Field(
        60.0, gt=0, description="Longest wait between restarts of the registry writer."
    )
    rollout_interval_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How often the rollout engine steps every active rollout (decides, "
        "writes desired states).",
    )


def load_config(path: Path) -> ControllerConfig:
    """Read and validate the config file; relative paths resolve against its folder."""
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ControllerConfigError(
            f"{source}: cannot read the config file ({exc.strerror or exc})",
            hint="check the path given to --config",
        ) from exc
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ControllerConfigError(f"{source}: not valid YAML ({reason})", hint=_FIELDS) from None
    if not isinstance(data, dict):
        raise ControllerConfigError(
            f"{source}: the top level must be a mapping of fields", hint=_FIELDS
        )
    try:
        config = ControllerConfig.model_validate(data)
    except ValidationError as exc:
        raise ControllerConfigError(f"{source}: {_problems(exc)}", hint=_FIELDS) from None
    config = _resolved_paths(config, path.resolve().parent)
    try:
        check_config(config)
    except ControllerConfigError as exc:
        raise ControllerConfigError(f"{source}: {exc.message}", hint=exc.hint) from exc
    return config


def check_config(config: ControllerConfig) -> None:
    """What validation alone cannot see: the broker profile, the TLS files, the tokens file,
    a way to authenticate. :class:`ControllerConfigError` names the field."""
    broker_profile(config)
    authenticator(config)


_FIELDS = f"the fields: {', '.join(ControllerConfig.model_fields)} (docs/configuration.md)"


def _problems(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        # A union (broker) names the member it tried; the field's path is what a person wrote.
        loc = [str(p) for p in error["loc"] if p not in ("OperatorProfile", "path-type")]
        reason = error["msg"]
        if error["type"] == "extra_forbidden":
            reason = "unknown field (check the spelling)"
        parts.append(f"{'.'.join(loc) or '(top level)'}: {reason}")
    return "; ".join(dict.fromkeys(parts))


def _resolved_paths(config: ControllerConfig, base: Path) -> ControllerConfig:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    database = config.database
    if "://" not in database:
        database = str(resolve(Path(database)))
    broker = config.broker
    if isinstance(broker, Path):
        broker = resolve(broker)
    else:
        paths = {n: resolve(getattr(broker, n)) for n in _TLS_FILES if getattr(broker, n)}
        broker = broker.model_copy(update=paths)
    http = config.http
    if http.tls is not None:
        tls = http.tls
        files = {n: resolve(getattr(tls, n)) for n in _HTTP_TLS_FILES if getattr(tls, n)}
        http = http.model_copy(update={"tls": tls.model_copy(update=files)})
    if http.tokens_file is not None:
        http = http.model_copy(update={"tokens_file": resolve(http.tokens_file)})
    return config.model_copy(
        update={
            "database": database,
            "broker": broker,
            "releases_dir": resolve(config.releases_dir),
            "http": http,
        }
    )


_TLS_FILES = ("cafile", "certfile", "keyfile")
_HTTP_TLS_FILES = ("certfile", "keyfile", "client_cafile")


def broker_profile(config: ControllerConfig) -> ResolvedProfile:
    """The broker connection the config names (a profile file read, or the inline fields)."""
    broker = config.broker
    if isinstance(broker, Path):
        try:
            # The config file is the whole truth for a service: no EDGEFLEET_* variables.
            resolved = resolve_profile({}, profile_file=broker, environ={})
        except ProfileError as exc:
            raise ControllerConfigError(f"broker: {exc.message}", hint=exc.hint) from exc
    else:
        given = broker.model_fields_set
        resolved = ResolvedProfile(broker, {name: "the config's broker" for name in given})
    try:
        resolved.check_transport()
    except ProfileError as exc:
        raise ControllerConfigError(f"broker: {exc.message}", hint=exc.hint) from exc
    return resolved


# -- bearer tokens ----------------------------------------------------------------------


def hash_token(token: str) -> str:
    """The hex sha256 of ``token``, as the tokens file holds it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_tokens(path: Path) -> dict[str, str]:
    """The tokens file as {sha256 hex: name}; :class:`ControllerConfigError` names the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ControllerConfigError(
            f"http.tokens_file {path}: cannot read it ({exc.strerror or exc})",
            hint="check the path, or 'edgefleet controller token NAME --tokens-file FILE'",
        ) from exc
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _TOKEN_LINE.match(line)
        if match is None:
            raise ControllerConfigError(
                f"http.tokens_file {path}, line {number}: not '<sha256 hex> <name>'",
                hint="the file holds sha256 hashes of tokens, never the tokens; "
                "'edgefleet controller token NAME --tokens-file FILE' adds one",
            )
        tokens[match["hash"]] = match["name"]
    return tokens


def authenticator(config: ControllerConfig) -> Authenticator:
    """The API's :class:`~.api.Authenticator` (tokens read, TLS files loaded once, here)."""
    from .api import Authenticator

    http = config.http
    if http.tls is not None:
        _check_tls_files(http.tls)
    mtls = http.tls is not None and http.tls.client_cafile is not None
    tokens = read_tokens(http.tokens_file) if http.tokens_file is not None else {}
    if not mtls and http.tokens_file is None:
        raise ControllerConfigError(
            "http: no way for a caller to authenticate: the API would refuse everyone",
            hint="give http.tokens_file (bearer tokens) or http.tls.client_cafile (client "
            "certificates), or both",
        )
    return Authenticator(tokens=tokens, client_certificates=mtls)


# -- the HTTP server ----------------------------------------------------------------------


def server_ssl(tls: HttpTls) -> dict[str, Any]:
    """uvicorn's ssl settings for ``tls`` (mTLS when a client CA is given)."""
    settings: dict[str, Any] = {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)}
    if tls.client_cafile is not None:
        required = tls.client_certificates == "required"
        settings["ssl_ca_certs"] = str(tls.client_cafile)
        settings["ssl_cert_reqs"] = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return settings


def _check_tls_files(tls: HttpTls) -> None:
    """Load the TLS files once here, so a bad one is a config error naming the field."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ControllerConfigError(
            f"http.tls: cannot load the certificate {tls.certfile} with its key "
            f"{tls.keyfile} ({exc})",
            hint="give a PEM certificate and the unencrypted PEM key it was issued for",
        ) from exc
    if tls.client_cafile is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_cafile))
        except (OSError, ssl.SSLError) as exc:
            raise ControllerConfigError(
                f"http.tls.client_cafile {tls.client_cafile}: not a CA certificate ({exc})",
                hint="give the operator CA's certificate (PEM)",
            ) from exc


class HttpServer:
    """uvicorn serving an ASGI app on the ``controller-http`` thread, on a socket bound here."""

    def __init__(self, app: Any, settings: HttpSettings) -> None:
        import uvicorn  # the [controller] extra; a device install never starts a server

        from .api import TlsScopeProtocol

        self._settings = settings
        self._socket = _bind(settings.host, settings.port)
        ssl_settings = server_ssl(settings.tls) if settings.tls is not None else {}
        config = uvicorn.Config(
            app,
            http=TlsScopeProtocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.stop_timeout_s) or 1,
            **ssl_settings,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="controller-http",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """Where the API is served: ``https://HOST:PORT`` (the port bound, when 0 was asked)."""
        host, port = self._socket.getsockname()[:2]
        scheme = "https" if self._settings.tls is not None else "http"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{port}"

    @property
    def alive(self) -> bool:
        """Whether the server's thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start serving; :class:`ServiceError` when uvicorn does not start in time."""
        self._thread.start()
        deadline = time.monotonic() + self._settings.start_timeout_s
        # uvicorn has no "listening" event; its flag is set once it is.
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"the HTTP API did not start on {self.url}",
                    hint="the log above says why (run with -v for more)",
                )
            self._thread.join(0.02)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish within ``stop_timeout_s``, return."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self._settings.stop_timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(self._settings.stop_timeout_s)
            if self._thread.is_alive():
                log.error("HTTP server did not stop within %.1f s", self._settings.stop_timeout_s)
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServiceError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc})",
            hint="another process holds the port, or the address is not this machine's: "
            "change http.host or http.port",
        ) from exc
    sock.set_inheritable(True)
    return sock


# -- the rollout engine's thread ----------------------------------------------------------


class RolloutLoop:
    """Steps every active rollout every ``interval_s`` on the "controller-rollouts" thread."""

    def __init__(self, runner: RolloutRunner, interval_s: float) -> None:
        self.runner = runner
        self.interval_s = interval_s
        self.steps = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (its first step at once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="controller-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the step in progress, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def step(self) -> None:
        """Step every rollout due once; a failure is logged and counted, never raised (one
        rollout's failure does not hold the others up)."""
        try:
            due = self.runner.due()
        except Exception as exc:  # the database: tried again next interval
            self._failed("cannot list the rollouts", exc)
            return
        for rollout_id in due:
            try:
                self.runner.step(rollout_id, time.time())
            except Exception as exc:  # the broker or the database: tried again next interval
                self._failed(f"rollout {rollout_id}: a step failed", exc)
        self.steps += 1

    def _failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        reason = str(exc) if isinstance(exc, EdgefleetError) else f"{type(exc).__name__}: {exc}"
        log.error("%s (%s); trying again in %.0f s", what, reason, self.interval_s)
        log.debug("rollout engine failure", exc_info=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.interval_s)


# -- the service ---------------------------------------------------------------------------


@dataclass
class _WriterWatch:
    """When the registry writer may be restarted next, and how long the wait after that."""

    backoff_s: float
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class ControllerService:
    """The controller's parts, started in order and stopped in reverse."""

    config: ControllerConfig
    stop_event: threading.Event = field(default_factory=threading.Event)
    database: Database | None = None
    ingest: Ingest | None = None
    rollouts: RolloutLoop | None = None
    http: HttpServer | None = None
    _watch: _WriterWatch | None = None

    def start(self) -> None:
        """Open the database, start ingest, start the HTTP API; undone if a step fails."""
        config = self.config
        resolved = broker_profile(config)
        who = authenticator(config)
        try:
            self.database = open_database(config.database)
            self.ingest = Ingest(self.database, resolved, config.ingest)
            self.ingest.start()
            runner = RolloutRunner(self.database, BrokerPublisher(resolved))
            self.rollouts = RolloutLoop(runner, config.rollout_interval_s)
            self.rollouts.start()
            self.http = HttpServer(self._app(who), config.http)
            self.http.start()
        except BaseException:
            self.stop()
            raise
        self._watch = _WriterWatch(config.writer_restart_backoff_s)

    def stop(self) -> None:
        """Stop the HTTP API, the rollout engine, then ingest (writing what is queued), then
        close the database."""
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.rollouts is not None:
            self.rollouts.stop()
            self.rollouts = None
        if self.ingest is not None:
            self.ingest.stop()
            self.ingest = None
        if self.database is not None:
            self.database.close()
            self.database = None

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Start, call ``on_started``, serve until :attr:`stop_event` is set, stop. The
        owner's thread."""
        self.start()
        try:
            if on_started is not None:
                on_started()
            last = self._stats()
            summary_at = time.monotonic() + self.config.summary_interval_s
            while not self.stop_event.wait(self.config.supervise_interval_s):
                self.supervise()
                if time.monotonic() >= summary_at:
                    last = self._log_summary(last)
                    summary_at = time.monotonic() + self.config.summary_interval_s
            log.info("controller stopping")
        finally:
            self.stop()
        log.info("controller stopped")

    def supervise(self) -> None:
        """Restart the registry writer if it died (logged, with backoff between restarts)."""
        if self.ingest is None or self._watch is None or self.ingest.writer.alive:
            return
        watch, now = self._watch, time.monotonic()
        if watch.restart_at is None:
            problem = self.ingest.stats().writer_problem or "it ended"
            log.error("registry writer died (%s); restarting in %.1f s", problem, watch.backoff_s)
            watch.restart_at = now + watch.backoff_s
            return
        if now < watch.restart_at:
            return
        self.ingest.writer.start()
        watch.restarts += 1
        watch.restart_at = None
        watch.backoff_s = min(watch.backoff_s * 2, self.config.writer_restart_backoff_max_s)
        log.warning("registry writer restarted (restart %d)", watch.restarts)

    def describe(self) -> str:
        """One line: where the API listens, the broker, the database (once started)."""
        assert self.database is not None, "start() first"
        broker = broker_profile(self.config).profile
        database = self.database.url.render_as_string(hide_password=True)
        return (
            f"edgefleet controller: API on {self.url}; fleet from {broker.address} "
            f"({broker.topic_root}); database {database}; releases {self.config.releases_dir}"
        )

    @property
    def url(self) -> str:
        """Where the API listens (once started)."""
        assert self.http is not None, "start() first"
        return self.http.url

    def _app(self, authenticator: Authenticator) -> Any:
        from .api import ApiContext, create_app

        assert self.database is not None
        store = ReleaseStore(self.config.releases_dir)
        context = ApiContext(self.database, store, authenticator, broker_profile(self.config))
        return create_app(context)

    def _stats(self) -> IngestStats:
        return self.ingest.stats() if self.ingest is not None else IngestStats()

    def _log_summary(self, last: IngestStats) -> IngestStats:
        now = self._stats()
        log.info(
            "ingest: %d messages in %.0f s (%d applied, %d malformed, %d dropped), broker %s",
            now.received - last.received,
            self.config.summary_interval_s,
            now.applied - last.applied,
            now.malformed - last.malformed,
            now.dropped + now.queue_full - last.dropped - last.queue_full,
            "connected" if now.connected else "disconnected",
        )
        return now
