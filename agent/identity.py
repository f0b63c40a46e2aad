"""The device's identity: its key and certificate, enrolled at first boot, renewed before expiry.

First boot (:func:`prepare_identity`, main thread, before the MQTT link starts): with
``enrollment`` configured and no certificate at ``broker.tls.certfile``, the agent makes
its P-256 key (kept if one is there: a retry after a lost answer must present the same
key), a CSR, and connects to the broker's claim listener with the shared claim certificate
and a fresh random session (client id). It publishes an :class:`EnrollRequest` and waits
for the :class:`EnrollAnswer` on the answer topic only that session can read. A refusal is
logged with its code and reason and tried again with a doubling wait (an operator may fix
the token meanwhile); the process never exits over it. The certificate is stored whole
(temporary file, rename) and start goes on. A certificate that expired (the device was
off past its renewal) is enrolled again the same way once a new token is in place.

Renewal (:class:`Renewer`, the ``renewal`` thread, supervised): once the certificate
expires in fewer than ``renew_before_days``, a new key (written 0600 beside the old one as
``<keyfile>.next``) and a CSR go out on the device's own ``renew/request`` topic, which the
broker lets only this identity write, so no token is needed. The answer arrives on the mqtt
thread, which only hands it over through a queue. The new certificate is written as
``<certfile>.next``, then both files are renamed over the old ones (key first); a crash in
between is finished at the next start (:func:`finish_pending_switch`). The link then loads
the pair into its TLS context and reconnects: events wait in the durable outbox and paho
resends what was in flight, so none is lost.

Every key file the agent uses must be its owner's alone (:func:`check_key_files`).

Errors::

    EdgefleetError
    └── IdentityError             root of this module's errors
        ├── ClaimUnavailable      the claim listener could not be reached or did not answer
        └── AnswerRejected        an answer that is not a certificate for our key from our CA

A certificate issued for another name than ``device_id`` is a ``ConfigError``.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import ValidationError

from edgefleet.provisioning import pki
from edgefleet.runtime import EdgefleetError

from .config import AgentConfig, ConfigError, EnrollmentSettings, key_file_problems
from .mqtt import Inbound, MqttLink, close_client, tls_context
from .protocol import (
    EnrollAnswer,
    EnrollRequest,
    RenewRequest,
    Topics,
    describe_errors,
    enroll_answer_topic,
    enroll_request_topic,
)
from .supervisor import SUPERVISOR, fault_point
from .systemd import Notifier

log = logging.getLogger(__name__)

_KEEPALIVE_S = 30
_ANSWERS_KEPT = 4
_NEXT_SUFFIX = ".next"


class IdentityError(EdgefleetError):
    """Root of the identity errors."""


class ClaimUnavailable(IdentityError):
    """The claim listener could not be reached, refused us, or did not answer in time."""


class AnswerRejected(IdentityError):
    """The answer holds no certificate for our key from the fleet CA."""


def check_key_files(config: AgentConfig, source: str) -> None:
    """Refuse (``ConfigError``) a private key that group or others may read or write."""
    problems = key_file_problems(config)
    if problems:
        raise ConfigError(source, problems)


def next_path(path: Path) -> Path:
    """Where a renewal keeps the new key or certificate until both are there."""
    return path.with_name(path.name + _NEXT_SUFFIX)


def finish_pending_switch(certfile: Path, keyfile: Path) -> None:
    """Complete or drop a renewal a crash interrupted, so the key matches the certificate."""
    cert_next, key_next = next_path(certfile), next_path(keyfile)
    if not cert_next.exists():
        key_next.unlink(missing_ok=True)  # asked, never answered: that key certifies nothing
        return
    certificate = pki.load_certificate(cert_next)
    if key_next.exists():
        if pki.load_certificate_key(key_next).public_key() == certificate.public_key():
            os.replace(key_next, keyfile)
        else:
            key_next.unlink()
    if keyfile.exists() and pki.load_certificate_key(keyfile).public_key() == (
        certificate.public_key()
    ):
        os.replace(cert_next, certfile)
        log.info("renewed certificate installed: %s", certfile)
    else:
        cert_next.unlink()


@dataclass(frozen=True)
class DeviceFiles:
    """The device's certificate, its key, and the fleet CA that issued it."""

    certfile: Path
    keyfile: Path
    cafile: Path


def device_files(config: AgentConfig) -> DeviceFiles | None:
    """The device identity files of ``config``; None without a client certificate."""
    tls = config.broker.tls
    if tls is None or tls.certfile is None or tls.keyfile is None:
        return None
    return DeviceFiles(tls.certfile, tls.keyfile, config.enrollment.cafile or tls.cafile)


def prepare_identity(
    config: AgentConfig, *, source: str, stop: threading.Event, notifier: Notifier
) -> bool:
    """Make sure the device has a usable identity before it connects; True when it has.

    False when ``stop`` was set while waiting to be enrolled. ``ConfigError`` for a key
    others may read, or a certificate issued for another name than ``device_id``.
    """
    check_key_files(config, source)
    files = device_files(config)
    if files is None:
        return True
    finish_pending_switch(files.certfile, files.keyfile)
    enroller = _enroller(config, files, notifier)
    token_file = config.enrollment.token_file
    if (
        enroller is not None
        and token_file is not None
        and needs_enrollment(files.certfile, token_file)
        and not enroller.run(stop)
    ):
        return False
    if files.certfile.exists():
        _check_name(pki.load_certificate(files.certfile), config.device_id, source)
    return True


def needs_enrollment(certfile: Path, token_file: Path) -> bool:
    """Whether to enroll: no certificate yet, or one that expired (the device was off past
    its renewal; the broker refuses it) while a new token waits in ``token_file``."""
    if not certfile.exists():
        return True
    if pki.days_to_expiry(pki.load_certificate(certfile)) > 0:
        return False
    if not token_file.exists():
        log.error(
            "the device certificate %s has expired and cannot be renewed over the broker; "
            "put a new enrollment token at %s to enroll again",
            certfile, token_file,
        )  # fmt: skip
        return False
    log.warning("the device certificate %s has expired: enrolling again", certfile)
    return True


def _enroller(config: AgentConfig, files: DeviceFiles, notifier: Notifier) -> Enroller | None:
    e = config.enrollment
    if e.claim_certfile is None or e.claim_keyfile is None or e.token_file is None:
        return None
    claim = _Claim(
        host=e.claim_host or config.broker.host,
        port=e.claim_port,
        cafile=files.cafile,
        certfile=e.claim_certfile,
        keyfile=e.claim_keyfile,
        topic_root=config.broker.topic_root,
        timeout_s=e.timeout_s,
    )
    return Enroller(
        claim, files, e, token_file=e.token_file, device_id=config.device_id, notifier=notifier
    )


def _check_name(certificate: x509.Certificate, device_id: str, source: str) -> None:
    name = pki.common_name(certificate)
    if name != device_id:
        raise ConfigError(
            source,
            [
                f"device_id: {device_id!r}, but the device certificate is issued to {name!r} "
                f"(the broker knows this device as {name!r}): set device_id: {name}"
            ],
        )


@dataclass(frozen=True)
class _Claim:
    """Where and as whom a claim session connects."""

    host: str
    port: int
    cafile: Path
    certfile: Path
    keyfile: Path
    topic_root: str
    timeout_s: float


class Enroller:
    """First-boot enrollment over the claim listener (main thread, during start)."""

    def __init__(
        self,
        claim: _Claim,
        files: DeviceFiles,
        settings: EnrollmentSettings,
        *,
        token_file: Path,
        device_id: str,
        notifier: Notifier,
    ) -> None:
        self._claim = claim
        self._files = files
        self._settings = settings
        self._token_file = token_file
        self._device_id = device_id
        self._notifier = notifier

    def run(self, stop: threading.Event) -> bool:
        """Enroll, trying again after each refusal; True once the certificate is stored."""
        key = device_key(self._files.keyfile)
        csr = pki.make_csr(key, self._device_id).decode()
        delay = self._settings.retry_min_s
        while not stop.is_set():
            fault_point()
            wait = self._attempt(key, csr)
            if wait is None:
                return True
            wait = max(wait, random.uniform(delay / 2, delay))
            self._notifier.status(f"waiting to be enrolled; next attempt in {wait:.0f} s")
            stop.wait(wait)
            delay = min(delay * 2, self._settings.retry_max_s)
        return False

    def _attempt(self, key: pki.CertificateKey, csr: str) -> float | None:
        """One request; None when enrolled, else the least wait before the next."""
        try:
            token = self._token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            log.error(
                "cannot enroll: cannot read the enrollment token %s (%s); waiting for it",
                self._token_file, exc.strerror or exc,
            )  # fmt: skip
            return 0.0
        try:
            answer = request_certificate(self._claim, EnrollRequest(token=token, csr=csr))
        except ClaimUnavailable as exc:
            log.warning("cannot enroll yet: %s", exc)
            return 0.0
        if not answer.ok:
            log.error(
                "enrollment refused (%s): %s",
                answer.code, answer.reason or "no reason given",
                extra={"device": self._device_id},
            )  # fmt: skip
            return answer.retry_after_s or 0.0
        try:
            certificate = accept_certificate(answer, key, pki.load_certificate(self._claim.cafile))
        except (AnswerRejected, pki.PkiError) as exc:
            log.error("enrollment answer refused: %s", exc)
            return 0.0
        self._store(certificate)
        return None

    def _store(self, certificate: x509.Certificate) -> None:
        pki.write_certificate(self._files.certfile, certificate, replace=True)
        log.info(
            "enrolled as %s: certificate stored at %s, expires in %.0f days",
            pki.common_name(certificate), self._files.certfile, pki.days_to_expiry(certificate),
            extra={"device": self._device_id},
        )  # fmt: skip
        try:
            self._token_file.unlink()
        except OSError as exc:  # e.g. a read-only /etc: the token is used, so harmless
            log.info("the used enrollment token stays at %s (%s)", self._token_file, exc)


def device_key(path: Path) -> pki.CertificateKey:
    """The device key at ``path``; made (P-256, 0600, its folder 0700 if new) when there is
    none yet."""
    if path.exists():
        return pki.load_certificate_key(path)
    if not path.parent.exists():
        pki.make_private_dir(path.parent)
    key = pki.generate_key()
    pki.write_private_key(path, key)
    log.info("device key made: %s", path)
    return key


def accept_certificate(
    answer: EnrollAnswer, key: pki.CertificateKey, ca_certificate: x509.Certificate
) -> x509.Certificate:
    """The answer's certificate when it is for ``key`` and issued by the fleet CA."""
    if not answer.certificate:
        raise AnswerRejected("the answer says ok but holds no certificate")
    try:
        certificate = x509.load_pem_x509_certificate(answer.certificate.encode())
    except ValueError as exc:
        raise AnswerRejected(f"the answer's certificate does not parse ({exc})") from exc
    if certificate.public_key() != key.public_key():
        raise AnswerRejected("the answer's certificate is for another key than this device's")
    if not pki.is_issued_by(certificate, ca_certificate):
        raise AnswerRejected("the answer's certificate is not issued by the fleet CA (cafile)")
    return certificate


def _certifies(answer: EnrollAnswer, key: pki.CertificateKey) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate((answer.certificate or "").encode())
    except ValueError:
        return True  # accept_certificate says what is wrong with it
    return bool(certificate.public_key() == key.public_key())


class _ClaimSession:
    """paho callbacks of one claim session (paho's thread): they only record, under a lock."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.connack: Any = None
        self.suback: list[Any] | None = None
        self.answers: list[bytes] = []

    def on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self.changed:
            self.connack = reason
            self.changed.notify_all()

    def on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self.changed:
            self.suback = list(codes)
            self.changed.notify_all()

    def on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.changed:
            self.answers.append(bytes(message.payload))
            self.changed.notify_all()

    def wait(self, ready: Any, deadline: float, what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(ready, timeout=max(0.0, deadline - time.monotonic())):
                raise ClaimUnavailable(f"no {what} within the timeout")


def request_certificate(claim: _Claim, request: EnrollRequest) -> EnrollAnswer:
    """One claim session: connect, subscribe to its answer, send ``request``, wait."""
    identity = pki.common_name(pki.load_certificate(claim.certfile))
    session_id = secrets.token_hex(16)  # the client id: 128 random bits nobody else knows
    session = _ClaimSession()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=session_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=False,
    )
    try:
        client.tls_set_context(tls_context(claim.cafile, claim.certfile, claim.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ClaimUnavailable(f"cannot load the claim certificate ({exc})") from exc
    client.on_connect = session.on_connect
    client.on_subscribe = session.on_subscribe
    client.on_message = session.on_message
    deadline = time.monotonic() + claim.timeout_s
    where = f"the claim listener {claim.host}:{claim.port}"
    try:
        client.connect(claim.host, claim.port, keepalive=_KEEPALIVE_S)
    except (OSError, ssl.SSLError) as exc:
        raise ClaimUnavailable(f"cannot reach {where} ({exc})") from exc
    client.loop_start()
    try:
        session.wait(lambda: session.connack is not None, deadline, f"answer from {where}")
        if session.connack.is_failure:
            raise ClaimUnavailable(f"{where} refused the connection: {session.connack}")
        answer_topic = enroll_answer_topic(claim.topic_root, identity, session_id)
        client.subscribe(answer_topic, qos=1)
        session.wait(lambda: session.suback is not None, deadline, "subscription acknowledged")
        if any(code.is_failure for code in session.suback or []):
            raise ClaimUnavailable(f"{where} refused the subscription to {answer_topic}")
        client.publish(
            enroll_request_topic(claim.topic_root, identity, session_id),
            request.model_dump_json().encode(),
            qos=1,
        )
        session.wait(lambda: bool(session.answers), deadline, "enrollment answer")
        return parse_answer(session.answers[0])
    finally:
        client.disconnect()
        close_client(client)


def parse_answer(payload: bytes) -> EnrollAnswer:
    """The enrollment service's answer; ``ClaimUnavailable`` when it does not parse."""
    try:
        return EnrollAnswer.model_validate_json(payload)
    except ValidationError as exc:
        raise ClaimUnavailable(
            f"the enrollment answer does not parse: {describe_errors(exc)}"
        ) from exc


class Renewer:
    """Renews the device certificate over the device's own connection: the ``renewal``
    thread. Health reads ``days_left`` from any thread (one reference, replaced whole)."""

    def __init__(
        self, files: DeviceFiles, config: AgentConfig, link: MqttLink, topics: Topics
    ) -> None:
        self._certfile, self._keyfile, self._cafile = files.certfile, files.keyfile, files.cafile
        self._settings = config.enrollment
        self._device_id = config.device_id
        self._link = link
        self._topics = topics
        self._answers: queue.Queue[Inbound] = queue.Queue(maxsize=_ANSWERS_KEPT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._certificate = pki.load_certificate(self._certfile)

    @property
    def days_left(self) -> float:
        """Days until the certificate in use expires."""
        return round(pki.days_to_expiry(self._certificate), 2)

    def start(self) -> None:
        """Listen for renewal answers and start the ``renewal`` thread."""
        self._link.route(self._topics.renew_answer, self._on_answer)
        self._stop.clear()
        self._thread = SUPERVISOR.start("renewal", self._run, self._stop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread; a renewal in flight is dropped (its key is removed at next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._link.unroute(self._topics.renew_answer)

    def _on_answer(self, message: Inbound) -> None:  # mqtt thread: hand over only
        try:
            self._answers.put_nowait(message)
        except queue.Full:
            log.warning("renewal answer dropped: %d unread already", _ANSWERS_KEPT)

    def _due(self) -> bool:
        """Whether the certificate expires within renew_before_days, or within half its
        lifetime when that is shorter (a short-lived one is not renewed over and over)."""
        before = self._settings.renew_before_days
        if before is None:
            return False
        cert = self._certificate
        lifetime_days = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
        return pki.days_to_expiry(cert) < min(before, lifetime_days / 86400 / 2)

    def _run(self) -> None:  # renewal thread
        delay = self._settings.retry_min_s
        while not self._stop.is_set():
            fault_point()
            if not self._due():
                self._stop.wait(self._settings.renew_check_s)
                continue
            try:
                self.renew()
            except (IdentityError, pki.PkiError) as exc:
                log.warning("certificate renewal failed: %s; trying again in %.1f s", exc, delay)
                self._stop.wait(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._settings.retry_max_s)
            else:
                delay = self._settings.retry_min_s

    def renew(self) -> None:
        """One renewal: new key, CSR, answer, files switched, link reconnected with them."""
        if not self._link.wait_connected(self._settings.timeout_s):
            raise ClaimUnavailable("not connected to the broker")
        log.info(
            "certificate expires in %.1f days (renewing under %g): asking for a new one",
            self.days_left, self._settings.renew_before_days or 0,
        )  # fmt: skip
        key = pki.generate_key()
        pki.write_private_key(next_path(self._keyfile), key, replace=True)
        while not self._answers.empty():
            self._answers.get_nowait()  # an answer to an earlier request is for another key
        request = RenewRequest(csr=pki.make_csr(key, self._device_id).decode())
        self._link.publish(self._topics.renew_request, request.model_dump_json().encode(), qos=1)
        answer = self._wait_answer(key)
        if not answer.ok:
            raise AnswerRejected(f"refused ({answer.code}): {answer.reason or 'no reason'}")
        certificate = accept_certificate(answer, key, pki.load_certificate(self._cafile))
        if pki.common_name(certificate) != self._device_id:
            raise AnswerRejected(
                f"the renewed certificate names {pki.common_name(certificate)!r}, "
                f"not {self._device_id!r}"
            )
        pki.write_certificate(next_path(self._certfile), certificate, replace=True)
        finish_pending_switch(self._certfile, self._keyfile)
        self._link.switch_certificate(self._certfile, self._keyfile)
        self._certificate = certificate
        log.info("certificate renewed: expires in %.0f days; reconnecting with it", self.days_left)

    def _wait_answer(self, key: pki.CertificateKey) -> EnrollAnswer:
        """The answer for ``key``; a late one to an earlier request (resent over a
        reconnect) holds another key's certificate and is passed over."""
        deadline = time.monotonic() + self._settings.timeout_s
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = self._answers.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            answer = parse_answer(message.payload)
            if answer.ok and not _certifies(answer, key):
                log.debug("passed over a renewal answer for another key")
                continue
            return answer
        raise ClaimUnavailable(f"no renewal answer within {self._settings.timeout_s:g} s")
