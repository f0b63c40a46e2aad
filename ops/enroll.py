"""``edgefleet enroll``: enrollment tokens, and the service that turns them into certificates.

``edgefleet enroll token NAME --fleet DIR`` makes a single-use token bound to device NAME
(shown once; only its hash is stored in ``DIR/enroll/tokens.json``). ``edgefleet enroll
serve --fleet DIR`` answers, until stopped:

- enrollment requests of claim sessions (``<root>/_enroll/<claim>/<session>/request``):
  the token is checked (:mod:`edgefleet.provisioning.enrollment`), the CSR signed by the
  fleet CA with the name the token binds (never the CSR's), and the answer published on
  that session's answer topic, which only that session can read;
- renewal requests (``<root>/<device>/renew/request``): the broker lets only the device
  itself write there, so the CSR is signed with that device's name, without a token.

The service connects to the operators' listener as the fleet's enrollment identity
(``DIR/operators/enroll.crt``, from the operator CA; ``--profile`` names another), which
the operators' ACL lets read the requests and write the answers.

Threads: the main thread runs :func:`serve` (it handles every request, one at a time, so
the token file has one writer here); paho's network thread (``loop_start``) only puts
messages on a queue and records acknowledgements.
"""

from __future__ import annotations

import argparse
import logging
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from edgefleet.agent.mqtt import close_client, tls_context
from edgefleet.agent.protocol import (
    ENROLL_LEVEL,
    RENEW_LEVEL,
    EnrollAnswer,
    EnrollRequest,
    RenewRequest,
    Topics,
    describe_errors,
    enroll_answer_topic,
)
from edgefleet.provisioning import (
    Enrollment,
    FleetDir,
    Grant,
    RateLimit,
    Refusal,
    RefusalCode,
    TokenStore,
    key_digest,
    mark_used,
    pki,
)
from edgefleet.runtime import EdgefleetError, InputError

from .errors import BrokerError
from .profile import OperatorProfile, resolve_profile
from .provision import add_fleet_option, fleet_dir

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = "24h"
DEFAULT_RATE = 10
DEFAULT_RATE_WINDOW_S = 60.0
SERVICE_CLIENT_ID = "edgefleet-enroll"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RECEIVE_S = 0.5
_CONNECT_TIMEOUT_S = 10.0

Signer = Callable[[bytes, str], x509.Certificate]
"""Signs a PEM CSR under a device name: the fleet CA, recording what it issued."""


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``24h``, ``7d`` or a plain number of seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise InputError(
            f"{text!r} is not a duration", hint="write it as 30m, 24h or 7d (a positive number)"
        )
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True)
class Answer:
    """Where an answer goes and what it says."""

    topic: str
    answer: EnrollAnswer


class EnrollmentService:
    """Answers one request at a time: parses it, decides, signs, records. No MQTT here."""

    def __init__(
        self,
        store: TokenStore,
        signer: Signer,
        *,
        topic_root: str,
        rate: RateLimit,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._signer = signer
        self._root = topic_root
        self._enrollment = Enrollment(rate)
        self._clock = clock

    @property
    def subscriptions(self) -> list[str]:
        """The request topics the service listens to."""
        return [f"{self._root}/{ENROLL_LEVEL}/+/+/request", f"{self._root}/+/{RENEW_LEVEL}/request"]

    def handle(self, topic: str, payload: bytes) -> Answer | None:
        """The answer to the request on ``topic``; None for a topic that is not a request."""
        if not topic.startswith(f"{self._root}/"):
            return None
        levels = topic[len(self._root) + 1 :].split("/")
        if len(levels) == 4 and levels[0] == ENROLL_LEVEL and levels[3] == "request":
            return self._enroll(levels[1], levels[2], payload)
        if len(levels) == 3 and levels[1:] == [RENEW_LEVEL, "request"]:
            return self._renew(levels[0], payload)
        return None

    def _enroll(self, claim: str, session: str, payload: bytes) -> Answer:
        topic = enroll_answer_topic(self._root, claim, session)
        now = self._clock()
        try:
            request = EnrollRequest.model_validate_json(payload)
            key = _csr_key(request.csr)
        except (ValidationError, pki.BadRequest) as exc:
            wait = self._enrollment.rate.admit(claim, now)  # malformed ones count too
            return Answer(topic, _refused(_bad_request(exc, wait)))
        with self._store.locked():
            tokens = self._store.load()
            decision = self._enrollment.decide(tokens, claim, request.token, key, now)
            if isinstance(decision, Refusal):
                log.warning("enrollment refused (%s) for %s: %s", decision.code.value, claim,
                            decision.reason)  # fmt: skip
                return Answer(topic, _refused(decision))
            if decision.certificate is not None:
                log.info("enrollment of %s answered again (same key)", decision.device_id)
                return Answer(topic, _granted(decision.device_id, decision.certificate))
            try:
                pem = self._sign(request.csr, decision)
            except pki.PkiError as exc:
                return Answer(topic, _refused(Refusal(RefusalCode.BAD_REQUEST, exc.message)))
            self._store.save(
                mark_used(tokens, decision.token_id, key_sha256=key, certificate=pem, now=now)
            )
        log.info("enrolled %s (token %s)", decision.device_id, decision.token_id)
        return Answer(topic, _granted(decision.device_id, pem))

    def _renew(self, device: str, payload: bytes) -> Answer | None:
        try:
            pki.check_identity(device)
        except pki.InvalidIdentity:
            return None  # the broker lets no such identity write there
        topic = Topics(device, self._root).renew_answer
        wait = self._enrollment.rate.admit(f"{RENEW_LEVEL}:{device}", self._clock())
        if wait is not None:
            return Answer(topic, _refused(_rate_limited(f"renewals of {device!r}", wait)))
        try:
            request = RenewRequest.model_validate_json(payload)
            certificate = self._signer(request.csr.encode(), device)
        except (ValidationError, pki.PkiError) as exc:
            return Answer(topic, _refused(_bad_request(exc, None)))
        log.info("renewed the certificate of %s", device)
        return Answer(topic, _granted(device, pki.certificate_pem(certificate).decode()))

    def _sign(self, csr: str, grant: Grant) -> str:
        return pki.certificate_pem(self._signer(csr.encode(), grant.device_id)).decode()


def _csr_key(csr: str) -> str:
    """The digest of the CSR's public key; ``BadRequest`` when it does not parse."""
    try:
        request = x509.load_pem_x509_csr(csr.encode())
    except ValueError as exc:
        raise pki.BadRequest(
            f"the certificate signing request does not parse ({exc})", hint="send a PEM CSR"
        ) from exc
    der = request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key_digest(der)


def _bad_request(exc: Exception, wait: float | None) -> Refusal:
    if wait is not None:
        return _rate_limited("enrollment requests", wait)
    reason = describe_errors(exc) if isinstance(exc, ValidationError) else str(exc)
    return Refusal(RefusalCode.BAD_REQUEST, f"the request is malformed: {reason}")


def _rate_limited(what: str, wait: float) -> Refusal:
    return Refusal(RefusalCode.RATE_LIMITED, f"too many {what}; try again in {wait:.0f} s", wait)


def _refused(refusal: Refusal) -> EnrollAnswer:
    return EnrollAnswer(
        ok=False,
        code=refusal.code.value,
        reason=refusal.reason,
        retry_after_s=round(refusal.retry_after_s, 1) if refusal.retry_after_s else None,
    )


def _granted(device_id: str, certificate: str) -> EnrollAnswer:
    return EnrollAnswer(ok=True, device_id=device_id, certificate=certificate)


# -- the MQTT side ------------------------------------------------------------------


class _Inbox:
    """paho callbacks (paho's thread): messages onto a queue, the subscription's outcome."""

    def __init__(self, subscriptions: list[str]) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        self.problem: str | None = None
        self._subscriptions = subscriptions

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.problem = f"the broker refused the connection: {reason}"
            self.subscribed.set()
            return
        client.subscribe([(topic, 1) for topic in self._subscriptions])

    def on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        refused = [str(code) for code in codes if code.is_failure]
        if refused:
            self.problem = f"the broker refused the request subscriptions ({', '.join(refused)})"
        self.subscribed.set()

    def on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)


def connect(profile: OperatorProfile, inbox: _Inbox) -> mqtt.Client:
    """A paho client connected with the operator profile and subscribed to the requests."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=SERVICE_CLIENT_ID, protocol=mqtt.MQTTv5
    )
    if not profile.insecure:
        if profile.cafile is None:
            raise BrokerError("no CA to verify the broker with", hint="give --cafile")
        try:
            client.tls_set_context(tls_context(profile.cafile, profile.certfile, profile.keyfile))
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"cannot load the operator certificates ({exc})",
                hint="check the profile's cafile, certfile and keyfile",
            ) from exc
    client.on_connect = inbox.on_connect
    client.on_subscribe = inbox.on_subscribe
    client.on_message = inbox.on_message
    try:
        client.connect(profile.host, profile.broker_port, keepalive=30)
    except OSError as exc:
        raise BrokerError(
            f"cannot reach the broker at {profile.address} ({exc})",
            hint="check the broker runs and the profile's host and port",
        ) from exc
    client.loop_start()
    if not inbox.subscribed.wait(_CONNECT_TIMEOUT_S) or inbox.problem:
        close_client(client)
        raise BrokerError(
            inbox.problem or f"no answer from the broker at {profile.address}",
            hint="the enrollment service needs the controller's identity (operator profile)",
        )
    return client


def serve(
    service: EnrollmentService,
    profile: OperatorProfile,
    stop: threading.Event,
    ready: threading.Event | None = None,
) -> None:
    """Answer requests until ``stop`` is set (main thread); ``ready`` is set once subscribed."""
    inbox = _Inbox(service.subscriptions)
    client = connect(profile, inbox)
    print(f"edgefleet enroll: serving on {profile.address}", flush=True)
    if ready is not None:
        ready.set()
    try:
        while not stop.is_set():
            try:
                message = inbox.messages.get(timeout=_RECEIVE_S)
            except queue.Empty:
                continue
            try:
                answer = service.handle(message.topic, bytes(message.payload))
            except EdgefleetError as exc:  # the token file or the CA: the operator must act
                log.error("request on %s not answered: %s", message.topic, exc)
                print(f"edgefleet enroll: error: {exc}", file=sys.stderr, flush=True)
                continue
            if answer is None:
                continue
            client.publish(answer.topic, answer.answer.model_dump_json(exclude_none=True), qos=1)
            print(_story(answer), flush=True)
    finally:
        client.disconnect()
        close_client(client)


def _story(answer: Answer) -> str:
    a = answer.answer
    if a.ok:
        return f"edgefleet enroll: issued a certificate to {a.device_id}"
    return f"edgefleet enroll: refused ({a.code}): {a.reason}"


# -- the command line ---------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add ``enroll token`` and ``enroll serve`` to the top-level command parser."""
    enroll = subcommands.add_parser("enroll", help="zero-touch enrollment of new devices")
    commands = enroll.add_subparsers(dest="enroll_command", required=True, metavar="COMMAND")
    token = commands.add_parser(
        "token",
        help="make a single-use enrollment token for a device",
        description="Make a single-use, expiring token that enrolls one device under NAME. "
        "The token is shown once (or written to --out, mode 0600); the fleet keeps only "
        "its hash.",
    )
    token.add_argument("name", metavar="NAME", help="the device's name (its certificate CN)")
    add_fleet_option(token)
    token.add_argument(
        "--expires",
        default=DEFAULT_TOKEN_LIFETIME,
        metavar="DURATION",
        help="how long the token may be used: 30m, 24h, 7d",
    )
    token.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the token to FILE (0600) (default: print it on stdout)",
    )
    token.set_defaults(handler=_token)
    run = commands.add_parser(
        "serve",
        help="answer enrollment and renewal requests until stopped",
        description="Answer devices' enrollment requests (token checked, CSR signed by the "
        "fleet CA under the token's name) and renewal requests (signed under the requesting "
        "device's own name), connected with the operator profile.",
    )
    add_fleet_option(run)
    run.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="operator profile to connect with (default: the fleet's enrollment identity, "
        "operators/enroll.crt, on the operators' listener of fleet.yaml)",
    )
    run.add_argument("--host", help="broker host (default: the profile's)")
    run.add_argument("--port", type=int, help="broker port (default: the profile's)")
    run.add_argument(
        "--days",
        type=int,
        metavar="N",
        help="lifetime of the certificates issued, in days (default: fleet.yaml's cert_days)",
    )
    run.add_argument(
        "--rate",
        type=int,
        default=DEFAULT_RATE,
        metavar="N",
        help="requests each claim identity may make per --rate-window",
    )
    run.add_argument(
        "--rate-window",
        type=float,
        default=DEFAULT_RATE_WINDOW_S,
        metavar="SECONDS",
        help="the rate limit's window",
    )
    run.set_defaults(handler=_serve)


def _token(args: argparse.Namespace) -> int:
    lifetime_s = parse_duration(args.expires)
    pki.check_identity(args.name)
    made = token_store(fleet_dir(args)).add(args.name, lifetime_s=lifetime_s, now=time.time())
    expires = datetime.fromtimestamp(made.record.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.out is not None:
        pki.write_file(args.out, made.token.encode() + b"\n", mode=pki.PRIVATE_KEY_MODE)
        print(f"token for {args.name} written to {args.out}; single use, expires {expires}")
    else:
        print(made.token)
        print(f"(token for {args.name}; single use, expires {expires})", file=sys.stderr)
    return 0


def token_store(fleet: FleetDir) -> TokenStore:
    """The fleet's token store; its directory is made (0700) when missing."""
    pki.make_private_dir(fleet.enroll_dir)
    return TokenStore(fleet.tokens_path)


def fleet_signer(fleet: FleetDir, days: int | None) -> Signer:
    """Signs with the fleet's device CA and records the certificate in its ledger."""

    def sign(csr: bytes, name: str) -> x509.Certificate:
        return fleet.sign_device_csr(csr, name, days=days)

    return sign


def service_profile(fleet: FleetDir, args: argparse.Namespace) -> OperatorProfile:
    """How the service connects: ``--profile`` when given, else the fleet's own enrollment
    identity (``operators/enroll.crt``) on the operators' listener; flags win."""
    flags = {"host": args.host, "port": args.port}
    if args.profile is not None:
        resolved = resolve_profile(flags, profile_file=args.profile)
        resolved.check_transport()
        return resolved.profile
    settings = fleet.settings()
    return OperatorProfile(
        host=args.host or settings.broker_host,
        port=args.port or settings.operator_port,
        topic_root=settings.topic_root,
        cafile=fleet.ca_cert,
        certfile=fleet.operator_cert(settings.enroll_identity),
        keyfile=fleet.operator_key(settings.enroll_identity),
    )


def _serve(args: argparse.Namespace) -> int:
    fleet = fleet_dir(args)
    profile = service_profile(fleet, args)
    try:
        rate = RateLimit(args.rate, args.rate_window)
    except EdgefleetError as exc:
        raise InputError(exc.message, hint=exc.hint) from exc
    service = EnrollmentService(
        token_store(fleet),
        fleet_signer(fleet, args.days),
        topic_root=profile.topic_root,
        rate=rate,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve(service, profile, stop)
    return 0
